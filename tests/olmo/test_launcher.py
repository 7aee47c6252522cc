"""run_pretrain.sh and olmo/launcher.py: process count, rendezvous port, the run checked once
before torchrun starts workers, and a finished run left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from olmo.config import load_config
from olmo.launch import run_target_step
from olmo.launcher import gpus_on_machine, processes_per_node, rendezvous_args, visible_gpus
from olmo.run_files import find_checkpoints

from .helpers import REPO, TEST_CONFIG, make_data, read_metrics, tiny_overrides

# ---- process count ----------------------------------------------------------------------------


def _fake_nvidia_smi(bin_dir: Path, gpus: int) -> None:
    """An ``nvidia-smi`` that lists ``gpus`` GPUs as the real one does for ``-L``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(
        f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d}-0000-0000-0000-000000000000)"
        for i in range(gpus)
    )
    script = bin_dir / "nvidia-smi"
    script.write_text(f'#!/bin/sh\n[ "$1" = -L ] || exit 1\ncat <<EOF\n{lines}\nEOF\n')
    script.chmod(0o755)


def test_process_count_follows_cuda_visible_devices(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path / "bin", 8)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    machine = gpus_on_machine()
    assert machine == 8
    assert processes_per_node({}, machine) == 8
    # Two 4-GPU jobs on one 8-GPU node: 4 processes each (nvidia-smi alone said 8).
    assert processes_per_node({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, machine) == 4
    assert processes_per_node({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, machine) == 4
    assert processes_per_node({"CUDA_VISIBLE_DEVICES": "GPU-00000002-0000-0000-0000-000000000000"},
                              machine) == 1  # fmt: skip
    # CUDA stops at the first invalid entry; an empty list hides every GPU: one CPU process.
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,-1,3"}, machine) == 2
    assert processes_per_node({"CUDA_VISIBLE_DEVICES": ""}, machine) == 1
    # NPROC_PER_NODE wins over both.
    assert processes_per_node({"NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, machine) == 2


def test_no_nvidia_smi_means_one_cpu_process(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    assert gpus_on_machine() == 0
    assert processes_per_node({"CUDA_VISIBLE_DEVICES": "0,1"}, gpus_on_machine()) == 1


def test_rendezvous_picks_a_free_port_on_one_node_only():
    assert rendezvous_args({}) == ["--standalone", "--nnodes=1"]
    # MASTER_PORT when set still wins, on one node too.
    assert "--master_port=29999" in rendezvous_args({"MASTER_PORT": "29999"})
    # Multi-node is unchanged: a static address and port, 29500 by default.
    multi = rendezvous_args({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"})
    assert multi == ["--nnodes=2", "--node_rank=1", "--master_addr=node0", "--master_port=29500"]


# ---- through run_pretrain.sh ------------------------------------------------------------------


def _launch(args: list[str], env: dict | None = None, wait: bool = True):
    base = {k: v for k, v in os.environ.items() if k != "NPROC_PER_NODE"}
    full_env = {**base, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", **(env or {})}  # fmt: skip
    cmd = ["bash", str(REPO / "run_pretrain.sh"), TEST_CONFIG, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    return _finish(proc) if wait else proc


def _finish(proc: subprocess.Popen):
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("launcher"))


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["--model.d_modle=256"], {},
         ["unknown config key 'model.d_modle'", "did you mean 'model.d_model'"]),
        # Checked for the processes torchrun would start: global batch 8 over 3.
        ([], {"NPROC_PER_NODE": "3"}, ["global_train_batch_size=8", "processes (3)"]),
    ],
)
def test_bad_input_through_run_pretrain_is_one_line_and_exit_2(tmp_path, data, args, env, words):
    save = tmp_path / "run"
    code, out, err = _launch([*tiny_overrides(save, data), *args], env=env)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err
    assert "ChildFailedError" not in out + err and not save.exists()


@pytest.mark.slow
def test_check_config_needs_no_data_and_catches_typos(tmp_path):
    """What run_pretrain.sh runs before it makes the sample data: the config alone."""
    missing = ["--data.paths=[/nonexistent/train*.npy]", f"--save_folder={tmp_path / 'run'}"]
    check = [sys.executable, "-m", "olmo.launcher", "--check-config", TEST_CONFIG]
    ok = subprocess.run([*check, *missing], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and not ok.stderr.strip(), ok.stderr
    bad = subprocess.run([*check, *missing, "--model.d_modle=256"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown config key 'model.d_modle'")
    assert len(bad.stderr.strip().splitlines()) == 1
    # The full check does look at the data.
    full = subprocess.run([sys.executable, "-m", "olmo.launcher", TEST_CONFIG, *missing], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert full.returncode == 2 and "/nonexistent/train*.npy" in full.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_runs_on_one_machine_both_start(tmp_path, data):
    """Two single-node runs at once: each rendezvous binds its own free port (a fixed 29500
    made the second fail with EADDRINUSE)."""
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [_launch(tiny_overrides(save, data, max_duration=1, save_interval=1), wait=False)
             for save in runs]  # fmt: skip
    for save, proc in zip(runs, procs):
        code, out, err = _finish(proc)
        assert code == 0, (out + err)[-3000:]
        assert [r["step"] for r in read_metrics(save) if "train/CrossEntropyLoss" in r] == [1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A run of 3 steps through run_pretrain.sh, a checkpoint every step, keeping 2, with
    offline W&B."""
    save = tmp_path_factory.mktemp("finished") / "run"
    overrides = tiny_overrides(save, data, max_duration=3, save_interval=1,
                               save_num_checkpoints_to_keep=2, **{"wandb.mode": "offline"})  # fmt: skip
    code, out, err = _launch(overrides, env={"WANDB_SILENT": "true"})
    assert code == 0, (out + err)[-3000:]
    return save, overrides, out


@pytest.mark.slow
def test_keep_last_k_holds_at_the_end_of_a_run(finished):
    save, _, out = finished
    # Saves at 1, 2, 3 with k=2: the final checkpoint counts within k.
    assert [p.name for p in find_checkpoints(save)] == ["step2", "step3"]
    assert "(latest of 2 on disk)" in out


@pytest.mark.slow
def test_a_finished_run_says_so_and_writes_nothing(finished):
    save, overrides, _ = finished
    wandb_dirs = sorted(p.name for p in (save / "wandb").glob("*run-*") if not p.is_symlink())
    assert len(wandb_dirs) == 1 and wandb_dirs[0].startswith("offline-run-"), wandb_dirs
    before = _files(save)
    code, out, err = _launch(overrides, env={"WANDB_SILENT": "true"})
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert "already finished" in lines[0] and "at step 3" in lines[0]
    # It points at the files of the run: its checkpoint, metrics and its one W&B directory.
    assert str(save / "step3") in lines[0] and str(save / "metrics.jsonl") in lines[0]
    assert f"wandb sync {save / 'wandb' / wandb_dirs[0]}" in lines[0]
    assert _files(save) == before  # no new W&B directory, metrics.jsonl untouched
    assert "Training for" not in out + err


@pytest.mark.slow
def test_another_run_in_the_folder_is_one_line_naming_the_changes(finished):
    """The error imports olmo-core's checkpointer, whose import logged `transformer_engine
    unavailable` first: stderr must still be the one error line."""
    save, overrides, _ = finished
    before = _files(save)
    code, out, err = _launch([*overrides, "--model.d_model=64", "--model.n_heads=4"])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "model.d_model: 32 -> 64, model.n_heads: 2 -> 4" in err
    # A new folder is suggested first, and what save_overwrite does is said.
    assert err.index(f"--save_folder={save}-2") < err.index("--save_overwrite=true")
    assert f"{save}.old-" in err
    assert _files(save) == before


def test_the_step_a_run_stops_at(tmp_path):
    """What a finished run is measured against: steps, tokens (whole steps, rounded up, as
    olmo-core counts them) and an earlier stop_at."""
    def target(*overrides):
        cfg = load_config(TEST_CONFIG, list(overrides))  # global batch 8 x 32 tokens
        return run_target_step(cfg, tmp_path, cfg)

    assert target("--max_duration=8") == 8
    assert target("--max_duration=2048T") == 8
    assert target("--max_duration=2049T") == 9
    assert target("--max_duration=8", "--stop_at=4") == 4
    assert target("--max_duration=8", "--stop_at=20") == 8
