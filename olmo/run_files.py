"""The layout of a run's save folder, in one place.

    {save_folder}/config.yaml            the resolved TrainConfig (what resume checks against)
    {save_folder}/metrics.jsonl          one JSON object per step (rank 0)
    {save_folder}/stepN/                 a checkpoint: model_and_optim/ (DCP), train/, .metadata.json
    {save_folder}/wandb/, wandb_run_id   W&B files, and the run id a resumed run continues
    {save_folder}/data_work/             the data loader's cached shuffle orders

olmo-core's Checkpointer writes ``stepN-tmp/``, renames it to ``stepN/`` and writes
``.metadata.json`` last, so a directory without it (a crash mid-save) is not a checkpoint.

A save folder may also be an object-storage URL (``s3://bucket/run``; see
:mod:`olmo.remote_checkpoint`): the same names are object keys under it, each ``stepN/`` gets
its ``.metadata.json`` only after every rank's files are uploaded, and the files a run appends
to (metrics.jsonl, W&B) are written in :func:`local_run_dir` on the node and uploaded.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from olmo import object_store
from olmo.object_store import is_remote

__all__ = [
    "CONFIG_FNAME",
    "DATA_WORK_DIR",
    "DCP_DIR",
    "METRICS_FNAME",
    "WANDB_DIR",
    "WANDB_RUN_ID_FNAME",
    "checkpoint_step",
    "as_folder",
    "find_checkpoints",
    "prune_checkpoints",
    "run_entries",
    "local_run_dir",
    "remote_checkpoint_complete",
    "read_run_file",
    "remove_run_files",
    "write_run_file",
    "save_dirs",
    "saved_config",
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


def find_checkpoints(save_folder: str | Path) -> list:
    """Checkpoints training can resume from (olmo-core's metadata written last), oldest first:
    Paths, or URLs (str) for an object-storage save folder."""
    from olmo_core.train.checkpoint import Checkpointer

    if is_remote(save_folder):
        return [object_store.join(str(save_folder), f"step{n}") for n in remote_steps(str(save_folder), complete=True)]
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
def remote_steps(save_folder: str, *, complete: bool) -> list[int]:
    """Steps N with objects under ``save_folder/stepN/`` (``complete``: with its marker), sorted."""
    from olmo_core.train.checkpoint import Checkpointer

    prefix = object_store.ObjectURL.parse(object_store.join(save_folder, "")).key
    steps: dict[int, bool] = {}
    for obj in object_store.list_objects(object_store.join(save_folder, "")):
        top, _, rest = object_store.ObjectURL.parse(obj.url).key[len(prefix):].partition("/")
        if (n := checkpoint_step(top)) is not None:
            steps[n] = steps.get(n, False) or rest == Checkpointer.METADATA_FNAME
    return sorted(n for n, done in steps.items() if done or not complete)


def remote_checkpoint_complete(url: str) -> bool:
    """olmo-core's ``dir_is_checkpoint`` for a URL, through :mod:`olmo.object_store` (its own
    client is built once per process and keeps the first endpoint it saw)."""
    from olmo_core.train.checkpoint import Checkpointer

    if object_store.exists(object_store.join(url, ".metadata")):  # model (and optimizer) only
        return True
    needed = ("train/rank0.pt", f"{DCP_DIR}/.metadata", Checkpointer.METADATA_FNAME)
    return all(object_store.exists(object_store.join(url, name)) for name in needed)


def local_run_dir(save_folder: str | Path) -> Path:
    """Where this node keeps a run's working files: the save folder itself when it is local;
    for a URL, ``$MOE_LOCAL_RUN_DIR`` (default: the temp dir) / scheme / bucket / prefix."""
    if not is_remote(save_folder):
        return Path(save_folder)
    u = object_store.ObjectURL.parse(str(save_folder))
    root = os.environ.get("MOE_LOCAL_RUN_DIR") or os.path.join(tempfile.gettempdir(), "moe-polycom-runs")
    return Path(root) / u.scheme / u.bucket / u.key.strip("/")


def as_folder(save_folder: str | Path) -> Path | str:
    """A save folder as the functions here take it: a Path, or a URL string (a Path would fold
    the URL's ``//``)."""
    return str(save_folder) if is_remote(save_folder) else Path(save_folder)


def saved_config(save_folder: str | Path):
    """The TrainConfig in a save folder's config.yaml (a directory or a URL), None if absent."""
    from olmo.config import load_config

    if not is_remote(save_folder):
        path = Path(save_folder) / CONFIG_FNAME
        return load_config(path) if path.is_file() else None
    text = read_run_file(save_folder, CONFIG_FNAME)
    if text is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_config(f.name)


def read_run_file(save_folder: str | Path, name: str) -> str | None:
    """Text of ``save_folder/name`` (a file or an object), None if absent."""
    if is_remote(save_folder):
        url = object_store.join(str(save_folder), name)
        return object_store.get_bytes(url).decode() if object_store.exists(url) else None
    path = Path(save_folder) / name
    return path.read_text() if path.is_file() else None


def write_run_file(save_folder: str | Path, name: str, text: str) -> None:
    if is_remote(save_folder):
        object_store.put_bytes(object_store.join(str(save_folder), name), text.encode())
    else:
        (Path(save_folder) / name).write_text(text)


def remove_run_files(save_folder: str, names: list[str]) -> None:
    """Delete a remote save folder's checkpoints (marker first) and the named objects."""
    from olmo_core.train.checkpoint import Checkpointer

    for n in remote_steps(save_folder, complete=False):
        object_store.delete_prefix(object_store.join(save_folder, f"step{n}"), first=(Checkpointer.METADATA_FNAME,))
    for name in names:
        object_store.delete_object(object_store.join(save_folder, name))
