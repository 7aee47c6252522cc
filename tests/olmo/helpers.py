"""Shared helpers for training tests: synthetic token files, tiny-run command lines, and
references the tests check results against (downstream scoring, figures)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

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


def run_worker(module: str, nproc: int, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in ``nproc`` gloo processes through torchrun."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         f"--master_port={free_port()}", "-m", module, *args],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def read_metrics(save_folder: Path) -> list[dict]:
    path = Path(save_folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ce_losses(save_folder: Path) -> list[tuple[int, float]]:
    """(step, training cross-entropy) of every step a run's metrics.jsonl records."""
    from olmo.metric_names import CE_LOSS

    return [(m["step"], m[CE_LOSS]) for m in read_metrics(save_folder) if CE_LOSS in m]


# Scoring rule of each task's OLMo metric: ``acc`` sums the continuation's log-likelihood,
# ``len_norm`` divides it by the continuation's length in characters.
TASK_NORMALIZATION = {"arc_easy": "sum", "sciq": "sum", "arc_challenge": "per_char",
                      "hellaswag": "per_char", "piqa": "per_char"}


@torch.no_grad()
def direct_scores(model, samples: list[dict]) -> list[float]:
    """Log-likelihood of each sample's continuation given its context, one sample at a time
    (no batching, no padding), the input cut from the left to the model's context window."""
    window, vocab = model.config.max_sequence_length, model.config.vocab_size
    scores = []
    for sample in samples:
        cont = list(sample["continuation"])
        inputs = (list(sample["ctx"]) + cont)[:-1][-window:]
        logprobs = model(torch.tensor([inputs])).logits[0, :, :vocab].double().log_softmax(-1)
        first = len(inputs) - len(cont)  # the position whose output predicts cont[0]
        scores.append(sum(logprobs[first + j, tok].item() for j, tok in enumerate(cont)))
    return scores


def direct_accuracy(model, task: str, limit: int) -> float:
    """Accuracy of ``model`` on the first ``limit`` questions of ``task`` from
    :func:`direct_scores`: the reference for olmo/downstream.py. A question counts when its
    labelled continuation scores highest; a near-tie (the answer would depend on rounding)
    fails instead."""
    from olmo.downstream import build_tokenizer, load_task

    dataset = load_task(task, build_tokenizer(), max_length=model.config.max_sequence_length,
                        limit=limit)
    samples = list(dataset.samples)
    per_char = TASK_NORMALIZATION[task] == "per_char"
    choices: dict[int, list[tuple[float, int]]] = {}
    labels: dict[int, int] = {}
    for sample, score in zip(samples, direct_scores(model, samples)):
        score = score / sample["cont_str_len"] if per_char else score
        choices.setdefault(sample["doc_id"], []).append((score, sample["cont_id"]))
        labels[sample["doc_id"]] = sample["label_id"]
    assert sorted(choices) == list(range(limit)), sorted(choices)
    correct = 0
    for doc, scored in choices.items():
        scored.sort(reverse=True)
        assert scored[0][0] - scored[1][0] > 1e-4, f"{task} question {doc}: near-tie {scored[:2]}"
        correct += scored[0][1] == labels[doc]
    return correct / limit


def assert_png_drawn(path: Path) -> None:
    """The file decodes as a PNG image with something drawn on it (not one flat colour)."""
    import matplotlib.image

    image = matplotlib.image.imread(path, format="png")
    assert image.ndim == 3 and min(image.shape[:2]) >= 100, (path, image.shape)
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) > 10, (path, len(colours))
