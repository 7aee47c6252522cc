"""Dolma-tokenized token files in, deterministic resumable batches out.

Input: the `.npy` files that `dolma tokens` writes (see scripts/tokenize.sh). They are raw,
headerless little-endian memmaps (`np.load` cannot read them), with EOS after every document.
olmo-core's `NumpyFSLDataset` reads exactly that: it chunks each file into fixed-length
sequences (a file's tail shorter than one sequence is dropped) and its `NumpyFSLDataLoader`
shuffles them globally from the seed, splits each global batch over data-parallel ranks and
keeps its position in `state_dict()`. This module configures those two, checks the files
before training, and turns the mistakes a user can make into one-line `DataError`s.

Batch contract (what the trainer receives): a dict with "input_ids" (LongTensor [B, S]) and
"index" (LongTensor [B], the global sequence index); for document masking also "doc_ids"
(LongTensor [B, S], each token's document, from the EOS the files were written with). Eval batches also carry "instance_mask"
(BoolTensor [B]): False marks the padding rows that fill the last batch, so that every
validation sequence is evaluated exactly once; `olmo_core.data.utils.get_labels` masks them.

Outside olmo-core's Trainer, follow its loader contract: `loader.reshuffle(epoch=e)` before
iterating an epoch, `loader.reset()` after it.

Mixtures (`data.sources`, instead of `data.paths`): named sources, each with its files, a target
fraction of the training tokens and a repetition limit. `plan_mixture` decides how many whole
sequences each source contributes to one pass over the mixture (an epoch), `Mixture.check_run`
holds the whole run to the repetition limits; `MixtureDataset` serves each pass's sequences (a
different part of a large source in each pass) and tags each with its source's index, so
mixture batches also carry "source" (LongTensor [B], index into `data.sources` in config order)
for per-source training loss.
"""

import functools
import glob
import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from olmo_core.data import DataCollator, NumpyFSLDataLoader, NumpyFSLDataset
from olmo_core.data.data_loader import DataLoaderBase

from moe_model import attention
from moe_model.errors import ConfigError, DataError, ObjectStoreError
from moe_model.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID
from olmo import object_store
from olmo.token_files import ObjectStoreReads, file_size, open_tokens

