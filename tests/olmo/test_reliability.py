"""Reliability (issue #5): faults, bad input and long runs lose nothing.

Faults are injected with ``MOE_FAULT`` (olmo/faults.py) into real CPU runs of
tests/olmo/tiny_test.yaml (8 steps, checkpoints every 4), 1 process or 2 gloo processes.
Runs shared by several tests (an uninterrupted 1- and 2-process run) are session fixtures
(tests/olmo/conftest.py, shared with test_train.py);
preflight-only failures call ``olmo.launch.main`` in-process (the same code path as the
script, without a subprocess's start-up), with one subprocess case proving the script's
exit code and stderr end to end.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from olmo_core.train.callbacks import Callback

from moe_model.errors import LaunchError
from olmo.checkpoint_io import load_state_dict
from olmo.launch import main
from olmo.run_files import find_checkpoints

from .helpers import (
    TEST_CONFIG,
    ce_losses,
    read_metrics,
    run_train,
    tiny_overrides,
    write_token_file,
)

CE = "train/CrossEntropyLoss"


# ---- helpers --------------------------------------------------------------------------------


def _run(save, data, nproc=1, env=None, **extra):
    return run_train([TEST_CONFIG, *tiny_overrides(save, data, **extra)], nproc=nproc, env=env)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _steps(save):
    return [s for s, _ in ce_losses(save)]


def _assert_same_weights(a_dir, b_dir):
    a, b = load_state_dict(a_dir), load_state_dict(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _trainer_state(step_dir: Path, rank: int = 0) -> dict:
    return torch.load(step_dir / "train" / f"rank{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def data(tiny_data):
    """The straight runs' token files: a run resumed from a copy of one sees an unchanged config."""
    return tiny_data


# ---- 1. non-finite loss: stop -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_nonfinite_stop_keeps_last_checkpoint_and_resumes(tmp_path, data, straight1, straight2, nproc):
    save = tmp_path / "nan"
    # Only the last rank sees the NaN: every rank must still stop at the same step.
    fault = f"nan_loss@3:{nproc - 1}"
    proc = _run(save, data, nproc=nproc, env={"MOE_FAULT": fault}, save_interval=2)
    assert proc.returncode != 0
    # One message per rank (all ranks raised); counted in the text, since torchrun merges the ranks'
    # stderr into one pipe.
    assert proc.stderr.count("error: step 3: non-finite loss") == nproc, proc.stderr[-3000:]
    # No optimizer update at step 3 or later on any rank (rank 0 writes the metrics).
    records = read_metrics(save)
    assert not [r for r in records if r["step"] >= 3 and "optim/LR" in r]
    assert max(r["step"] for r in records) == 2
    # The last good checkpoint is complete and loadable; nothing later was written.
    assert [p.name for p in find_checkpoints(save)] == ["step0", "step2"]
    assert not [p for p in save.iterdir() if p.name.startswith("step") and p.name not in ("step0", "step2")]
    weights = load_state_dict(save / "step2")
    assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    # Rerun without the fault: resumes from step2 and continues the straight run exactly.
    _ok(_run(save, data, nproc=nproc, save_interval=2))
    straight = straight1 if nproc == 1 else straight2
    assert ce_losses(save) == ce_losses(straight)
    _assert_same_weights(save / "step8", straight / "step8")
    # The spike detector's window survived the resume: steps 1-2 from step2 plus 3-8.
    history = _trainer_state(save / "step8")["callbacks"]["spike_detector"]["history"]
    assert history["Loss"] == [loss for _, loss in ce_losses(save)]


