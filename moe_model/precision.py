"""The dtype that precision-sensitive math (router scores, auxiliary losses, RoPE, activation
powers and norms) runs in: fp32 for bf16/fp16/fp32 inputs, float64 for float64 ones.

``tensor.float()`` would cast float64 down to fp32, so a float64 model (the golden trace in
``tests/moe_model/test_default_recipe.py``, gradient checks) would carry fp32 rounding, which
differs between CPU kernels (ATen's AVX2/AVX-512 and default paths, MKL's code paths).
"""

from __future__ import annotations

import torch

__all__ = ["at_least_fp32", "upcast"]


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32, or ``dtype`` when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`at_least_fp32` of its dtype (``t`` itself when it already is)."""
    return t.to(at_least_fp32(t.dtype))
