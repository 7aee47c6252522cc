"""Datasets, the collator and the resumable loaders olmo-core's Trainer reads."""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from olmo_core.data import DataCollator, NumpyFSLDataLoader, NumpyFSLDataset
from olmo_core.data.data_loader import DataLoaderBase

from moe_model import attention
from moe_model.errors import DataError
from olmo import object_store
from olmo.data.config import DataConfig
from olmo.data.files import _check_positive, resolve_dtype, resolve_paths
from olmo.data.mixture import _MIXTURE_ORDER, Mixture
from olmo.data.plan import DataPlan, plan_data
from olmo.token_files import ObjectStoreReads

log = logging.getLogger(__name__)


class FSLDataset(ObjectStoreReads, NumpyFSLDataset):
    """olmo-core's fixed-length dataset over local files and object URLs."""

    @property
    def fingerprint(self) -> str:
        """olmo-core's fingerprint as NumpyFSLDataset computes it (it hashes the class name
        first: this subclass keeps that name so that checkpoints of runs made before it resume),
        plus the objects' ETags."""
        sha = hashlib.sha256(f"class={NumpyFSLDataset.__name__}".encode())
        for name in self.fingerprint_fields:
            sha.update(f"{name}={getattr(self, name)},".encode())
        for path, size in zip(self.paths, self.file_sizes, strict=True):
            sha.update(f"path={os.path.basename(path)},size={size},".encode())
        return self.with_etags(sha.hexdigest())


class MixtureDataset(FSLDataset):
    """Fixed-length sequences of a planned :class:`Mixture`, each tagged with its source index.

    Indices run source by source (config order); within a source, over its selected sequences
    (:meth:`MixtureSource.pool_index`). The loader shuffles them globally like any FSL dataset
    and reads them through :meth:`item` with its epoch and seed, so that a source larger than
    its share serves a different part of itself in each pass; `dataset[i]` is the first pass's
    item under `seed`.
    olmo-core's `NumpyFSLDatasetMixture` is not used: in 3.0.0 its `prepare()` reads every file
    end to end to write per-file document indices that its reads never consult, and its
    items carry no source.
    """

    def __init__(
        self, mixture: Mixture, *, pad_token_id: int, eos_token_id: int, vocab_size: int,
        dtype: type, seed: int = 0, cache_dir: str | None = None,
    ):  # fmt: skip
        super().__init__(
            *(p for src in mixture.sources for p in src.paths),
            sequence_length=mixture.sequence_length,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            vocab_size=vocab_size,
            dtype=dtype,
            include_instance_metadata=False,
        )
        self.mixture = mixture
        self.seed = seed
        self.cache_dir = cache_dir
        self._source_starts = np.cumsum([0] + [src.selected for src in mixture.sources])
        self._file_starts = [np.cumsum([0, *src.file_sequences]) for src in mixture.sources]

    @property
    def file_sizes(self) -> tuple[int, ...]:
        return tuple(b for src in self.mixture.sources for b in src.file_bytes)

    @property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        raise NotImplementedError("a mixture's sequences are not contiguous ranges of its files")

    @property
    def fingerprint(self) -> str:
        """Changes when any source's name, share of the pass, file names or sizes, or the
        selection rule's version change."""
        sha = hashlib.sha256(f"class={type(self).__name__}".encode())
        # The rule that picks each pass's sequences (MixtureSource.pool_index): checkpoints
        # written under another rule would resume onto other sequences.
        sha.update(f"order={_MIXTURE_ORDER},".encode())
        for name in self.fingerprint_fields:
            sha.update(f"{name}={getattr(self, name)},".encode())
        for src in self.mixture.sources:
            sha.update(f"source={src.name},selected={src.selected},".encode())
            for path, size in zip(src.paths, src.file_bytes):
                sha.update(f"path={os.path.basename(path)},size={size},".encode())
                if etag := self.object_info(path).etag:  # objects only: local fingerprints unchanged
                    sha.update(f"etag={etag},".encode())
        return sha.hexdigest()

    def __len__(self) -> int:
        return self.mixture.num_sequences

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, epoch=1, seed=self.seed)

    def item(self, index: int, *, epoch: int, seed: int) -> dict[str, Any]:
        """Sequence `index` of pass `epoch` (1-based) under data seed `seed`, with its source index."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{index} is out of bounds for a mixture of {len(self)} sequences")
        s = int(np.searchsorted(self._source_starts, index, side="right")) - 1
        src = self.mixture.sources[s]
        pool = src.pool_index(index - int(self._source_starts[s]), epoch=epoch, seed=seed)
        f = int(np.searchsorted(self._file_starts[s], pool, side="right")) - 1
        input_ids = self._read_chunk_from_array(src.paths[f], pool - int(self._file_starts[s][f]))
        return {"input_ids": input_ids, "source": s}


@dataclass
class BatchCollator(DataCollator):
    """olmo-core's collator plus what the data layer knows about each row: with `with_source`,
    its mixture source ("source", LongTensor [B]); with `eos_token_id`, the document of every
    token ("doc_ids", LongTensor [B, S], moe_model.attention.document_ids: documents end at
    the EOS the files were written with) for document masking, as olmo-core's loader puts
    "doc_lens" in its batches."""

    with_source: bool = False
    eos_token_id: Optional[int] = None  # noqa: UP045 (a dataclass field like its parent's)

    def __call__(self, items):
        batch = super().__call__(items)
        if self.with_source:
            batch["source"] = torch.tensor([item["source"] for item in items], dtype=torch.long)
        return self.add_documents(batch)

    def add_documents(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with "doc_ids" when the collator marks documents (its eos_token_id is set)."""
        if self.eos_token_id is not None:
            batch["doc_ids"] = attention.document_ids(batch["input_ids"], self.eos_token_id)
        return batch


