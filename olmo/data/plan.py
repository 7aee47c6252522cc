"""The plan of one run's training data, made once before training; the data checks."""

from dataclasses import dataclass

import numpy as np

from moe_model.errors import DataError
from olmo.data.config import DataConfig
from olmo.data.files import (
    _check_file_set,
    _check_positive,
    _check_token_file,
    resolve_dtype,
    resolve_paths,
)
from olmo.data.mixture import Mixture, _source_files, plan_mixture, run_sequences
from olmo.token_files import file_size


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


def mixture_for(
    cfg: DataConfig, *, sequence_length: int, vocab_size: int, global_batch_size: int
) -> Mixture:
    """The mixture `cfg.sources` gives (files resolved and sized, not read)."""
    return plan_data(
        cfg, vocab_size=vocab_size, sequence_length=sequence_length,
        global_batch_size=global_batch_size, check_run=False,
    ).mixture  # fmt: skip
