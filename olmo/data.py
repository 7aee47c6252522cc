"""Dolma-tokenized token files in, deterministic resumable batches out.

Input: the `.npy` files that `dolma tokens` writes (see scripts/tokenize.sh). They are raw,
headerless little-endian memmaps (`np.load` cannot read them), with EOS after every document.
olmo-core's `NumpyFSLDataset` reads exactly that: it chunks each file into fixed-length
sequences (a file's tail shorter than one sequence is dropped) and its `NumpyFSLDataLoader`
shuffles them globally from the seed, splits each global batch over data-parallel ranks and
keeps its position in `state_dict()`. This module configures those two, checks the files
before training, and turns the mistakes a user can make into one-line `DataError`s.

Batch contract (what the trainer receives): a dict with "input_ids" (LongTensor [B, S]) and
"index" (LongTensor [B], the global sequence index). Eval batches also carry "instance_mask"
(BoolTensor [B]): False marks the padding rows that fill the last batch, so that every
validation sequence is evaluated exactly once; `olmo_core.data.utils.get_labels` masks them.

Outside olmo-core's Trainer, follow its loader contract: `loader.reshuffle(epoch=e)` before
iterating an epoch, `loader.reset()` after it.
"""

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from olmo_core.data import DataCollator, NumpyFSLDataLoader, NumpyFSLDataset
from olmo_core.data.data_loader import DataLoaderBase

from moe_model.errors import DataError
from moe_model.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID

__all__ = [
    "DataError",
    "DataConfig",
    "resolve_paths",
    "resolve_dtype",
    "validate_data",
    "build_train_loader",
    "build_eval_loaders",
]

log = logging.getLogger(__name__)

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# Tokens read per sampled chunk when checking ids: enough to catch a wrong dtype or tokenizer
# (they corrupt every position), cheap enough to run on terabyte corpora before every run.
_SAMPLE_CHUNK_TOKENS = 4096
_SAMPLE_RANDOM_CHUNKS = 4


@dataclass
class DataConfig:
    """Where the token files are and how to read them (the `data:` section of a config)."""

    paths: list[str] = field(default_factory=list)
    """Training token files or globs: `dolma tokens` output, e.g. ['data/sample/tokens/train/*.npy']."""
    dtype: Optional[str] = None  # noqa: UP045 (omegaconf reads typing.Optional)
    """Token dtype the files were written with: 'uint16', 'uint32', or null = smallest that holds vocab_size."""
    validation: dict[str, list[str]] = field(default_factory=dict)
    """Validation sets: label -> token files or globs; each is evaluated in full, in file order."""
    num_workers: int = 0
    """Data loader worker processes (0 = load in the training process, with threads)."""
    ignore_fingerprint_mismatch: bool = False
    """Allow resuming onto changed data (files or sizes differ from the checkpoint); the order then differs."""
    eos_token_id: int = EOS_TOKEN_ID
    """End-of-document token the files were written with (gpt-neox-olmo-dolma-v1_5: 50279)."""
    pad_token_id: int = PAD_TOKEN_ID
    """Padding token id (gpt-neox-olmo-dolma-v1_5: 1); used only for eval padding rows."""


