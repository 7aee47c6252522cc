"""Read and write model checkpoints outside the trainer: on CPU, in one process, no process group.

Three on-disk forms of one model:

* **sharded** (what training writes): ``{save_folder}/stepN/model_and_optim/`` is a
  torch.distributed.checkpoint (DCP) directory with keys ``model.<param>`` and ``optim.*``;
  ``{save_folder}/config.yaml`` is the resolved TrainConfig.
* **unsharded**: a directory with ``model.safetensors`` (parameter names as in
  ``MoETransformer.state_dict()``) and ``config.yaml`` (the TrainConfig). Made by
  :func:`unshard` / ``scripts/unshard.py``.
* **model-only DCP** (what ``scripts/convert_from_hf.py`` writes): ``{dir}/model/``, a DCP
  directory with ``model.*`` keys and no optimizer or trainer state -- olmo-core's "just the
  model" checkpoint form -- plus ``{dir}/config.yaml``; training continues from it with
  ``--load_path={dir}/model``, at step 0 with a fresh optimizer.

Any reader here accepts a save folder (its latest ``stepN`` is used), a ``stepN`` directory, a
``model_and_optim`` directory or an unsharded directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_model.config import ModelConfig
from moe_model.errors import CheckpointError, OutputExistsError, project_error_behind
from moe_model.hf.files import (
    DictSource,
    PlannedTensor,
    SafetensorsSource,
    TensorSource,
    atomic_output_dir,
    plan_rename,
    write_safetensors,
)
from moe_model.transformer import MoETransformer
from olmo.object_store import is_remote
from olmo.run_files import CONFIG_FNAME, DCP_DIR, step_dirs

if TYPE_CHECKING:
    from olmo.config import TrainConfig

__all__ = [
    "WEIGHTS_FNAME",
    "CheckpointError",
    "DCPSource",
    "find_config",
    "load_checkpoint",
    "load_model",
    "load_model_config",
    "load_state_dict",
    "load_train_config",
    "open_checkpoint",
    "resolve_checkpoint",
    "save_model_dcp",
    "save_unsharded",
    "unshard",
]

WEIGHTS_FNAME = "model.safetensors"
MODEL_ONLY_DIR = "model"
MODEL_PREFIX = "model."


def _is_dcp(path: Path) -> bool:
    return (path / ".metadata").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The DCP directory or unsharded directory that ``path`` designates (an s3:// URL: of a
    local copy, fetched once)."""
    path = _localize(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is not a directory")
    if _is_dcp(path) or (path / WEIGHTS_FNAME).is_file():
        return path
    for sub in (DCP_DIR, MODEL_ONLY_DIR):
        if _is_dcp(path / sub):
            return path / sub
    # Readable model weights are enough here (trainer state is not needed to read a model).
    steps = [p for p in step_dirs(path) if _is_dcp(p / DCP_DIR)]
    if steps:
        return steps[-1] / DCP_DIR
    raise CheckpointError(
        f"{str(path)!r} holds no checkpoint: expected a save folder with stepN/{DCP_DIR}/, a stepN "
        f"directory, a {DCP_DIR} directory, or a directory with {WEIGHTS_FNAME}"
    )


def _localize(path: str | Path) -> Path:
    if is_remote(str(path)):
        from olmo.remote_checkpoint import fetch_checkpoint

        return fetch_checkpoint(str(path))
    return Path(path)


def find_config(path: str | Path) -> Path:
    """The config.yaml of a checkpoint: in the directory or up to three levels above it."""
    start = _localize(path).resolve()
    for parent in [start, *list(start.parents)[:3]]:
        candidate = parent / CONFIG_FNAME
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no {CONFIG_FNAME} in {str(path)!r} or the three directories above it")


def load_train_config(path: str | Path) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (its run's config.yaml)."""
    from olmo.config import load_config

    return load_config(find_config(path))


def load_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint (from its TrainConfig YAML)."""
    return load_train_config(path).model


@contextlib.contextmanager
def _project_errors_from_dcp():
    """Re-raise a project error that DCP wrapped, so the CLI prints it as its one line.

    DCP runs the planner and writer inside its own try blocks and raises a CheckpointException
    (a BaseException) holding each rank's failure; olmo-core's writer further replaces the
    error with an OLMoCheckpointError whose context is the original. A ConversionError from a
    tensor made during the write (a source file cut short) would otherwise be a traceback.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        found = project_error_behind(err)
        if found is None:
            raise
        raise found from None


def _dcp_model_metas(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """Shape and dtype (as meta tensors) of every ``model.*`` tensor of a DCP checkpoint."""
    from olmo_core.distributed.checkpoint.filesystem import RemoteFileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # olmo-core's reader: the trainer writes with olmo-core's RemoteFileSystemWriter, whose
    # storage records torch's own FileSystemReader cannot read (torch 2.13).
    metadata = RemoteFileSystemReader(str(dcp_dir)).read_metadata()
    metas = {
        # DCP records the global shape of every (FSDP/DTensor-sharded) parameter: reading into
        # a full tensor gathers all shards.
        key[len(MODEL_PREFIX):]: torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not metas:
        raise CheckpointError(f"DCP checkpoint {str(dcp_dir)!r} has no '{MODEL_PREFIX}*' tensors")
    return metas


def _read_dcp(dcp_dir: Path, metas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model tensors named in ``metas``, unsharded, as plain CPU tensors."""
    import torch.distributed.checkpoint as dcp
    from olmo_core.distributed.checkpoint.filesystem import RemoteFileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    state = {MODEL_PREFIX + k: torch.empty(m.shape, dtype=m.dtype) for k, m in metas.items()}
    # allow_partial_load: the optimizer and trainer entries (and other tensors) are left out.
    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming ... a single process": intended.
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        with _project_errors_from_dcp():
            dcp.load(state, storage_reader=RemoteFileSystemReader(str(dcp_dir)),
                     planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items()}


class DCPSource:
    """The model tensors of a DCP checkpoint, read one at a time (a :class:`TensorSource`)."""

    def __init__(self, dcp_dir: str | Path):
        self.dcp_dir = Path(dcp_dir)
        self._metas = _dcp_model_metas(self.dcp_dir)

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, key: str) -> torch.Tensor:
        return self._metas[key]

    def get(self, key: str) -> torch.Tensor:
        return _read_dcp(self.dcp_dir, {key: self._metas[key]})[key]


def open_checkpoint(path: str | Path) -> TensorSource:
    """The model tensors of any checkpoint form, unread: a DCP or an unsharded directory."""
    ckpt = resolve_checkpoint(path)
    if (ckpt / WEIGHTS_FNAME).is_file() and not _is_dcp(ckpt):
        return SafetensorsSource([ckpt / WEIGHTS_FNAME])
    return DCPSource(ckpt)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state dict (parameter name -> CPU tensor) from any checkpoint form."""
    ckpt = resolve_checkpoint(path)
    if (ckpt / WEIGHTS_FNAME).is_file() and not _is_dcp(ckpt):
        from safetensors.torch import load_file

        return load_file(ckpt / WEIGHTS_FNAME)
    return _read_dcp(ckpt, _dcp_model_metas(ckpt))


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> MoETransformer:
    """The trained model in eval mode; ``dtype`` casts the parameters (None keeps them).

    Built on the meta device and filled with ``assign=True``: no random init is computed and a
    missing or extra parameter (e.g. a PolyNorm coefficient) is an error.
    """
    return load_checkpoint(path, device, dtype=dtype)[0]


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    config_path: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[MoETransformer, TrainConfig]:
    """(model in eval mode, TrainConfig) of any checkpoint form; ``config_path`` overrides the
    run's saved config.yaml (e.g. for a checkpoint copied without it)."""
    from olmo.config import load_config

    cfg = load_config(config_path) if config_path is not None else load_train_config(path)
    model = cfg.model.build(init_device="meta")
    model.load_state_dict(load_state_dict(path), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval(), cfg


def _as_plan(tensors: dict[str, torch.Tensor] | list[PlannedTensor]) -> list[PlannedTensor]:
    if isinstance(tensors, dict):
        return plan_rename(DictSource(tensors), lambda k: k)
    return tensors


def save_unsharded(
    tensors: dict[str, torch.Tensor] | list[PlannedTensor], config_yaml: str, out_dir: str | Path
) -> Path:
    """Write ``model.safetensors`` + ``config.yaml`` (a TrainConfig YAML) into ``out_dir``.

    ``tensors``: a state dict, or a plan whose tensors are made and written one at a time.
    """
    from olmo.config import load_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FNAME).write_text(config_yaml)
    model_config = load_config(out_dir / CONFIG_FNAME).model
    # The model config rides along in the file's metadata, so the weights file alone is usable.
    metadata = {"format": "pt", "model_config": json.dumps(dataclasses.asdict(model_config))}
    write_safetensors(out_dir / WEIGHTS_FNAME, _as_plan(tensors), metadata)
    return out_dir


def unshard(path: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A sharded training checkpoint -> one ``model.safetensors`` + ``config.yaml``, streamed
    tensor by tensor; ``out_dir`` appears only when complete."""
    plan = plan_rename(open_checkpoint(path), lambda k: k, dtype)
    config_yaml = find_config(path).read_text()
    with atomic_output_dir(out_dir) as tmp:
        save_unsharded(plan, config_yaml, tmp)
    return Path(out_dir)


def _lazy_save_planner(plan: dict[str, PlannedTensor]):
    """torch.distributed.checkpoint's default planner, except that each planned tensor is made
    only when the writer asks for it (the state dict handed to DCP holds meta tensors)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class LazySavePlanner(DefaultSavePlanner):
        def lookup_object(self, index):
            planned = plan.get(index.fqn)
            return planned.build() if planned is not None else super().lookup_object(index)

    return LazySavePlanner()


def save_model_dcp(
    tensors: dict[str, torch.Tensor] | list[PlannedTensor], config_yaml: str, out_dir: str | Path
) -> Path:
    """Write a model-only checkpoint ``{out_dir}/model/`` + ``{out_dir}/config.yaml``.

    The DCP holds ``model.*`` and ``train_module.skipped_steps`` (what olmo.train_module saves
    besides the optimizer); no optimizer and no trainer state, so ``--load_path={out_dir}/model``
    starts at step 0 with a fresh optimizer and the configured warm-up. Written with olmo-core's
    writer, which the trainer's loader reads, one tensor at a time (one writer thread): a plan's
    tensors are made as they are written. Returns the ``model`` directory.
    """
    import torch.distributed.checkpoint as dcp
    from olmo_core.distributed.checkpoint.filesystem import RemoteFileSystemWriter

    out_dir = Path(out_dir)
    target = out_dir / MODEL_ONLY_DIR
    if target.exists():
        raise OutputExistsError(f"{str(target)!r} exists; pick a new output directory")
    target.mkdir(parents=True)
    plan = _as_plan(tensors)
    state = {
        "model": {p.name: torch.empty(p.shape, dtype=p.dtype, device="meta") for p in plan},
        "train_module": {"skipped_steps": 0},
    }
    planner = _lazy_save_planner({MODEL_PREFIX + p.name: p for p in plan})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        with _project_errors_from_dcp():
            dcp.save(state, storage_writer=RemoteFileSystemWriter(str(target), thread_count=1),
                     planner=planner, no_dist=True)
    (out_dir / CONFIG_FNAME).write_text(config_yaml)
    return target
