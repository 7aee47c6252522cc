"""The save-folder layout: which directories are checkpoints."""

from olmo.run_files import checkpoint_step, find_checkpoints, save_dirs, step_dirs


def test_checkpoint_step():
    assert checkpoint_step("runs/x/step120") == 120
    assert checkpoint_step("step0") == 0
    for name in ("step12-tmp", "steps", "step", "model_and_optim", "xstep3"):
        assert checkpoint_step(name) is None


def test_step_dirs_sorted_numerically_and_complete_ones_only(tmp_path):
    for step in (100, 20, 3):
        (tmp_path / f"step{step}").mkdir()
    (tmp_path / "step5-tmp").mkdir()
    (tmp_path / "step7").write_text("a file, not a checkpoint")
    assert [p.name for p in step_dirs(tmp_path)] == ["step3", "step20", "step100"]
    # Only step20 has everything olmo-core writes, its metadata last.
    done = tmp_path / "step20"
    (done / "train").mkdir()
    (done / "train" / "rank0.pt").write_bytes(b"")
    (done / "model_and_optim").mkdir()
    (done / "model_and_optim" / ".metadata").write_bytes(b"")
    assert find_checkpoints(tmp_path) == []  # metadata not written yet: a crash mid-save
    (done / ".metadata.json").write_text("{}")
    assert find_checkpoints(tmp_path) == [done]
    assert find_checkpoints(tmp_path / "missing") == []


def test_save_dirs_include_interrupted_saves(tmp_path):
    """What save_overwrite removes of another run: finished and interrupted saves, nothing else."""
    for name in ("step4", "step8-tmp", "steps", "step2-old", "wandb"):
        (tmp_path / name).mkdir()
    (tmp_path / "step6").write_text("a file")
    assert [p.name for p in save_dirs(tmp_path)] == ["step4", "step8-tmp"]
    assert save_dirs(tmp_path / "missing") == []