def resolve_paths(patterns: "list[str] | str", key: str = "data.paths") -> list[str]:
    """Expand files and globs into a sorted, de-duplicated file list; DataError if any matches nothing."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    if not patterns:
        raise DataError(
            f"{key} is empty; expected token files or globs such as 'data/tokens/*.npy'"
        )
    out: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            # Sorted: glob order is filesystem order, and the data order and the resume
            # fingerprint must not depend on it.
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(pattern):
            raise DataError(
                f"{key}: '{pattern}' is a directory; expected files or a glob such as "
                f"'{os.path.join(pattern, '*.npy')}'"
            )
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise DataError(
                f"{key}: '{pattern}' matches no files; expected dolma token files "
                f"(run scripts/prepare_sample_data.sh, or scripts/tokenize.sh on your documents)"
            )
        out.extend(m for m in matches if m not in out)
    return out


def resolve_dtype(dtype: str | None, vocab_size: int, key: str = "data.dtype") -> type:
    """The numpy token dtype: the configured one, or the smallest that holds vocab_size."""
    if dtype is None:
        return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    if dtype not in _DTYPES:
        raise DataError(f"{key}: '{dtype}' is not supported; expected 'uint16', 'uint32' or null")
    np_dtype = _DTYPES[dtype]
    max_id = int(np.iinfo(np_dtype).max)
    if vocab_size - 1 > max_id:
        raise DataError(
            f"{key}: {dtype} holds token ids up to {max_id:,d} but vocab_size is {vocab_size:,d}; "
            f"use uint32 (and tokenize with --dtype uint32)"
        )
    return np_dtype


def _check_token_file(path: str, np_dtype: type, vocab_size: int, key: str) -> int:
    """Cheap checks of one token file (size, sampled ids); returns its number of tokens."""
    itemsize = np.dtype(np_dtype).itemsize
    dtype_name = np.dtype(np_dtype).name
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{key}: '{path}' is empty (0 bytes); expected a dolma token file")
    if size % itemsize != 0:
        raise DataError(
            f"{key}: '{path}' has {size:,d} bytes, not a multiple of {itemsize} ({dtype_name}); "
            f"expected a {dtype_name} token file (is data.dtype right, is this a token file?)"
        )
    n_tokens = size // itemsize
    tokens = np.memmap(path, dtype=np_dtype, mode="r")
    # First and last chunk plus a few random ones: a wrong dtype or tokenizer shows up
    # everywhere, so a sample finds it without reading the whole file. The seed is fixed so
    # a check that passed once passes again.
    chunk = min(_SAMPLE_CHUNK_TOKENS, n_tokens)
    starts = {0, n_tokens - chunk}
    rng = np.random.default_rng(n_tokens)
    starts.update(int(s) for s in rng.integers(0, n_tokens - chunk + 1, _SAMPLE_RANDOM_CHUNKS))
    for start in sorted(starts):
        ids = np.asarray(tokens[start : start + chunk])
        bad = np.flatnonzero(ids >= vocab_size)
        if bad.size:
            pos = start + int(bad[0])
            raise DataError(
                f"{key}: '{path}' has token id {int(tokens[pos]):,d} at position {pos:,d}, "
                f"expected ids < vocab_size {vocab_size:,d} (wrong data.dtype or tokenizer?)"
            )
    del tokens
    return n_tokens


def _check_file_set(
    patterns: list[str], key: str, np_dtype: type, vocab_size: int, sequence_length: int
) -> tuple[list[str], int, int]:
    """Resolve and check a set of files; returns (paths, tokens, whole sequences)."""
    paths = resolve_paths(patterns, key)
    n_tokens = n_sequences = 0
    for path in paths:
        n = _check_token_file(path, np_dtype, vocab_size, key)
        n_tokens += n
        # Per file, as NumpyFSLDataset counts: sequences never span two files.
        n_sequences += n // sequence_length
    return paths, n_tokens, n_sequences


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} is {value!r}; expected a positive integer")


def validate_data(
    cfg: DataConfig, *, vocab_size: int, sequence_length: int, global_batch_size: int
) -> None:
    """Check the configured data cheaply before training starts; raise DataError on the first problem.

    `global_batch_size` is in sequences. Every file is opened, but only a sample of each is read.
    """
    _check_positive(
        vocab_size=vocab_size, sequence_length=sequence_length, global_batch_size=global_batch_size
    )
    np_dtype = resolve_dtype(cfg.dtype, vocab_size)
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(cfg, name)
        if not 0 <= value < vocab_size:
            raise DataError(
                f"data.{name} is {value}; expected 0 <= id < vocab_size {vocab_size:,d}"
            )

    paths, n_tokens, n_sequences = _check_file_set(
        cfg.paths, "data.paths", np_dtype, vocab_size, sequence_length
    )
    if n_sequences < global_batch_size:
        raise DataError(
            f"data.paths: {len(paths)} file(s) hold {n_tokens:,d} tokens = {n_sequences:,d} "
            f"sequences of {sequence_length:,d}, expected at least one global batch of "
            f"{global_batch_size:,d} sequences (add data, or lower the batch size or sequence length)"
        )
    for label, patterns in cfg.validation.items():
        key = f"data.validation.{label}"
        v_paths, v_tokens, v_sequences = _check_file_set(
            patterns, key, np_dtype, vocab_size, sequence_length
        )
        if v_sequences < 1:
            raise DataError(
                f"{key}: {len(v_paths)} file(s) hold {v_tokens:,d} tokens, expected at least one "
                f"whole sequence of {sequence_length:,d} tokens in one file"
            )


def _file_list(dataset: NumpyFSLDataset) -> list[list[Any]]:
    """[basename, bytes] per file, as olmo-core's fingerprint sees them; kept to explain a mismatch."""
    return [[os.path.basename(str(p)), int(s)] for p, s in zip(dataset.paths, dataset.file_sizes)]


