"""PolyNorm / PolyReLU kernels, chosen by backend name.

Backends (``BACKENDS``):

* ``eager``   -- the reference math in :mod:`moe_model.activations` (autograd saves every
  intermediate; what the paper ran, there under activation checkpointing);
* ``fused``   -- :mod:`.polynorm_fused`: a ``torch.autograd.Function`` in plain PyTorch that
  saves only x (and one fp32 per row and power) and has an analytic backward; any device;
* ``triton``  -- :mod:`.polynorm_triton`: fused Triton kernels, forward and backward. CUDA
  tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before the first use (slow;
  for tests);
* ``compile`` -- ``torch.compile`` of the fp32 formula (inductor fuses it and derives the
  backward). The first call per shape compiles: tens of seconds on CPU;
* ``auto``    -- ``triton`` on CUDA when Triton imports (and order <= 4, row <= 65536), else
  ``fused``. Measured on the 2-core CPU at 8192 x 1536 fp32 (``benchmarks/RESULTS.md``):
  fwd + bwd eager 3.9 s, fused 0.83 s, compile 0.18 s -- but compile's first call took 32 s
  and recompiles per dtype/order (and once more when row counts start to vary), which
  dominates tests and short CPU runs. So ``auto`` stays ``fused`` (no warm-up); choose
  ``compile`` for long CPU runs.

All take inputs of any leading shape (the last dim is the normalised row), bf16/fp16/fp32, and
compute in fp32, returning the input dtype.
"""

from __future__ import annotations

import functools

import torch

BACKENDS = ("auto", "eager", "fused", "triton", "compile")


def _check_backend(backend: str, what: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown {what} backend {backend!r}; expected one of {list(BACKENDS)}")


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels import (Triton installed and working)."""
    try:
        from moe_model.kernels import polynorm_triton  # noqa: F401
    except Exception:  # ImportError, or a broken Triton install: fall back, never crash
        return False
    return True


@functools.cache
def _compiled(name: str):
    # The reference formula itself: inductor fuses it and derives the backward, so there is no
    # second copy of the math to keep in step.
    from moe_model import activations

    return torch.compile(getattr(activations, name))


def _resolve(backend: str, x: torch.Tensor, order: int, what: str) -> str:
    _check_backend(backend, what)
    if x.numel() == 0:
        # Nothing to compute (an expert without rows); the eager math handles it on any device
        # and still gives the coefficients a (zero) gradient, with no kernel over an empty grid.
        return "eager"
    if backend != "auto":
        return backend
    if x.is_cuda and triton_available():
        from moe_model.kernels.polynorm_triton import MAX_ORDER, MAX_ROW

        if order <= MAX_ORDER and x.shape[-1] <= MAX_ROW:
            return "triton"
    return "fused"


def poly_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str = "auto"
) -> torch.Tensor:
    """sum_i weight[i] * norm(x ** (r - i)) + bias, r = len(weight), norm a per-row RMS norm."""
    name = _resolve(backend, x, weight.numel(), "PolyNorm")
    if name == "eager":
        from moe_model.activations import poly_norm_eager

        return poly_norm_eager(x, weight, bias, eps)
    if name == "fused":
        from moe_model.kernels.polynorm_fused import poly_norm_fused

        return poly_norm_fused(x, weight, bias, eps)
    if name == "triton":
        from moe_model.kernels.polynorm_triton import poly_norm_triton

        return poly_norm_triton(x, weight, bias, eps)
    return _compiled("poly_norm_eager")(x, weight, bias, eps)


def poly_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """sum_i weight[i] * relu(x) ** (r - i) + bias, r = len(weight)."""
    name = _resolve(backend, x, weight.numel(), "PolyReLU")
    if name == "eager":
        from moe_model.activations import poly_relu_eager

        return poly_relu_eager(x, weight, bias)
    if name == "fused":
        from moe_model.kernels.polynorm_fused import poly_relu_fused

        return poly_relu_fused(x, weight, bias)
    if name == "triton":
        from moe_model.kernels.polynorm_triton import poly_relu_triton

        return poly_relu_triton(x, weight, bias)
    return _compiled("poly_relu_eager")(x, weight, bias)
