"""The dtype that precision-sensitive math (router scores, auxiliary losses, RoPE, activation
powers and norms) runs in: fp32 for bf16/fp16/fp32 inputs, float64 for float64 ones.

``tensor.float()`` would cast float64 down to fp32, so a float64 model (the golden trace in
``tests/moe_model/test_default_recipe.py``, gradient checks) would carry fp32 rounding, which
differs between CPU kernels (ATen's AVX2/AVX-512 and default paths, MKL's code paths).

Autocast stays outside the activation kernels: every backend computes its statistics in fp32.

``torch.autocast`` runs matmul-shaped ops (``einsum`` -> ``bmm``, ``matmul``, and whatever a
compiler lowers to one) in bf16 whatever their operands' dtype. A row sum written as a dot
product would then lose 8 mantissa bits under autocast and not without it (max |dy| 0.06 at
64 x 1536 for the fused PolyNorm before this). The backends upcast to fp32 and cast their
result back to the input dtype themselves, so autocast has nothing to add inside them: they
run with it switched off, and give the same numbers with or without it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

__all__ = ["at_least_fp32", "autocast_off", "no_autocast", "upcast"]


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32, or ``dtype`` when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`at_least_fp32` of its dtype (``t`` itself when it already is)."""
    return t.to(at_least_fp32(t.dtype))

def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``x``'s device type (a no-op where autocast has none)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_off(fn: Callable) -> Callable:
    """For an autograd ``forward(ctx, x, ...)`` / ``backward(ctx, grad, ...)``: run it with
    autocast off for the device of its first tensor (backward may run inside autocast too)."""

    @functools.wraps(fn)
    def wrapper(ctx, t: torch.Tensor, *args):
        with no_autocast(t):
            return fn(ctx, t, *args)

    return wrapper