def _describe_change(saved: list[list[Any]], now: list[list[Any]]) -> str:
    saved_d, now_d = dict(map(tuple, saved)), dict(map(tuple, now))
    parts = []
    if removed := [n for n in saved_d if n not in now_d]:
        parts.append(f"{len(removed)} file(s) gone (e.g. {removed[0]})")
    if added := [n for n in now_d if n not in saved_d]:
        parts.append(f"{len(added)} file(s) new (e.g. {added[0]})")
    if resized := [n for n in now_d if n in saved_d and now_d[n] != saved_d[n]]:
        n = resized[0]
        parts.append(
            f"{len(resized)} file(s) resized (e.g. {n}: {saved_d[n]:,d} -> {now_d[n]:,d} bytes)"
        )
    if not parts:
        parts.append("same files and sizes in a different order, or different token ids/dtype")
    return "; ".join(parts)


class TrainDataLoader(NumpyFSLDataLoader):
    """olmo-core's FSL loader whose resume check explains what changed and raises DataError."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["data_files"] = _file_list(self.dataset)  # type: ignore[arg-type]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # olmo-core compares a fingerprint of (file basenames, sizes, vocab, dtype, ...) and
        # raises a RuntimeError without saying what differs; check first, naming the change.
        saved = state_dict.get("dataset_fingerprint")
        if saved is not None and saved != self.dataset.fingerprint:
            what = _describe_change(state_dict.get("data_files", []), _file_list(self.dataset))  # type: ignore[arg-type]
            if not self.ignore_fingerprint_mismatch:
                raise DataError(
                    f"data.paths: the training data differs from the checkpoint's ({what}); "
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
    dataset = NumpyFSLDataset(
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
    dataset.prepare()
    return dataset


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
) -> DataLoaderBase:
    """The training loader: global shuffle from `seed`, `global_batch_size` sequences per step over all ranks.

    Each rank yields its disjoint `global_batch_size // dp_world_size` sequences per batch.
    `work_dir` (shared by the ranks of a node) holds the cached shuffle order.
    """
    _check_positive(
        sequence_length=sequence_length, vocab_size=vocab_size, global_batch_size=global_batch_size
    )
    _check_split(global_batch_size, dp_world_size, "global_batch_size")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = resolve_paths(cfg.paths, "data.paths")
    dataset = _build_dataset(
        cfg, paths, sequence_length=sequence_length, vocab_size=vocab_size, work_dir=work_dir
    )
    if len(dataset) < global_batch_size:
        raise DataError(
            f"data.paths: {len(paths)} file(s) hold {len(dataset):,d} sequences of "
            f"{sequence_length:,d} tokens, expected at least one global batch of {global_batch_size:,d}"
        )
    return TrainDataLoader(
        dataset,
        collator=DataCollator(pad_token_id=cfg.pad_token_id, vocab_size=vocab_size),
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
) -> dict[str, DataLoaderBase]:
    """One loader per validation set, in file order, each sequence exactly once over the ranks.

    `batch_size` is in sequences over all ranks (each rank gets batch_size // dp_world_size).
    The last batch is padded with rows whose "instance_mask" is False. Call
    `reshuffle(epoch=1)` before each pass and `reset()` after it.
    """
    _check_positive(sequence_length=sequence_length, vocab_size=vocab_size, batch_size=batch_size)
    _check_split(batch_size, dp_world_size, "eval batch_size")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    loaders: dict[str, DataLoaderBase] = {}
    for label, patterns in cfg.validation.items():
        key = f"data.validation.{label}"
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
            collator=DataCollator(pad_token_id=cfg.pad_token_id, vocab_size=vocab_size),
            global_batch_size=batch_size * sequence_length,
            work_dir=work_dir,
            seed=0,
            shuffle=False,
            num_workers=cfg.num_workers,
            dp_world_size=dp_world_size,
            dp_rank=dp_rank,
        )
    return loaders
