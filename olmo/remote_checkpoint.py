"""Checkpoints to object storage that become visible only when complete, uploaded in the
background.

olmo-core 3.0.0's Checkpointer accepts an ``s3://`` save folder, but its remote save is not
sound for this project's guarantees: each rank uploads its ``train/rankN.pt`` after the DCP
write with no barrier before rank 0 writes ``.metadata.json``, so a rank killed mid-upload
can leave a checkpoint that looks complete without its train state (``dir_is_checkpoint``
checks rank 0's file only); its upload retries three times and every upload blocks training.
Its readers (``Checkpointer.load`` over ``RemoteFileSystemReader``, ``find_checkpoints``,
``dir_is_checkpoint``) are sound and are reused for resume.

Here a save of ``stepN`` to a URL:

1. (rank 0) deletes a leftover incomplete ``stepN/`` (an earlier save cut short), then barrier;
2. every rank writes its train state and DCP shard into a local staging directory under the
   trainer's work dir -- the same work as a local save, and all of what training waits for;
3. in a background thread each rank uploads its files (retried with backoff,
   :mod:`olmo.object_store`) and then its ``stepN/.uploaded/rankR`` marker; rank 0 waits for
   every rank's marker and writes ``stepN/.metadata.json`` last.

A checkpoint is complete exactly when ``.metadata.json`` exists, which is what resume and
keep-last-k (olmo-core's CheckpointerCallback, which deletes old checkpoints only once the new
one's future is done) look at. A failed upload raises from the future: training stops with a
one-line ObjectStoreError at the next checkpoint boundary, and the checkpoint stays invisible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from olmo_core.distributed.checkpoint import save_state_dict
from olmo_core.distributed.utils import barrier, get_rank, get_world_size
from olmo_core.train.checkpoint import Checkpointer, CheckpointMetadata

from moe_model.errors import ObjectStoreError
from olmo import object_store
from olmo.object_store import is_remote, join

__all__ = ["UPLOADED_DIR", "DoneWhenAwaited", "RemoteCheckpointer", "upload_fault_step"]

log = logging.getLogger(__name__)

UPLOADED_DIR = ".uploaded"
"""Inside a remote ``stepN/``: one empty object per rank whose files are all uploaded."""
FAULT_ENV = "MOE_FAULT_UPLOAD"
"""Tests: ``STEP`` makes every rank exit (code 3, no clean-up) after uploading its first file of
that step's checkpoint, once every rank has uploaded one -- a job killed mid-upload."""


def upload_fault_step() -> int | None:
    value = os.environ.get(FAULT_ENV)
    return int(value) if value else None


class DoneWhenAwaited(Future):
    """A future that completes when the training thread waits for it, not when the background
    upload finishes.

    olmo-core's trainer records ``checkpoint/save_async_duration_s`` and calls every
    ``post_checkpoint_saved`` from the save future's done-callback, which runs on whichever
    thread completes the future. On the upload thread that happens at a step that differs
    between ranks, so one rank reduces metrics of a step the other has already reduced:
    mismatched gloo collectives (``op.preamble.length <= op.nbytes``, then SIGABRT) or silently
    wrong sums. Completing here, inside ``result()``, puts that bookkeeping at the same step on
    every rank: the next save or the end of training, where the checkpointer callback waits.
    """

    def __init__(self, upload: Future):
        super().__init__()
        self._upload = upload
        self.set_running_or_notify_cancel()  # an upload in flight cannot be cancelled

    def result(self, timeout: float | None = None):
        if not self.done():
            try:
                value = self._upload.result(timeout)
            except FutureTimeoutError:
                raise
            except BaseException as err:
                self.set_exception(err)
            else:
                self.set_result(value)
        return super().result()

    def exception(self, timeout: float | None = None):
        try:
            self.result(timeout)
        except FutureTimeoutError:
            raise
        except BaseException:
            pass
        return super().exception()