# ---- 2. non-finite loss: skip -----------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_skip_counts_and_continues(tmp_path, data, straight2):
    save = tmp_path / "skip"
    _ok(_run(save, data, nproc=2, env={"MOE_FAULT": "nan_loss@3:1"}, nonfinite_policy="skip"))
    train = {r["step"]: r for r in read_metrics(save) if CE in r}
    assert sorted(train) == list(range(1, 9))
    assert [train[s]["optim/SkippedSteps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 1, 1, 1]
    # The fault really fired (the reduced loss of step 3 is NaN) and step 3 made no update.
    assert not math.isfinite(float(train[3][CE]))
    assert "optim/LR" not in train[3]
    assert all("optim/LR" in train[s] for s in (1, 2, 4, 5, 6, 7, 8))
    # Before the fault the run is the straight run; after it, training goes on and learns.
    straight = dict(ce_losses(straight2))
    assert [train[s][CE] for s in (1, 2)] == [straight[1], straight[2]]
    assert all(math.isfinite(train[s][CE]) for s in range(4, 9))
    assert train[8][CE] < train[1][CE] - 0.2
    # The skipped count is in the checkpoint (train_module state) and the weights are finite.
    from olmo_core.distributed.checkpoint import load_keys

    dcp_dir = save / "step8" / "model_and_optim"
    assert list(load_keys(dcp_dir, ["train_module.skipped_steps"])) == [1]
    weights = load_state_dict(save / "step8")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


# ---- 3. spike detector --------------------------------------------------------------------


def test_spike_detector_rule_and_state_round_trip():
    from olmo.callbacks import SpikeDetectorCallback

    det = SpikeDetectorCallback(window=10, threshold_std=3.0, min_history=5)
    # Not enough history yet: nothing is a spike.
    assert not any(det.check("Loss", v) for v in (5.0, 5.1, 4.9, 5.0))
    assert not det.check("Loss", 100.0)  # 5th value, history has 4 < min_history
    det = SpikeDetectorCallback(window=10, threshold_std=3.0, min_history=5)
    normal = [5.0, 5.1, 4.9, 5.05, 4.95, 5.0, 5.02]
    assert not any(det.check("Loss", v) for v in normal)
    assert not det.check("Loss", 5.1)
    # Non-finite values never enter the window and are no spike: the non-finite policy acts.
    assert not det.check("Loss", float("nan"))
    assert not det.check("Loss", float("inf"))
    assert all(math.isfinite(v) for v in det.state_dict()["history"]["Loss"])
    assert len(det.state_dict()["history"]["Loss"]) == len(normal) + 1
    assert det.check("Loss", 50.0)
    assert det.state_dict()["counts"] == {"Loss": 1}
    # A flat history (std 0) flags any rise.
    flat = SpikeDetectorCallback(window=10, threshold_std=6.0, min_history=3)
    assert not any(flat.check("GradNorm", 1.0) for _ in range(3))
    assert flat.check("GradNorm", 1.001)
    assert not flat.check("GradNorm", 1.0)
    assert det.state_dict()["history"]["Loss"] == [*normal, 5.1, 50.0]

    # Round trip: a restored detector makes the same decisions on the next values.
    state = det.state_dict()
    restored = SpikeDetectorCallback(window=10, threshold_std=3.0, min_history=5)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    for value in (5.0, 5.2, 30.0, 4.9, 80.0):
        assert restored.check("Loss", value) == det.check("Loss", value)
    assert restored.state_dict() == det.state_dict()
    # The window keeps the latest 10 values.
    assert det.state_dict()["history"]["Loss"] == [*normal, 5.1, 50.0, 5.0, 5.2, 30.0, 4.9, 80.0][-10:]
    # A fresh detector (state lost) would decide differently: the round trip matters.
    assert not SpikeDetectorCallback(window=10, threshold_std=3.0, min_history=5).check("Loss", 80.0)


def test_spike_detector_state_is_in_the_checkpoint(straight1):
    state = _trainer_state(straight1 / "step8")
    spike = state["callbacks"]["spike_detector"]
    losses = [loss for _, loss in ce_losses(straight1)]
    assert spike["history"]["Loss"] == losses  # every step's reduced loss, in order
    grad_norms = [m["optim/GradNorm"] for m in read_metrics(straight1) if CE in m]
    assert spike["history"]["GradNorm"] == grad_norms
    assert spike["counts"] == {}
    assert state["global_step"] == 8


# ---- 4. SIGTERM ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signal_kind", ["sigterm", "sigint"])
def test_signal_on_one_rank_stops_all_saves_and_resumes_exactly(tmp_path, data, straight2, signal_kind):
    save = tmp_path / "term"
    proc = _run(save, data, nproc=2, env={"MOE_FAULT": f"{signal_kind}@3:1"})
    # A cancelled run is a clean exit: torchrun returns 0.
    _ok(proc)
    # The signal arrives during step 3 on rank 1; both ranks finish step 3 and stop there
    # (cancel_check_interval=1 and synchronous bookkeeping), writing a final checkpoint.
    assert [p.name for p in find_checkpoints(save)] == ["step0", "step3"]
    assert _steps(save) == [1, 2, 3]
    for rank in (0, 1):
        assert _trainer_state(save / "step3", rank)["global_step"] == 3
    load_state_dict(save / "step3")
    # Resuming (same command, no fault) continues the loss curve of an uninterrupted run.
    _ok(_run(save, data, nproc=2))
    assert ce_losses(save) == ce_losses(straight2)
    _assert_same_weights(save / "step8", straight2 / "step8")


# ---- 5. atomic checkpoints ----------------------------------------------------------------


def test_unfinished_checkpoints_are_never_picked(tmp_path, data, straight1):
    from olmo_core.train.checkpoint import Checkpointer

    save = tmp_path / "partial"
    shutil.copytree(straight1, save)
    # A save that crashed after the rename but before .metadata.json, and one that crashed
    # before the rename.
    shutil.copytree(save / "step8", save / "step12")
    (save / "step12" / ".metadata.json").unlink()
    shutil.copytree(save / "step8", save / "step16-tmp")
    assert find_checkpoints(save)[-1].name == "step8"
    assert Path(Checkpointer.latest_checkpoint(str(save))).name == "step8"
    # A model_and_optim without its .metadata is not complete either.
    shutil.copytree(save / "step8", save / "step20")
    (save / "step20" / "model_and_optim" / ".metadata").unlink()
    assert find_checkpoints(save)[-1].name == "step8"
    # A resumed run loads step8: it trains steps 9 and 10 only, the earlier lines untouched.
    before = ce_losses(save)
    _ok(_run(save, data, max_duration=10))
    after = ce_losses(save)
    assert after[:8] == before
    assert [s for s, _ in after[8:]] == [9, 10]


def test_killed_process_leaves_last_checkpoint_and_resumes_exactly(tmp_path, data, straight1):
    save = tmp_path / "killed"
    proc = _run(save, data, env={"MOE_FAULT": "exit@6"})
    assert proc.returncode == 3  # os._exit(3): no clean-up at all
    assert [p.name for p in find_checkpoints(save)] == ["step0", "step4"]
    assert _steps(save) == [1, 2, 3, 4, 5]
    load_state_dict(save / "step4")
    _ok(_run(save, data))
    assert ce_losses(save) == ce_losses(straight1)
    _assert_same_weights(save / "step8", straight1 / "step8")


@pytest.mark.slow
def test_keep_last_k(tmp_path, data):
    save = tmp_path / "keep"
    _ok(_run(save, data, save_interval=2, save_num_checkpoints_to_keep=2))
    # olmo-core's CheckpointerCallback deletes an old checkpoint one step *after* saving the
    # next, so the last save's surplus (step4 here) stayed; CheckpointRetentionCallback removes
    # it once the final checkpoint is written: k remain, the final one counted.
    steps = sorted(int(p.name[4:]) for p in save.iterdir() if p.name.startswith("step"))
    assert steps == [6, 8]
    assert [p.name for p in find_checkpoints(save)] == ["step6", "step8"]
    load_state_dict(save / "step8")


# ---- 6. resume guardrails -----------------------------------------------------------------


@pytest.fixture
def finished(tmp_path, straight1):
    """A copy of a finished 1-process run and the snapshot of its files."""
    save = tmp_path / "finished"
    shutil.copytree(straight1, save)
    return save, _snapshot(save)


@pytest.mark.parametrize(
    "override, change",
    [
        ("--model.d_model=64", "model.d_model: 32 -> 64"),
        ("--model.max_sequence_length=16", "model.max_sequence_length: 32 -> 16"),
        ("--global_train_batch_size=16", "global_train_batch_size: 8 -> 16"),
        ("--data.paths=[{data}/train-0.npy]", "data.paths: ['{data}/train*.npy'] -> ['{data}/train-0.npy']"),
    ],
)
def test_resume_with_changed_setup_is_refused(finished, data, capsys, override, change):
    save, snapshot = finished
    code = main([TEST_CONFIG, *tiny_overrides(save, data), override.format(data=data)])
    err = capsys.readouterr().err
    assert code == 2
    lines = _error_lines(err)
    assert len(lines) == 1 and str(save) in lines[0], err
    assert f"its config.yaml differs: {change.format(data=data)});" in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(save) == snapshot  # nothing in the save folder touched


@pytest.mark.slow
def test_resume_onto_changed_data_files_is_one_error_line(tmp_path, data, finished):
    """Same config, but the training file at the same path now has another size.

    The loader's resume check raises its DataError inside trainer.fit(); main() must still turn
    it into one line and exit 2 (it once escaped as a traceback with exit 1).
    """
    save, _ = finished
    new_data = tmp_path / "data"
    shutil.copytree(data, new_data)
    config = save / "config.yaml"
    config.write_text(config.read_text().replace(f"{data}/", f"{new_data}/"))
    write_token_file(new_data / "train-0.npy", 30_000, seed=7)
    snapshot = _snapshot(save)
    # Asked to train further: a finished run asked for nothing more says so before any data is read.
    proc = _run(save, new_data, max_duration=12)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "the training data differs from the checkpoint's" in output
    assert "train-0.npy: 80,000 -> 60,000 bytes" in output
    after = _snapshot(save)
    assert {k: v for k, v in after.items() if k.startswith("step")} == {
        k: v for k, v in snapshot.items() if k.startswith("step")
    }
    assert proc.returncode == 2
    assert len(_error_lines(proc.stderr)) == 1, proc.stderr[-2000:]
    assert "Traceback" not in output


@pytest.mark.slow
def test_save_overwrite_starts_a_new_run(finished, data):
    """The guardrail's advice, --save_overwrite=true, starts a new run in that folder, and the
    other run's files are moved aside whole, not deleted.

    olmo-core's Trainer resumes from the latest checkpoint in save_folder whatever
    save_overwrite says, so the other run's checkpoints must leave the folder first (it once
    loaded the d_model=32 checkpoint into the d_model=64 model and crashed).
    """
    save, snapshot = finished
    (save / "notes.txt").write_text("not a run's file")
    proc = _run(save, data, **{"model.d_model": 64, "save_overwrite": "true"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    # ... and then the run is a fresh one: it trained from step 1.
    assert _steps(save)[0] == 1 and _snapshot(save)["config.yaml"] != snapshot["config.yaml"]
    # Nothing of the other run is lost: every file, same size and time, in one folder beside.
    aside = [p for p in save.parent.iterdir() if p.name.startswith(f"{save.name}.old-")]
    assert len(aside) == 1
    assert _snapshot(aside[0]) == snapshot
    checkpoints = len({name.split("/")[0] for name in snapshot if name.startswith("step")})
    assert f"moved the previous run in {save} ({checkpoints} checkpoint(s)" in proc.stdout + proc.stderr
    assert f"to {aside[0]}; nothing was deleted" in proc.stdout + proc.stderr
    assert (save / "notes.txt").read_text() == "not a run's file"  # not a run's: stays


@pytest.mark.slow
def test_resume_two_process_checkpoint_with_one_process(tmp_path, data, straight2):
    save = tmp_path / "two_to_one"
    shutil.copytree(straight2, save)
    shutil.rmtree(save / "step8")  # resume from step4, written by 2 processes
    _ok(_run(save, data, nproc=1))
    assert _trainer_state(save / "step8")["world_size"] == 1
    resumed, straight = ce_losses(save), ce_losses(straight2)
    assert [s for s, _ in resumed] == [s for s, _ in straight] == list(range(1, 9))
    assert resumed[:4] == straight[:4]
    # Same samples at steps 5-8 (the data position is in global batches); only the summation
    # order differs between 1 and 2 processes (see test_train.test_two_processes_match_one).
    for (step, a), (_, b) in zip(resumed[4:], straight[4:]):
        assert a == pytest.approx(b, rel=2e-3), f"step {step}: {a} vs {b}"


# ---- 7. bad inputs --------------------------------------------------------------------------


def _bad_data_dir(tmp_path: Path, kind: str) -> Path:
    bad = tmp_path / f"bad_{kind}"
    write_token_file(bad / "val-0.npy", 4_000, seed=1)
    train = bad / "train-0.npy"
    if kind == "empty":
        train.write_bytes(b"")
    elif kind == "truncated":
        write_token_file(train, 40_000)
        with train.open("ab") as f:
            f.write(b"\x01")  # 80,001 bytes: not a whole number of uint16 tokens
    elif kind == "out_of_vocab":
        write_token_file(train, 40_000)
        tokens = np.memmap(train, dtype=np.uint16, mode="r+")
        tokens[123] = 600  # vocab_size is 512
        tokens.flush()
    return bad


BAD_INPUTS = {
    # name: (extra overrides or a callable(tmp_path, data) -> argv, words the error line names)
    "unknown_key": (["--model.d_modle=32"], ["model.d_modle"]),
    "wrong_type": (["--model.d_model=abc"], ["model.d_model", "abc"]),
    "zero_batch": (["--global_train_batch_size=0"], ["global_train_batch_size"]),
    "zero_layers": (["--model.n_layers=0"], ["n_layers"]),
    "negative_lr": (["--optimizer.learning_rate=-1"], ["optimizer.learning_rate"]),
    "top_k_above_experts": (["--model.moe_top_k=8"], ["moe_top_k"]),
    "heads_not_dividing": (["--model.n_heads=3"], ["n_heads"]),
    "empty_file": ("empty", ["data.paths", "train-0.npy", "empty"]),
    "truncated_file": ("truncated", ["data.paths", "train-0.npy", "80,001 bytes"]),
    "token_out_of_vocab": ("out_of_vocab", ["data.paths", "token id 600", "position 123"]),
    "load_path_not_checkpoint": ("load_path", ["load_path", "not a complete checkpoint"]),
    "foreign_checkpoints": ("foreign", ["save_folder", "config.yaml", "save_overwrite"]),
    "malformed_yaml": ("yaml", ["bad.yaml", "not valid YAML", "line"]),
}
# Sequence length above the model's maximum is not expressible: the training sequence length
# *is* model.max_sequence_length (olmo/launch.py), there is no separate data setting.


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(tmp_path, data, straight1, capsys, name):
    how, words = BAD_INPUTS[name]
    save = tmp_path / "save"
    config, data_dir, extra = TEST_CONFIG, data, []
    if isinstance(how, list):
        extra = how
    elif how in ("empty", "truncated", "out_of_vocab"):
        data_dir = _bad_data_dir(tmp_path, how)
    elif how == "load_path":
        extra = [f"--load_path={straight1}"]  # the run folder, not a stepN directory
    elif how == "foreign":
        shutil.copytree(straight1, save)
        (save / "config.yaml").unlink()  # checkpoints of an unknown run
    elif how == "yaml":
        config = str(tmp_path / "bad.yaml")
        Path(config).write_text("model:\n  d_model: [32\n  n_layers: 2\n")
    before = _snapshot(save) if save.exists() else None
    code = main([config, *tiny_overrides(save, data_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in err
    if before is None:
        assert not save.exists()
    else:
        assert _snapshot(save) == before


# The same property as tests/olmo/test_config.py's test_cli_errors_exit_nonzero_with_one_line.
@pytest.mark.slow
def test_bad_input_through_the_script(tmp_path, data):
    save = tmp_path / "save"
    proc = run_train([TEST_CONFIG, *tiny_overrides(save, data, **{"model.moe_top_k": 8})])
    assert proc.returncode == 2
    assert len(_error_lines(proc.stderr)) == 1 and "moe_top_k" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not save.exists()


PREFLIGHT_REFUSALS = {
    # name: (overrides, the whole error line)
    "wandb_online_without_key": (
        ["--wandb.mode=online"],
        "error: wandb.mode='online' found no W&B credentials (neither WANDB_API_KEY, "
        "WANDB_IDENTITY_TOKEN_FILE nor a netrc entry from `wandb login`); log in, or use "
        "--wandb.mode=offline (sync later with `wandb sync`) or --wandb.mode=disabled",
    ),
    "flex_training_on_cpu": (
        ["--model.document_masking=true", "--model.document_masking_backend=flex"],
        "error: model.document_masking_backend='flex' cannot train on device 'cpu' (torch "
        "implements FlexAttention's backward on CUDA only); use 'sdpa' or 'auto'",
    ),
}


def _no_wandb_credentials(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.mark.parametrize("name", list(PREFLIGHT_REFUSALS))
def test_settings_that_fail_in_training_are_refused_before_writing(
    tmp_path, data, capsys, monkeypatch, name
):
    """Found by preflight, not once the trainer runs: one line, nothing in the save folder."""
    _no_wandb_credentials(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra, line = PREFLIGHT_REFUSALS[name]
    save = tmp_path / "save"
    code = main([TEST_CONFIG, *tiny_overrides(save, data), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert _error_lines(err) == [line], err
    assert "Traceback" not in err
    assert not save.exists()


def test_preflight_passes_the_usable_neighbours(tmp_path, data, monkeypatch):
    """The refusals above are exact: a key, a GPU, or flex left unused each let the run go."""
    from olmo.config import load_config
    from olmo.launch import preflight

    def cfg(*extra):
        return load_config(TEST_CONFIG, [*tiny_overrides(tmp_path / "save", data), *extra])

    flex = ["--model.document_masking=true", "--model.document_masking_backend=flex"]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    preflight(cfg("--wandb.mode=online"))
    preflight(cfg("--model.document_masking_backend=flex"))  # no document masking: flex unused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    preflight(cfg(*flex))
    assert not (tmp_path / "save").exists()


def test_wandb_login_credentials_let_an_online_run_go(tmp_path, data, monkeypatch):
    """`wandb login` stores its key in netrc for the server's host, not in the environment: that
    is enough for an online run, and an entry for another host is not."""
    from olmo.config import load_config
    from olmo.launch import preflight

    cfg = load_config(TEST_CONFIG, [*tiny_overrides(tmp_path / "save", data), "--wandb.mode=online"])
    _no_wandb_credentials(monkeypatch, tmp_path)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    preflight(cfg)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    with pytest.raises(LaunchError, match="found no W&B credentials"):
        preflight(cfg)
    netrc.write_text("machine wandb.example.org\n  login user\n  password " + "k" * 40 + "\n")
    preflight(cfg)
    assert not (tmp_path / "save").exists()


# ---- 8. no memory growth ------------------------------------------------------------------


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tiny_model():
    from moe_model.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=512, embedding_size=512, d_model=32, n_layers=2, n_heads=2,
        max_sequence_length=32, activation_type="polynorm", mlp_hidden_size=48,
        moe_num_experts=4, moe_top_k=2,
    )
    return cfg.build(init_device="cpu")


class _MemoryProbe(Callback):
    """Live tensors and resident memory after each of ``steps`` (collected first: the trainer's
    garbage-collector callback runs gc only every few steps)."""

    def __init__(self, steps: tuple[int, ...]):
        self.steps = steps
        self.tensors: dict[int, int] = {}
        self.rss: dict[int, int] = {}

    def post_step(self):
        step = self.trainer.global_step
        if step in self.steps:
            self.tensors[step] = _live_tensors()
            self.rss[step] = _rss_bytes()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_no_tensor_or_memory_growth_over_60_steps(tmp_path, data, monkeypatch):
    """60 steps of a real run in this process (olmo.launch.main: the train module, the loader and
    every callback a run has, validation and checkpoints every 10 steps), probed 5 steps after
    a checkpoint: anything the step, the module or a callback keeps per step shows as growth."""
    from olmo import launch

    probe = _MemoryProbe(steps=(15, 35, 55))
    build_callbacks = launch.build_callbacks
    monkeypatch.setattr(
        launch, "build_callbacks", lambda *a, **kw: {**build_callbacks(*a, **kw), "probe": probe}
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launcher would set the machine's count
    every = {"save_interval": 10, "eval_interval": 10}
    assert main([TEST_CONFIG, *tiny_overrides(tmp_path / "run", data, max_duration=60, **every)]) == 0
    assert ce_losses(tmp_path / "run")[-1][0] == 60
    # Non-increasing: a per-step leak of one tensor adds 20 between probes; one-off clean-ups
    # (olmo-core's and torch's caches settling after the first checkpoints) may lower the count.
    assert probe.tensors[15] >= probe.tensors[35] >= probe.tensors[55], probe.tensors
    assert probe.rss[55] - probe.rss[15] < 20 * 2**20, probe.rss


def test_moe_layers_keep_no_tensors_after_forward():
    from moe_model.moe import MoELayer

    model = _tiny_model()
    out = model(torch.randint(0, 512, (2, 32)))
    (out.logits.sum() + out.lb_loss + out.z_loss).backward()
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe_layers) == 2
    for module in model.modules():
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            assert not any(isinstance(v, torch.Tensor) for v in values), (type(module).__name__, name)


# ---- 9. determinism -----------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_losses_other_seed_differs(tmp_path, data, straight1):
    same = tmp_path / "same"
    _ok(_run(same, data, stop_at=3))
    assert ce_losses(same) == ce_losses(straight1)[:3]  # exact, on CPU
    other = tmp_path / "other"
    _ok(_run(other, data, stop_at=3, seed=4321))
    assert all(a != b for (_, a), (_, b) in zip(ce_losses(other), ce_losses(same)))
