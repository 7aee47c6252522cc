"""Shared helpers for training tests: synthetic token files and tiny-run command lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
TINY_VOCAB = 512


def write_token_file(path: Path, num_tokens: int, vocab: int = TINY_VOCAB, seed: int = 0) -> Path:
    """A dolma-style headerless uint16 memmap of random tokens below ``vocab``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # A repeating pattern plus noise: learnable, so the loss visibly falls in a few steps.
    base = rng.integers(0, vocab, size=97)
    tokens = np.resize(base, num_tokens)
    noise = rng.random(num_tokens) < 0.1
    tokens[noise] = rng.integers(0, vocab, size=int(noise.sum()))
    mm = np.memmap(path, dtype=np.uint16, mode="w+", shape=(num_tokens,))
    mm[:] = tokens
    mm.flush()
    return path


TEST_CONFIG = str(Path(__file__).with_name("tiny_test.yaml"))


def tiny_overrides(save_folder: Path, data_dir: Path, **extra) -> list[str]:
    """Overrides pointing tests/olmo/tiny_test.yaml at a save folder and synthetic data."""
    opts = {
        "save_folder": str(save_folder),
        "data.paths": f"[{data_dir}/train*.npy]",
        "data.validation": "{val: [" + str(data_dir) + "/val*.npy]}",
    }
    opts.update(extra)
    return [f"--{k}={v}" for k, v in opts.items()]


def make_data(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    write_token_file(data_dir / "train-0.npy", 40_000, seed=0)
    write_token_file(data_dir / "val-0.npy", 4_000, seed=1)
    return data_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300,
              torchrun: bool | None = None):
    """Run scripts/train.py, through torchrun when nproc > 1 (or torchrun=True: one process that
    is distributed, hence FSDP on a GPU); returns CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if nproc > 1 or torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(TRAIN_SCRIPT), *args]
    else:
        cmd = [sys.executable, str(TRAIN_SCRIPT), *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(save_folder: Path) -> list[dict]:
    path = Path(save_folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