@dataclass
class RemoteCheckpointer(Checkpointer):
    """olmo-core's Checkpointer; saves to a URL as the module docstring says, local saves as before."""

    marker_timeout_s: float = float(os.environ.get("MOE_UPLOAD_MARKER_TIMEOUT", 3600))
    """How long rank 0 waits for the other ranks' upload markers before reporting them missing."""
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    _pending: Future | None = field(default=None, repr=False)

    @classmethod
    def replacing(cls, checkpointer: Checkpointer) -> RemoteCheckpointer:
        """The same settings as olmo-core's ``checkpointer`` (what TrainerConfig built)."""
        import dataclasses

        return cls(**{f.name: getattr(checkpointer, f.name) for f in dataclasses.fields(checkpointer) if f.init})

    def save(self, dir, train_module, train_state: dict[str, Any], ephemeral: bool = False):
        if not is_remote(str(dir)):
            return super().save(dir, train_module, train_state, ephemeral=ephemeral)
        self.save_async(dir, train_module, train_state, ephemeral=ephemeral).result()

    def save_async(self, dir, train_module, train_state: dict[str, Any], ephemeral: bool = False) -> Future:
        if not is_remote(str(dir)):
            return super().save_async(dir, train_module, train_state, ephemeral=ephemeral)
        dir = str(dir).rstrip("/")
        self.wait_for_uploads()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if get_rank() == 0:
            self._clear_incomplete(dir)
        barrier()
        stage = self._stage(dir, train_module, train_state)
        pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._pool = pool
        self._pending = pool.submit(self._upload, dir, stage, ephemeral)
        return DoneWhenAwaited(self._pending)

    def wait_for_uploads(self) -> None:
        """Block until the last background upload is done; raise its error if it failed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    # -- steps --------------------------------------------------------------------------------

    def _clear_incomplete(self, dir: str) -> None:
        if object_store.exists(join(dir, self.METADATA_FNAME)):
            if not self.save_overwrite:
                raise ObjectStoreError(f"{dir}: a complete checkpoint is already there")
        removed = object_store.delete_prefix(dir, first=(self.METADATA_FNAME,))
        if removed:
            log.warning(f"Removed {removed} object(s) of an incomplete earlier save at {dir}")

    def _stage(self, dir: str, train_module, train_state: dict[str, Any]) -> Path:
        """Write this rank's files locally, as a local save would; returns the staging dir."""
        stage = Path(self.work_dir) / "upload" / f"{Path(dir).name}-rank{get_rank()}"
        if stage.exists():
            shutil.rmtree(stage)
        (stage / "train").mkdir(parents=True)
        torch.save(train_state, stage / "train" / f"rank{get_rank()}.pt")
        # Each rank writes its DCP shard files into its own directory; rank 0 (the coordinator)
        # also writes .metadata. The shard names already carry the rank, so uploading every
        # rank's directory into one stepN/model_and_optim/ reassembles the checkpoint.
        (stage / "model_and_optim").mkdir()
        save_state_dict(stage / "model_and_optim", train_module.state_dict_to_save(),
                        process_group=self.process_group, thread_count=self.save_thread_count,
                        enable_plan_caching=True, _skip_prepare=True)  # fmt: skip
        return stage

    def _upload(self, dir: str, stage: Path, ephemeral: bool) -> None:
        rank, start = get_rank(), time.perf_counter()
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        fault = upload_fault_step()
        for i, path in enumerate(files):
            object_store.upload_file(path, join(dir, path.relative_to(stage).as_posix()))
            if fault is not None and dir.endswith(f"/step{fault}") and i == 0:
                # Exit only once every rank has a file there, so what the test finds does not
                # depend on which rank torchrun sees die first (it then stops the others).
                deadline = time.monotonic() + 120
                while (
                    len(object_store.list_objects(join(dir, ""))) < get_world_size()
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.1)
                print(f"{FAULT_ENV}: rank {rank} exits after uploading {path.name}",
                      file=sys.stderr, flush=True)  # fmt: skip
                os._exit(3)
        object_store.put_bytes(join(dir, UPLOADED_DIR, f"rank{rank}"), b"")
        if rank == 0:
            self._await_markers(dir)
            # The marker last: only now is stepN a checkpoint (resume, keep-last-k, load_path).
            metadata = json.dumps(CheckpointMetadata(ephemeral=ephemeral).as_dict(json_safe=True))
            object_store.put_bytes(join(dir, self.METADATA_FNAME), metadata.encode())
        shutil.rmtree(stage, ignore_errors=True)
        log.info(f"Uploaded {len(files)} file(s) of rank {rank} to {dir} in {time.perf_counter() - start:.1f}s")

    def _await_markers(self, dir: str) -> None:
        world = get_world_size()
        deadline = time.monotonic() + self.marker_timeout_s
        while True:
            done = {o.url.rsplit("/", 1)[-1] for o in object_store.list_objects(join(dir, UPLOADED_DIR, ""))}
            missing = [r for r in range(world) if f"rank{r}" not in done]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise ObjectStoreError(
                    f"{dir}: rank(s) {missing} did not finish uploading within {self.marker_timeout_s:.0f}s; "
                    f"the checkpoint is left incomplete (no {self.METADATA_FNAME})"
                )
            time.sleep(0.2)


_FETCHED = ".fetched"
_MODEL_FILES = (".metadata.json", "model_and_optim/.metadata", ".metadata", "model/.metadata", "model.safetensors")


def fetch_checkpoint(url: str) -> Path:
    """A local copy of the checkpoint ``url`` designates, for the readers of
    :mod:`olmo.checkpoint_io` (export, generation, analysis): a save folder's newest complete
    ``stepN``, a ``stepN``, or a model-only / unsharded directory, plus the run's config.yaml
    (in it or up to three levels above). Copied once into :func:`olmo.run_files.local_run_dir`'s
    mirror of the URL; the trainer state (``train/``) is left out."""
    from moe_model.errors import CheckpointError
    from olmo.run_files import CONFIG_FNAME, find_checkpoints, local_run_dir

    url = url.rstrip("/")
    target = url
    if not any(object_store.exists(join(url, f)) for f in _MODEL_FILES):
        found = find_checkpoints(url)
        if not found:
            raise CheckpointError(
                f"{url!r} holds no complete checkpoint (expected a save folder with stepN/ and "
                f"{Checkpointer.METADATA_FNAME}, a stepN, or a model directory)"
            )
        target = found[-1]
    local = local_run_dir(target)
    if not (local / _FETCHED).is_file():
        prefix = object_store.ObjectURL.parse(join(target, "")).key
        for obj in object_store.list_objects(join(target, "")):
            rel = object_store.ObjectURL.parse(obj.url).key[len(prefix):]
            if not rel.startswith(("train/", f"{UPLOADED_DIR}/")):
                object_store.download_file(obj.url, local / rel)
        (local / _FETCHED).write_text(target)
    parent = target
    for _ in range(4):
        config = join(parent, CONFIG_FNAME)
        if object_store.exists(config):
            object_store.download_file(config, local_run_dir(parent) / CONFIG_FNAME)
            break
        parent = parent.rsplit("/", 1)[0]
        if parent.endswith(":/"):
            break
    return local
