"""A gated activation given a hidden size that was chosen for a non-gated one: an error.

A config file sizes the experts for its own activation (``configs/olmoe-1b-7b-polynorm.yaml``:
``polynorm`` at ``mlp_hidden_size: 1536``, the non-gated equal of SwiGLU's 1024). Switching the
activation on the command line to a gated one (``--model.activation_type=polynorm_glu``: three
expert matrices, not two) without a new hidden size would train a model with 1.5x the expert
parameters of the comparison it claims to be part of. :func:`check_overridden_activation`
refuses that before anything is built, naming the equal-parameter size; setting the size on the
command line as well (any value) is taken as the user's choice.
"""

from __future__ import annotations

from pathlib import Path

from moe_model.activations import ACTIVATIONS
from moe_model.config import ConfigError, equal_param_hidden_size

__all__ = ["ACTIVATION_SIZED", "check_overridden_activation"]

ACTIVATION_SIZED = ("mlp_hidden_size", "moe_shared_hidden_size", "moe_first_dense_hidden_size")
"""Model keys whose value is sized for the activation (equal-parameter sweeps convert them)."""

DEFAULT_ACTIVATION = "swiglu"


def check_overridden_activation(
    file_model: dict, override_model: dict, files: list[Path]
) -> None:
    """ConfigError when ``override_model`` (the ``model.*`` command-line overrides) makes the
    activation gated while a hidden size in ``file_model`` (the config files' merged ``model``
    keys) was set for the files' non-gated activation and is not overridden too."""
    new = override_model.get("activation_type")
    old = file_model.get("activation_type", DEFAULT_ACTIVATION)
    if new not in ACTIVATIONS or old not in ACTIVATIONS:
        return  # unknown names get their own error from ModelConfig
    if not ACTIVATIONS[new].gated or ACTIVATIONS[old].gated:
        return
    for key in ACTIVATION_SIZED:
        size = file_model.get(key)
        if not isinstance(size, int) or key in override_model:
            continue
        try:
            hint = f"at equal parameters --model.{key}={equal_param_hidden_size(size, old, new)}"
        except ConfigError:
            hint = f"no size has exactly the parameters of {size} under {old!r}"
        where = str(files[-1]) if files else "the config file"
        raise ConfigError(
            f"model.activation_type={new!r} is gated (three expert matrices) but "
            f"model.{key}={size} comes from {where}, sized for the non-gated {old!r}; set "
            f"--model.{key} as well ({hint})"
        )