__all__ = [
    "DataError",
    "DataConfig",
    "DataPlan",
    "Mixture",
    "MixtureDataset",
    "SourceConfig",
    "plan_data",
    "plan_mixture",
    "mixture_for",
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


# Fractions as published are rounded (OLMoE-mix's shares to a few digits); within this of 1
# they are accepted and normalised, further off they are a typo.
FRACTION_SUM_TOLERANCE = 1e-3
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SourceConfig:
    """One named source of a training mixture (`data.sources.<name>`).

    Repetition counts how often a source's tokens are used, on average: within one pass over the
    mixture (`selected / available`) and over the whole run (that times the passes the run's
    max_duration spans). `max_repetition` bounds both, before training starts. A source larger
    than its share uses a fresh part of itself in each pass, so it repeats only once every part
    was used.
    """

    paths: list[str] = field(default_factory=list)
    """Token files or globs of this source (`dolma tokens` output)."""
    fraction: Optional[float] = None  # noqa: UP045 (omegaconf reads typing.Optional)
    """Required: share of the mixture's training tokens; all sources' fractions sum to 1."""
    max_repetition: float = 1.0
    """How often its tokens may be used, on average, in one pass and over the whole run (> 1 upsamples)."""
    validation: list[str] = field(default_factory=list)
    """Held-out token files of this source, evaluated as validation set `<name>` ([] = none)."""


@dataclass
class DataConfig:
    """Where the token files are and how to read them (the `data:` section of a config)."""

    paths: list[str] = field(default_factory=list)
    """Training token files or globs: `dolma tokens` output, e.g. ['data/sample/tokens/train/*.npy']."""
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Training mixture instead of `paths`: name -> {paths, fraction, max_repetition, validation}."""
    mix_tokens: Optional[int] = None  # noqa: UP045 (omegaconf reads typing.Optional)
    """Tokens in one pass over the mixture (rounded up to whole global batches); null = as many as every source allows within its max_repetition."""
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
    cache_dir: Optional[str] = None  # noqa: UP045 (omegaconf reads typing.Optional)
    """Local directory that keeps a copy of each s3:// token file (fetched once); null = read objects by byte ranges."""

    def __post_init__(self) -> None:
        self.sources = {
            name: SourceConfig(**src) if isinstance(src, dict) else src
            for name, src in self.sources.items()
        }
        if self.mix_tokens is not None and not self.sources:
            raise ConfigError("data.mix_tokens is set but data.sources is empty; it sizes a mixture")
        if not self.sources:
            return
        if self.paths:
            raise ConfigError(
                "data.paths and data.sources are both set; expected one of them (a plain file "
                "list, or a mixture of named sources)"
            )
        if self.mix_tokens is not None and self.mix_tokens < 1:
            raise ConfigError(f"data.mix_tokens is {self.mix_tokens}; expected a positive number of tokens or null")
        for name, src in self.sources.items():
            key = f"data.sources.{name}"
            if not _SOURCE_NAME.match(name):
                raise ConfigError(
                    f"{key}: source names may hold letters, digits, '_', '.' and '-' (they name "
                    f"metrics and validation sets)"
                )
            if not src.paths:
                raise ConfigError(f"{key}.paths is empty; expected the source's token files or globs")
            if src.fraction is None:
                raise ConfigError(f"{key}.fraction is missing; expected its share of training tokens in (0, 1]")
            if not 0 < src.fraction <= 1:
                raise ConfigError(f"{key}.fraction is {src.fraction}; expected a share in (0, 1]")
            if not src.max_repetition >= 1:
                raise ConfigError(
                    f"{key}.max_repetition is {src.max_repetition}; expected >= 1 (1 = each token "
                    f"at most once per pass over the mixture)"
                )
            if name in self.validation and src.validation:
                raise ConfigError(
                    f"{key}.validation and data.validation.{name} both name validation set "
                    f"'{name}'; expected one"
                )
        total = sum(src.fraction for src in self.sources.values())
        if abs(total - 1) > FRACTION_SUM_TOLERANCE:
            shares = " + ".join(f"{n} {s.fraction:g}" for n, s in self.sources.items())
            raise ConfigError(
                f"data.sources: fractions sum to {total:.4g} ({shares}); expected 1 (within "
                f"{FRACTION_SUM_TOLERANCE:g}, then normalised)"
            )

    def validation_sets(self) -> dict[str, tuple[list[str], str]]:
        """label -> (files or globs, config key): `validation` plus each source's own set."""
        sets = {label: (list(p), f"data.validation.{label}") for label, p in self.validation.items()}
        for name, src in self.sources.items():
            if src.validation:
                sets[name] = (list(src.validation), f"data.sources.{name}.validation")
        return sets


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
        if object_store.is_remote(pattern):
            matches = _resolve_objects(pattern, key)
        elif glob.has_magic(pattern):
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


def _resolve_objects(pattern: str, key: str) -> list[str]:
    """Object URLs a `s3://bucket/prefix/*.npy` pattern (or one object's URL) names, sorted."""
    try:
        # Bucket and credentials first: their one-line causes beat "matches no files".
        object_store.check_access(pattern, write=False, what=key)
        matches = [o.url for o in object_store.glob_objects(pattern)]
        if not matches and not object_store.has_magic(pattern):
            if object_store.list_objects(object_store.join(pattern, "")):
                raise DataError(
                    f"{key}: '{pattern}' is a prefix; expected objects or a glob such as "
                    f"'{object_store.join(pattern, '*.npy')}'"
                )
    except ObjectStoreError as err:
        message = str(err)
        raise DataError(message if message.startswith(key) else f"{key}: {message}") from None
    return matches


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
    size = file_size(path)
    if size == 0:
        raise DataError(f"{key}: '{path}' is empty (0 bytes); expected a dolma token file")
    if size % itemsize != 0:
        raise DataError(
            f"{key}: '{path}' has {size:,d} bytes, not a multiple of {itemsize} ({dtype_name}); "
            f"expected a {dtype_name} token file (is data.dtype right, is this a token file?)"
        )
    n_tokens = size // itemsize
    # Object URLs are sampled by byte ranges; nothing is downloaded whole.
    tokens = open_tokens(path, np_dtype)
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


# --- mixtures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixtureSource:
    """One source as planned: its files and how many of their sequences one pass uses."""

    name: str
    fraction: float
    """Target share of the mixture's sequences (normalised over the sources)."""
    max_repetition: float
    paths: tuple[str, ...]
    file_bytes: tuple[int, ...]
    file_sequences: tuple[int, ...]
    """Whole sequences per file (a file's tail shorter than a sequence is not used)."""
    selected: int
    """Sequences of this source in one pass over the mixture."""

    @property
    def available(self) -> int:
        return sum(self.file_sequences)

    @property
    def repetition(self) -> float:
        """How often each of the source's sequences appears per pass, on average."""
        return self.selected / self.available

    def pool_index(self, j: int, *, epoch: int = 1, seed: int = 0) -> int:
        """The source sequence (0 .. available-1) behind its j-th selected sequence in pass `epoch`.

        Pass e takes the window [(e-1) * selected, e * selected) of the cyclic order
        `order(p) = (start + p * stride) mod available`, so consecutive passes take consecutive
        windows: k passes over a source larger than k shares use k disjoint sets of sequences,
        and the first w passes use each sequence floor or ceil(w * selected / available) times. The stride
        is coprime to `available` and near `available / golden ratio`, which spreads every window
        evenly over the source (and so over its files); the start is drawn from the data seed and
        the source's name. Closed form, so a terabyte source needs no stored index.
        """
        a = self.available
        p = ((epoch - 1) * self.selected + j) % a
        return (_order_start(seed, self.name, a) + p * _order_stride(a)) % a


_MIXTURE_ORDER = "epoch-windows-1"
"""Version of the per-pass selection rule, part of a mixture's fingerprint."""

# (sqrt(5) - 1) / 2: multiples of it mod 1 are the most evenly spread (three-gap theorem).
_GOLDEN = (math.sqrt(5) - 1) / 2


@functools.cache
def _order_stride(n: int) -> int:
    """A stride coprime to n near n / golden ratio: a permutation of range(n) that spreads windows."""
    base = round(n * _GOLDEN)
    for delta in range(n + 1):
        for s in (base + delta, base - delta):
            if 0 < s < n and math.gcd(s, n) == 1:
                return s
    return 1  # n <= 2


@functools.cache
def _order_start(seed: int, name: str, n: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


@dataclass(frozen=True)
class Mixture:
    """The realised mixture: per source, which sequences one pass over it holds."""

    sources: tuple[MixtureSource, ...]
    sequence_length: int

    @property
    def num_sequences(self) -> int:
        return sum(s.selected for s in self.sources)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per source: target and realised share, tokens per pass, tokens available, repetition."""
        total = self.num_sequences
        return {
            s.name: {
                "fraction": s.fraction,
                "realised_fraction": s.selected / total,
                "sequences": s.selected,
                "tokens": s.selected * self.sequence_length,
                "available_tokens": s.available * self.sequence_length,
                "repetition": s.repetition,
                "files": len(s.paths),
            }
            for s in self.sources
        }

    def run_sequences(self, duration: tuple[str, int], *, global_batch_size: int) -> int:
        """Sequences a run of `duration` trains on; an epoch is one pass over this mixture."""
        return run_sequences(
            duration, epoch_sequences=self.num_sequences, global_batch_size=global_batch_size,
            sequence_length=self.sequence_length,
        )  # fmt: skip

    def run_repetition(self, run_sequences: int) -> dict[str, float]:
        """Per source: how often each of its sequences is used, on average, over a run of
        `run_sequences` sequences (whole passes and the share of a last, partial one)."""
        passes = run_sequences / self.num_sequences
        return {s.name: s.selected * passes / s.available for s in self.sources}

    def check_run(self, run_sequences: int) -> None:
        """DataError naming the first source whose repetition over the run exceeds its max_repetition."""
        seq = self.sequence_length
        passes = run_sequences / self.num_sequences
        for src, rep in zip(self.sources, self.run_repetition(run_sequences).values()):
            # Float slack only: a run of exactly max_repetition passes over a source is allowed.
            if rep > src.max_repetition * (1 + 1e-9):
                raise DataError(
                    f"data.sources.{src.name}: a run of {run_sequences * seq:,d} tokens "
                    f"({passes:.2f} passes over the mix) uses its {src.available * seq:,d} tokens "
                    f"{rep:.2f} times, more than max_repetition {src.max_repetition:g}; expected a "
                    f"larger max_repetition, more data for '{src.name}', a smaller fraction or a "
                    f"shorter max_duration"
                )

    def table(self, run_sequences: int | None = None) -> str:
        """The summary as text, for --dry-run and the training log; with `run_sequences`, also
        the passes the run spans and each source's repetition over the run."""
        seq = self.sequence_length
        lines = [
            f"data mixture: {len(self.sources)} sources, {self.num_sequences:,d} sequences x {seq:,d}"
            f" = {self.num_sequences * seq:,d} tokens per pass",
        ]
        if run_sequences is not None:
            lines.append(
                f"run: {run_sequences * seq:,d} tokens = {run_sequences / self.num_sequences:.3f} "
                f"passes over the mix"
            )
        header = (
            f"  {'source':<16} {'target':>8} {'realised':>9} {'tokens/pass':>16} "
            f"{'available':>16} {'repeat':>7} {'files':>6}"
        )
        lines.append(header + (f" {'run repeat':>10} {'limit':>6}" if run_sequences is not None else ""))
        run = self.run_repetition(run_sequences) if run_sequences is not None else {}
        for src, (name, row) in zip(self.sources, self.summary().items()):
            line = (
                f"  {name:<16} {row['fraction']:>8.3%} {row['realised_fraction']:>9.3%} "
                f"{row['tokens']:>16,d} {row['available_tokens']:>16,d} "
                f"{row['repetition']:>6.2f}x {row['files']:>6d}"
            )
            if run:
                line += f" {run[name]:>9.2f}x {src.max_repetition:>5g}x"
            lines.append(line)
        return "\n".join(lines)


def _apportion(total: int, shares: list[float]) -> list[int]:
    """Split `total` into integers proportional to `shares` (largest remainders; sum exact)."""
    quotas = [total * share for share in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _source_files(
    cfg: DataConfig, np_dtype: type, vocab_size: int, *, check_tokens: bool
) -> dict[str, tuple[list[str], list[int]]]:
    """name -> (resolved files, bytes per file); with check_tokens each file's ids are sampled."""
    out: dict[str, tuple[list[str], list[int]]] = {}
    owner: dict[str, str] = {}
    for name, src in cfg.sources.items():
        key = f"data.sources.{name}.paths"
        paths = resolve_paths(src.paths, key)
        for path in paths:
            real = path if object_store.is_remote(path) else os.path.realpath(path)
            if real in owner:
                raise DataError(
                    f"{key}: '{path}' is also in data.sources.{owner[real]}; expected each file "
                    f"in one source (raise max_repetition to use a source more)"
                )
            owner[real] = name
        if check_tokens:
            sizes = [_check_token_file(p, np_dtype, vocab_size, key) * np.dtype(np_dtype).itemsize for p in paths]
        else:
            sizes = [file_size(p) for p in paths]
        out[name] = (paths, sizes)
    return out


def plan_mixture(
    cfg: DataConfig,
    files: dict[str, tuple[list[str], list[int]]],
    *,
    sequence_length: int,
    itemsize: int,
    global_batch_size: int,
) -> Mixture:
    """How many sequences of each source one pass over the mixture holds; DataError if impossible.

    The pass holds a whole number of global batches: `data.mix_tokens` rounded up, or (null) the
    most that every source allows within `fraction` and `max_repetition`. The sources' counts
    are the largest-remainder split of that total by the normalised fractions, so each share is
    met to within one sequence.
    """
    names = list(cfg.sources)
    norm = sum(src.fraction for src in cfg.sources.values())
    shares = [cfg.sources[n].fraction / norm for n in names]
    per_file = {
        n: [b // itemsize // sequence_length for b in files[n][1]] for n in names
    }
    available = [sum(per_file[n]) for n in names]
    for name, count in zip(names, available):
        if count == 0:
            paths, sizes = files[name]
            raise DataError(
                f"data.sources.{name}: {len(paths)} file(s) hold {sum(sizes) // itemsize:,d} "
                f"tokens, expected at least one whole sequence of {sequence_length:,d} tokens in one file"
            )
    caps = [math.floor(a * cfg.sources[n].max_repetition) for n, a in zip(names, available)]

    if cfg.mix_tokens is not None:
        batches = -(-cfg.mix_tokens // (sequence_length * global_batch_size))
        total = batches * global_batch_size
        counts = _apportion(total, shares)
        for name, count, cap, have in zip(names, counts, caps, available):
            if count > cap:
                src = cfg.sources[name]
                raise DataError(
                    f"data.sources.{name}: its share of {total * sequence_length:,d} mix tokens is "
                    f"{count * sequence_length:,d} tokens, {count / have:.2f} passes over its "
                    f"{have * sequence_length:,d}, more than max_repetition {src.max_repetition:g}; "
                    f"expected a larger max_repetition, a smaller fraction or data.mix_tokens"
                )
    else:
        limits = [cap / share for cap, share in zip(caps, shares)]
        binding = min(range(len(names)), key=lambda i: limits[i])
        total = math.floor(limits[binding]) // global_batch_size * global_batch_size
        while True:
            # Rounding can give a source one sequence above its cap; shrink by a batch then.
            counts = _apportion(total, shares)
            if total == 0 or all(c <= cap for c, cap in zip(counts, caps)):
                break
            total -= global_batch_size
        if total == 0:
            name = names[binding]
            raise DataError(
                f"data.sources: the mixture cannot fill one global batch of {global_batch_size:,d} "
                f"sequences: source '{name}' has {available[binding]:,d} sequences of "
                f"{sequence_length:,d} tokens, at most {caps[binding]:,d} with max_repetition "
                f"{cfg.sources[name].max_repetition:g}, for {shares[binding]:.3%} of the mix; "
                f"expected more data for '{name}', a larger max_repetition or data.mix_tokens"
            )
    sources = tuple(
        MixtureSource(
            name=name,
            fraction=share,
            max_repetition=cfg.sources[name].max_repetition,
            paths=tuple(files[name][0]),
            file_bytes=tuple(files[name][1]),
            file_sequences=tuple(per_file[name]),
            selected=count,
        )
        for name, share, count in zip(names, shares, counts)
    )
    return Mixture(sources=sources, sequence_length=sequence_length)


def mixture_for(
    cfg: DataConfig, *, sequence_length: int, vocab_size: int, global_batch_size: int
) -> Mixture:
    """The mixture `cfg.sources` gives (files resolved and sized, not read)."""
    return plan_data(
        cfg, vocab_size=vocab_size, sequence_length=sequence_length,
        global_batch_size=global_batch_size, check_run=False,
    ).mixture  # fmt: skip


# --- the plan of one run's training data ----------------------------------------------------


def run_sequences(
    duration: tuple[str, int], *, epoch_sequences: int | None, global_batch_size: int,
    sequence_length: int,
) -> int:  # fmt: skip
    """Sequences a run of `duration` (olmo.config.parse_duration's (unit, amount)) trains on.

    Tokens round up to whole steps, as olmo-core's trainer stops at the first step that reaches
    them; an epoch is `epoch_sequences` (whole global batches), needed only for that unit.
    """
    unit, amount = duration
    if unit == "steps":
        return amount * global_batch_size
    if unit == "tokens":
        return -(-amount // (global_batch_size * sequence_length)) * global_batch_size
    if unit == "epochs":
        if epoch_sequences is None:
            raise ValueError("a duration in epochs needs the data's sequences per epoch")
        return amount * epoch_sequences
    raise ValueError(f"unknown duration unit {unit!r}")


@dataclass(frozen=True)
class DataPlan:
    """One run's training data, planned once before training: its files, the sequences one
    epoch serves and how long the run's duration is. The loader, `--dry-run` and the sweep
    planner (olmo.compare) all read the run's length from here."""

    paths: tuple[str, ...]
    """Training files, resolved and sorted (a mixture's: every source's, in config order)."""
    mixture: Mixture | None
    """The planned mixture (data.sources); None for data.paths."""
    epoch_sequences: int
    """Sequences in one epoch: whole global batches (olmo-core's loader drops the rest)."""
    sequence_length: int
    global_batch_size: int
    """In sequences, over all ranks."""
    duration: tuple[str, int] | None = None
    """The run's max_duration as parse_duration gives it; None when only the data is planned."""

    @property
    def run_sequences(self) -> int | None:
        """Sequences the whole run trains on (None without a duration)."""
        if self.duration is None:
            return None
        return run_sequences(
            self.duration, epoch_sequences=self.epoch_sequences,
            global_batch_size=self.global_batch_size, sequence_length=self.sequence_length,
        )  # fmt: skip

    @property
    def steps(self) -> int | None:
        """Optimizer steps the duration allows (None without a duration)."""
        run = self.run_sequences
        return None if run is None else run // self.global_batch_size

    def check_run(self) -> None:
        """DataError when the run repeats a mixture's source beyond its max_repetition."""
        if self.mixture is not None and self.duration is not None:
            self.mixture.check_run(self.run_sequences)

    def table(self) -> str | None:
        """A mixture's per-source table, with the run's passes and repetition (None for data.paths)."""
        return None if self.mixture is None else self.mixture.table(self.run_sequences)


def plan_data(
    cfg: DataConfig,
    *,
    vocab_size: int,
    sequence_length: int,
    global_batch_size: int,
    duration: tuple[str, int] | None = None,
    check_tokens: bool = False,
    check_run: bool = True,
) -> DataPlan:
    """Resolve and size the training files and plan the epoch; DataError if the data cannot
    fill one global batch (or, with `check_run`, a mixture's run exceeds a max_repetition).

    Files are only sized; with `check_tokens` a sample of each file's ids is read too.
    """
    _check_positive(
        vocab_size=vocab_size, sequence_length=sequence_length, global_batch_size=global_batch_size
    )
    np_dtype = resolve_dtype(cfg.dtype, vocab_size)
    itemsize = np.dtype(np_dtype).itemsize
    mixture = None
    if cfg.sources:
        files = _source_files(cfg, np_dtype, vocab_size, check_tokens=check_tokens)
        mixture = plan_mixture(
            cfg, files, sequence_length=sequence_length, itemsize=itemsize,
            global_batch_size=global_batch_size,
        )  # fmt: skip
        paths = [p for src in mixture.sources for p in src.paths]
        epoch_sequences = mixture.num_sequences
    else:
        key = "data.paths"
        paths = resolve_paths(cfg.paths, key)
        if check_tokens:
            tokens = [_check_token_file(p, np_dtype, vocab_size, key) for p in paths]
        else:
            tokens = [file_size(p) // itemsize for p in paths]
        # Per file, as NumpyFSLDataset counts: sequences never span two files.
        n_sequences = sum(n // sequence_length for n in tokens)
        if n_sequences < global_batch_size:
            raise DataError(
                f"{key}: {len(paths)} file(s) hold {sum(tokens):,d} tokens = {n_sequences:,d} "
                f"sequences of {sequence_length:,d}, expected at least one global batch of "
                f"{global_batch_size:,d} sequences (add data, or lower the batch size or sequence length)"
            )
        epoch_sequences = n_sequences // global_batch_size * global_batch_size
    plan = DataPlan(
        paths=tuple(paths), mixture=mixture, epoch_sequences=epoch_sequences,
        sequence_length=sequence_length, global_batch_size=global_batch_size, duration=duration,
    )  # fmt: skip
    if check_run:
        plan.check_run()
    return plan


def validate_data(
    cfg: DataConfig,
    *,
    vocab_size: int,
    sequence_length: int,
    global_batch_size: int,
    duration: tuple[str, int] | None = None,
) -> DataPlan:
    """Check the configured data cheaply before training starts; raise DataError on the first problem.

    `global_batch_size` is in sequences. Every file is opened, but only a sample of each is read.
    With `duration` (the run's, as parse_duration gives it) a mixture's repetition over the
    whole run is checked too. Returns the plan of the training data, for the loader.
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
    plan = plan_data(
        cfg, vocab_size=vocab_size, sequence_length=sequence_length,
        global_batch_size=global_batch_size, duration=duration, check_tokens=True,
    )  # fmt: skip
    for patterns, key in cfg.validation_sets().values():
        v_paths, v_tokens, v_sequences = _check_file_set(
            patterns, key, np_dtype, vocab_size, sequence_length
        )
        if v_sequences < 1:
            raise DataError(
                f"{key}: {len(v_paths)} file(s) hold {v_tokens:,d} tokens, expected at least one "
                f"whole sequence of {sequence_length:,d} tokens in one file"
            )
    return plan


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


def _file_list(dataset: "FSLDataset") -> list[list[Any]]:
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
