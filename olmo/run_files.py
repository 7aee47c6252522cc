"""The layout of a run's save folder, in one place.

    {save_folder}/config.yaml            the resolved TrainConfig (what resume checks against)
    {save_folder}/metrics.jsonl          one JSON object per step (rank 0)
    {save_folder}/stepN/                 a checkpoint: model_and_optim/ (DCP), train/, .metadata.json
    {save_folder}/wandb/, wandb_run_id   W&B files, and the run id a resumed run continues
    {save_folder}/data_work/             the data loader's cached shuffle orders

olmo-core's Checkpointer writes ``stepN-tmp/``, renames it to ``stepN/`` and writes
``.metadata.json`` last, so a directory without it (a crash mid-save) is not a checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

__all__ = [
    "CONFIG_FNAME",
    "DATA_WORK_DIR",
    "DCP_DIR",
    "METRICS_FNAME",
    "WANDB_DIR",
    "WANDB_RUN_ID_FNAME",
    "checkpoint_step",
    "find_checkpoints",
    "prune_checkpoints",
    "run_entries",
    "save_dirs",
    "step_dirs",
    "wandb_run_dirs",
]

CONFIG_FNAME = "config.yaml"
METRICS_FNAME = "metrics.jsonl"
WANDB_DIR = "wandb"
WANDB_RUN_ID_FNAME = "wandb_run_id"
DATA_WORK_DIR = "data_work"
DCP_DIR = "model_and_optim"
"""Inside ``stepN/``: the torch.distributed.checkpoint directory of model and optimizer."""

_STEP_DIR = re.compile(r"step(\d+)")
_SAVE_DIR = re.compile(r"step\d+(-tmp)?")


def checkpoint_step(path: str | Path) -> int | None:
    """N for a ``stepN`` directory, None for anything else (``stepN-tmp`` included)."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    return int(match[1]) if match else None


def step_dirs(save_folder: str | Path) -> list[Path]:
    """Every ``stepN`` directory in ``save_folder``, complete or not, oldest first."""
    save_folder = Path(save_folder)
    if not save_folder.is_dir():
        return []
    found = [p for p in save_folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def save_dirs(save_folder: str | Path) -> list[Path]:
    """Every directory a checkpoint save leaves: ``stepN`` and an interrupted save's ``stepN-tmp``."""
    save_folder = Path(save_folder)
    if not save_folder.is_dir():
        return []
    return sorted(p for p in save_folder.iterdir() if p.is_dir() and _SAVE_DIR.fullmatch(p.name))


def find_checkpoints(save_folder: str | Path) -> list[Path]:
    """Checkpoints training can resume from (olmo-core's metadata written last), oldest first."""
    from olmo_core.train.checkpoint import Checkpointer

    return [p for p in step_dirs(save_folder) if Checkpointer.dir_is_checkpoint(str(p))]


def run_entries(save_folder: str | Path) -> list[Path]:
    """What a run writes into ``save_folder`` (the layout above), whether present or not.

    save_overwrite moves exactly these aside; anything else in the folder is not a run's.
    """
    save_folder = Path(save_folder)
    names = (CONFIG_FNAME, METRICS_FNAME, WANDB_DIR, WANDB_RUN_ID_FNAME, DATA_WORK_DIR)
    return save_dirs(save_folder) + [save_folder / name for name in names]


def wandb_run_dirs(save_folder: str | Path) -> list[Path]:
    """The W&B directories of the run in ``save_folder`` (its id in ``wandb_run_id``), oldest first.

    Each session of a resumed run opens a directory of its own with the same id; together they
    hold the run's history.
    """
    save_folder = Path(save_folder)
    id_file = save_folder / WANDB_RUN_ID_FNAME
    if not id_file.is_file():
        return []
    run_id = id_file.read_text().strip()
    return sorted(p for p in (save_folder / WANDB_DIR).glob(f"*run-*-{run_id}") if p.is_dir())


def prune_checkpoints(save_folder: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints; return the removed ones.

    The metadata file goes first, as olmo-core does, so a removal cut short never leaves a
    directory that looks like a complete checkpoint.
    """
    from olmo_core.train.checkpoint import Checkpointer

    doomed = find_checkpoints(save_folder)[:-keep] if keep > 0 else []
    for path in doomed:
        (path / Checkpointer.METADATA_FNAME).unlink(missing_ok=True)
        shutil.rmtree(path)
    return doomed
