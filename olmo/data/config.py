"""The `data:` section of a config: token files or a mixture of named sources."""

import re
from dataclasses import dataclass, field
from typing import Optional

from moe_model.errors import ConfigError
from moe_model.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID

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
