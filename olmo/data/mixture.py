"""Mixtures: how many sequences of each source one pass (an epoch) holds, and which."""

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_model.errors import DataError
from olmo import object_store
from olmo.data.config import DataConfig
from olmo.data.files import _check_token_file, resolve_paths
from olmo.token_files import file_size


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