def _file_list(dataset: FSLDataset) -> list[list[Any]]:
    """[basename, bytes] per file (plus the ETag of an object), as the fingerprint sees them;
    kept to explain a mismatch.

    A mixture's files are named `source/basename`.
    """
    if isinstance(dataset, MixtureDataset):
        named = [(f"{src.name}/{os.path.basename(p)}", p, int(b))
                 for src in dataset.mixture.sources for p, b in zip(src.paths, src.file_bytes)]  # fmt: skip
    else:
        named = [(os.path.basename(str(p)), str(p), int(s)) for p, s in zip(dataset.paths, dataset.file_sizes)]
    return [[name, size, *([etag] if (etag := dataset.object_info(p).etag) else [])] for name, p, size in named]


def _describe_mixture_change(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    parts = []
    if gone := [n for n in saved if n not in now]:
        parts.append(f"source(s) {gone} gone")
    if new := [n for n in now if n not in saved]:
        parts.append(f"source(s) {new} new")
    for name in (n for n in now if n in saved):
        before, after = saved[name]["sequences"], now[name]["sequences"]
        if before != after:
            parts.append(f"source '{name}': {before:,d} -> {after:,d} sequences per pass")
    return parts


def _describe_change(
    saved: list[list[Any]],
    now: list[list[Any]],
    saved_mixture: dict[str, Any] | None = None,
    now_mixture: dict[str, Any] | None = None,
) -> str:
    # name -> bytes, and name -> ETag for objects (checkpoints before ETags have none).
    saved_d, now_d = {e[0]: e[1] for e in saved}, {e[0]: e[1] for e in now}
    saved_tags, now_tags = {e[0]: e[2] for e in saved if len(e) > 2}, {e[0]: e[2] for e in now if len(e) > 2}
    parts = _describe_mixture_change(saved_mixture or {}, now_mixture or {})
    if removed := [n for n in saved_d if n not in now_d]:
        parts.append(f"{len(removed)} file(s) gone (e.g. {removed[0]})")
    if added := [n for n in now_d if n not in saved_d]:
        parts.append(f"{len(added)} file(s) new (e.g. {added[0]})")
    if resized := [n for n in now_d if n in saved_d and now_d[n] != saved_d[n]]:
        n = resized[0]
        parts.append(
            f"{len(resized)} file(s) resized (e.g. {n}: {saved_d[n]:,d} -> {now_d[n]:,d} bytes)"
        )
    if rewritten := [n for n in now_tags if n in saved_tags and now_d[n] == saved_d.get(n)
                     and now_tags[n] != saved_tags[n]]:  # fmt: skip
        n = rewritten[0]
        parts.append(f"{len(rewritten)} object(s) rewritten (e.g. {n}: ETag {saved_tags[n]} -> {now_tags[n]})")
    if not parts:
        parts.append(
            "same files and sizes in a different order, different token ids/dtype, or a mixture "
            "order of an older version"
        )
    return "; ".join(parts)


class TrainDataLoader(NumpyFSLDataLoader):
    """olmo-core's FSL loader whose resume check explains what changed and raises DataError."""

    def _mixture_summary(self) -> dict[str, Any] | None:
        if isinstance(self.dataset, MixtureDataset):
            return self.dataset.mixture.summary()
        return None

    def get_mock_batch(self) -> dict[str, Any]:
        # olmo-core's trainer runs one random batch before training, not through the collator;
        # document masking needs its documents all the same.
        return self.collator.add_documents(super().get_mock_batch())

    def _get_dataset_item(self, idx: int) -> dict[str, Any]:
        if isinstance(self.dataset, MixtureDataset):
            # The loader's epoch and seed, not the dataset's: both are restored from a checkpoint
            # (the seed too, by olmo-core), and workers receive them with the pickled loader.
            return {**self.dataset.item(idx, epoch=self.epoch, seed=self.seed), "index": idx}
        return super()._get_dataset_item(idx)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["data_files"] = _file_list(self.dataset)  # type: ignore[arg-type]
        if (mixture := self._mixture_summary()) is not None:
            # The realised per-source counts, kept with the checkpoint as a record of the run.
            state["mixture"] = mixture
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # olmo-core compares a fingerprint of (file basenames, sizes, vocab, dtype, ...) and
        # raises a RuntimeError without saying what differs; check first, naming the change.
        saved = state_dict.get("dataset_fingerprint")
        if saved is not None and saved != self.dataset.fingerprint:
            what = _describe_change(
                state_dict.get("data_files", []),
                _file_list(self.dataset),  # type: ignore[arg-type]
                state_dict.get("mixture"),
                self._mixture_summary(),
            )
            key = "data.sources" if isinstance(self.dataset, MixtureDataset) else "data.paths"
            if not self.ignore_fingerprint_mismatch:
                raise DataError(
                    f"{key}: the training data differs from the checkpoint's ({what}); "
                    f"expected the same files to resume the data order exactly, or set "
                    f"data.ignore_fingerprint_mismatch=true to continue on the new data"
                )
            log.warning(
                "Resuming onto changed training data (%s): the position is kept in batches, "
                "but the sequences differ from an uninterrupted run.",
                what,
            )
        try:
            super().load_state_dict(state_dict)
        except (RuntimeError, KeyError) as e:
            raise DataError(f"data loader state in the checkpoint cannot be restored: {e}") from e


class EvalDataLoader(NumpyFSLDataLoader):
    """Unshuffled FSL loader that pads the last batch so every sequence is evaluated exactly once.

    olmo-core's loader drops the tail that does not fill a global batch; for evaluation that
    would silently skip data, and an uneven tail would give ranks different batch counts (a
    collective hang). Padding rows carry instance_mask=False instead.
    """

    @property
    def total_size(self) -> int:
        per_batch = self.global_batch_size // self.dataset.sequence_length  # type: ignore[attr-defined]
        return -(-len(self.dataset) // per_batch) * per_batch

    @property
    def _global_indices_file(self) -> Path:
        # The content depends only on (dataset size, padded size), so eval sets of equal size
        # may share the file; it must not collide with the train loader's unshuffled name.
        return self.work_dir / f"eval_indices_size{len(self.dataset)}_total{self.total_size}_v1.npy"

    def _build_global_indices(self) -> np.ndarray:
        # Padding indices point one past the end; _get_dataset_item turns them into pad rows.
        indices = np.full(self.total_size, len(self.dataset), dtype=np.uint32)
        indices[: len(self.dataset)] = np.arange(len(self.dataset), dtype=np.uint32)
        return indices

    def _get_dataset_item(self, idx: int) -> dict[str, Any]:
        if idx >= len(self.dataset):
            seq_len = self.dataset.sequence_length  # type: ignore[attr-defined]
            pad = torch.full((seq_len,), self.dataset.pad_token_id, dtype=torch.long)
            return {"input_ids": pad, "index": idx, "instance_mask": False}
        return {**super()._get_dataset_item(idx), "instance_mask": True}


def _build_dataset(
    cfg: DataConfig, paths: list[str], *, sequence_length: int, vocab_size: int, work_dir: Path
) -> NumpyFSLDataset:
    dataset = FSLDataset(
        *paths,
        sequence_length=sequence_length,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        vocab_size=vocab_size,
        dtype=resolve_dtype(cfg.dtype, vocab_size),
        # Metadata would add a per-row list of dicts to every batch; nothing here reads it.
        include_instance_metadata=False,
    )
    dataset.work_dir = work_dir
    dataset.cache_dir = cfg.cache_dir
    dataset.prepare()
    return dataset


REMOTE_READER_THREADS = 16
"""Reader threads per loader when token files are objects: each sequence is one ranged GET, so
reading is bound by request latency, not CPU; olmo-core's default (None: 4 threads) stays for
local files."""


def _reader_threads(dataset: NumpyFSLDataset) -> int | None:
    if dataset.cache_dir is None and any(object_store.is_remote(p) for p in dataset.paths):
        return REMOTE_READER_THREADS
    return None


def _collator(cfg: DataConfig, vocab_size: int, *, document_ids: bool, with_source: bool = False) -> BatchCollator:
    return BatchCollator(
        pad_token_id=cfg.pad_token_id, vocab_size=vocab_size, with_source=with_source,
        eos_token_id=cfg.eos_token_id if document_ids else None,
    )  # fmt: skip


def _check_split(batch_size: int, dp_world_size: int, name: str) -> None:
    if batch_size % dp_world_size != 0:
        raise DataError(
            f"{name} is {batch_size} sequences, expected a multiple of the data-parallel world "
            f"size {dp_world_size} so every rank gets an equal share"
        )


def build_train_loader(
    cfg: DataConfig,
    *,
    sequence_length: int,
    vocab_size: int,
    global_batch_size: int,
    seed: int,
    work_dir: str | os.PathLike,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    duration: tuple[str, int] | None = None,
    plan: DataPlan | None = None,
    document_ids: bool = False,
) -> DataLoaderBase:
    """The training loader: global shuffle from `seed`, `global_batch_size` sequences per step over all ranks.

    Each rank yields its disjoint `global_batch_size // dp_world_size` sequences per batch.
    `work_dir` (shared by the ranks of a node) holds the cached shuffle order. `plan` is the
    data plan preflight made (validate_data); without one the files are planned here, with
    `duration` (the run's) for a mixture's repetition check and the logged table. With
    `document_ids` (model.document_masking) batches carry each token's document ("doc_ids").
    """
    _check_split(global_batch_size, dp_world_size, "global_batch_size")
    if plan is None:
        plan = plan_data(
            cfg, vocab_size=vocab_size, sequence_length=sequence_length,
            global_batch_size=global_batch_size, duration=duration,
        )  # fmt: skip
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    dataset: NumpyFSLDataset
    if plan.mixture is not None:
        if dp_rank == 0:
            log.info(plan.table())
        dataset = MixtureDataset(
            plan.mixture, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
            vocab_size=vocab_size, dtype=resolve_dtype(cfg.dtype, vocab_size), seed=seed,
            cache_dir=cfg.cache_dir,
        )  # fmt: skip
        dataset.work_dir = work_dir
    else:
        dataset = _build_dataset(
            cfg, list(plan.paths), sequence_length=sequence_length, vocab_size=vocab_size,
            work_dir=work_dir,
        )  # fmt: skip
    return TrainDataLoader(
        dataset,
        collator=_collator(cfg, vocab_size, with_source=plan.mixture is not None, document_ids=document_ids),
        num_threads=_reader_threads(dataset),
        # olmo-core counts batches in tokens; our configs count sequences.
        global_batch_size=global_batch_size * sequence_length,
        work_dir=work_dir,
        seed=seed,
        shuffle=True,
        num_workers=cfg.num_workers,
        dp_world_size=dp_world_size,
        dp_rank=dp_rank,
        ignore_fingerprint_mismatch=cfg.ignore_fingerprint_mismatch,
    )


def build_eval_loaders(
    cfg: DataConfig,
    *,
    sequence_length: int,
    vocab_size: int,
    batch_size: int,
    work_dir: str | os.PathLike,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    document_ids: bool = False,
) -> dict[str, DataLoaderBase]:
    """One loader per validation set, in file order, each sequence exactly once over the ranks.

    `batch_size` is in sequences over all ranks (each rank gets batch_size // dp_world_size).
    The last batch is padded with rows whose "instance_mask" is False. With `document_ids`
    batches carry each token's document ("doc_ids"), as in training. Call
    `reshuffle(epoch=1)` before each pass and `reset()` after it.
    """
    _check_positive(sequence_length=sequence_length, vocab_size=vocab_size, batch_size=batch_size)
    _check_split(batch_size, dp_world_size, "eval batch_size")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    loaders: dict[str, DataLoaderBase] = {}
    for label, (patterns, key) in cfg.validation_sets().items():
        paths = resolve_paths(patterns, key)
        dataset = _build_dataset(
            cfg, paths, sequence_length=sequence_length, vocab_size=vocab_size, work_dir=work_dir
        )
        if len(dataset) == 0:
            raise DataError(
                f"{key}: {len(paths)} file(s) hold no whole sequence of {sequence_length:,d} tokens"
            )
        loaders[label] = EvalDataLoader(
            dataset,
            num_threads=_reader_threads(dataset),
            collator=_collator(cfg, vocab_size, document_ids=document_ids),
            global_batch_size=batch_size * sequence_length,
            work_dir=work_dir,
            seed=0,
            shuffle=False,
            num_workers=cfg.num_workers,
            dp_world_size=dp_world_size,
            dp_rank=dp_rank,
        )
    return loaders
