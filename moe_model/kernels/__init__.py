"""Activation kernels, chosen by backend name.

Backends: ``eager`` (the reference math in :mod:`moe_model.activations`), ``auto`` (the fastest
available for the input's device). Faster backends register here.
"""

from __future__ import annotations

import torch


def poly_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str = "auto"
) -> torch.Tensor:
    from moe_model.activations import poly_norm_eager

    if backend not in ("auto", "eager"):
        raise ValueError(f"unknown PolyNorm backend {backend!r}; expected one of ['auto', 'eager']")
    return poly_norm_eager(x, weight, bias, eps)


def poly_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    from moe_model.activations import poly_relu_eager

    if backend not in ("auto", "eager"):
        raise ValueError(f"unknown PolyReLU backend {backend!r}; expected one of ['auto', 'eager']")
    return poly_relu_eager(x, weight, bias)
