"""Activation checkpointing modes: which part of each block is recomputed in backward.

``activation_checkpointing`` in a config takes ``true``/``false`` (as before: the whole block,
or nothing) or a mode's name. A checkpointed part keeps only its inputs from forward and runs
its forward again in backward, so its saved activations (for a MoE layer: the routed rows, the
expert pre-activations and activations, several bf16 copies of top_k x tokens x hidden) do not
live between the two passes:

- ``full`` (= ``true``): the whole block; the least memory, the most recompute (every GEMM of
  the block's forward runs twice);
- ``moe``: the block's FFN (the MoE layer, or the dense FFN of a dense block), where most of a
  MoE block's activations are; attention's are kept;
- ``attention``: the attention sublayer (projections and SDPA); the FFN's are kept.
"""

from __future__ import annotations

import torch.nn as nn

from moe_model.errors import ConfigError

CHECKPOINTED_PART: dict[str, str | None] = {"full": None, "moe": "ffn", "attention": "attn"}
"""Mode -> the block's attribute that is recomputed (None: the block itself)."""

BOOLEAN_MODES = {True: "full", False: None, "none": None}
"""The values that name no mode of their own: ``true`` is the whole block, as it always was."""


def checkpoint_mode(value: bool | str) -> str | None:
    """The mode a config value names (None: no checkpointing); ConfigError for an unknown one."""
    if value in BOOLEAN_MODES:
        return BOOLEAN_MODES[value]
    if value in CHECKPOINTED_PART:
        return value
    raise ConfigError(
        f"activation_checkpointing={value!r} is unknown; expected true, false, none or one of "
        f"{', '.join(CHECKPOINTED_PART)}"
    )


def apply_activation_checkpointing(blocks: nn.ModuleList, value: bool | str) -> None:
    """Wrap the part of each block that ``value``'s mode recomputes, in place."""
    mode = checkpoint_mode(value)
    if mode is None:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    part = CHECKPOINTED_PART[mode]
    for i, block in enumerate(blocks):
        if part is None:
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            setattr(block, part, checkpoint_wrapper(getattr(block, part), preserve_rng_state=False))
