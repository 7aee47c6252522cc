"""Dispatch of PolyNorm / PolyReLU and their gated forms to a kernel backend, chosen by name
from one table.

Backends (``BACKENDS``):

* ``eager``   -- :mod:`.reference`, the paper's math (autograd saves every intermediate; what
  the paper ran, there under activation checkpointing);
* ``fused``   -- :mod:`.polynorm_fused`: ``torch.autograd.Function``s in plain PyTorch that save
  only x (and one fp32 per row and power) and have analytic backwards; any device;
* ``triton``  -- :mod:`.polynorm_triton`: fused Triton kernels, forward and backward. CUDA
  tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before the first use (slow;
  for tests);
* ``compile`` -- ``torch.compile`` of the reference formula (inductor fuses it and derives the
  backward). The first call per shape, dtype and order compiles, which dominates tests and
  short CPU runs; choose it for long CPU runs (``benchmarks/RESULTS.md`` has the numbers);
* ``auto``    -- ``triton`` on CUDA when Triton imports, order <= 4 and (PolyNorm) the row is
  at most ``polynorm_triton.SPILL_FREE_ROW`` (8192) long, else ``fused`` (no warm-up on any
  device). Longer PolyNorm rows spill registers in the Triton kernels (kilobytes a thread at
  65536); ``triton`` asked for by name still takes them, up to 65536.

All take inputs of any leading shape (the last dim is the normalised row), bf16/fp16/fp32, and
compute in fp32, returning the input dtype. Backends import lazily: Triton is optional.

The gated forms (``poly_norm_glu``, ``poly_relu_glu``: ``act(gate) * up`` on the fused input
``[gate | up]`` of width 2H) follow the same table: ``fused`` is :mod:`.gated_fused`, ``triton``
:mod:`.gated_triton` (activation and product in one kernel each way), and ``auto`` applies the
rules above to the gate's width H, up to ``gated_triton.SPILL_FREE_ROW`` (4096).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from moe_model.kernels import reference

__all__ = ["BACKENDS", "poly_norm", "poly_norm_glu", "poly_relu", "poly_relu_glu", "triton_available"]


class Backend(NamedTuple):
    """How to get one backend's functions (imported on first use)."""

    poly_norm: Callable[[], Callable]
    """Returns ``f(x, weight, bias, eps)``."""
    poly_relu: Callable[[], Callable]
    """Returns ``f(x, weight, bias)``."""
    poly_norm_glu: Callable[[], Callable]
    """Returns ``f(x, weight, bias, eps)`` on the fused input [gate | up]."""
    poly_relu_glu: Callable[[], Callable]
    """Returns ``f(x, weight, bias)`` on the fused input [gate | up]."""


def _kernel_module(module: str):
    """A backend's module of ``moe_model.kernels``, imported on first use. Plain import
    statements, not ``importlib``: torch.compile traces these (an already imported module), and
    an ``importlib.import_module`` call would break every compiled MoE block's graph."""
    if module == "polynorm_fused":
        from moe_model.kernels import polynorm_fused as kernels
    elif module == "gated_fused":
        from moe_model.kernels import gated_fused as kernels
    elif module == "polynorm_triton":
        from moe_model.kernels import polynorm_triton as kernels
    elif module == "gated_triton":
        from moe_model.kernels import gated_triton as kernels
    else:
        raise ValueError(f"no kernel module {module!r}")
    return kernels


def _lazy(module: str, name: str) -> Callable[[], Callable]:
    def load():
        return getattr(_kernel_module(module), name)

    return load


def _reference(name: str) -> Callable[[], Callable]:
    return lambda: getattr(reference, name)


@functools.cache
def _compiled(name: str) -> Callable:
    # The reference formula itself: inductor fuses it and derives the backward, so there is no
    # second copy of the math to keep in step.
    return torch.compile(getattr(reference, name))


_BACKENDS: dict[str, Backend] = {
    "eager": Backend(
        _reference("poly_norm_eager"), _reference("poly_relu_eager"),
        _reference("poly_norm_glu_eager"), _reference("poly_relu_glu_eager"),
    ),
    "fused": Backend(
        _lazy("polynorm_fused", "poly_norm_fused"), _lazy("polynorm_fused", "poly_relu_fused"),
        _lazy("gated_fused", "poly_norm_glu_fused"), _lazy("gated_fused", "poly_relu_glu_fused"),
    ),
    "triton": Backend(
        _lazy("polynorm_triton", "poly_norm_triton"), _lazy("polynorm_triton", "poly_relu_triton"),
        _lazy("gated_triton", "poly_norm_glu_triton"), _lazy("gated_triton", "poly_relu_glu_triton"),
    ),
    "compile": Backend(
        lambda: _compiled("poly_norm_eager"), lambda: _compiled("poly_relu_eager"),
        lambda: _compiled("poly_norm_glu_eager"), lambda: _compiled("poly_relu_glu_eager"),
    ),
}  # fmt: skip
BACKENDS = ("auto", *_BACKENDS)


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels import (Triton installed and working)."""
    try:
        from moe_model.kernels import gated_triton, polynorm_triton  # noqa: F401
    except Exception:  # ImportError, or a broken Triton install: fall back, never crash
        return False
    return True


def resolve_backend(
    backend: str, x: torch.Tensor, order: int, *, whole_rows: bool = True,
    row_width: int | None = None, triton_module: str = "polynorm_triton",
) -> str:  # fmt: skip
    """The concrete backend that runs ``x`` for the requested name (``auto`` resolved).

    ``whole_rows``: the kernel holds a row in registers (PolyNorm), so ``auto`` sends only rows
    up to the Triton module's ``SPILL_FREE_ROW`` to Triton; PolyReLU is elementwise and takes
    any width. ``row_width``: the normalised row's length when it is not ``x.shape[-1]`` (the
    gate's H). ``triton_module``: the module of ``moe_model.kernels`` whose kernels would run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown activation backend {backend!r}; expected one of {list(BACKENDS)}")
    if x.numel() == 0:
        # Nothing to compute (an expert without rows); the eager math handles it on any device
        # and still gives the coefficients a (zero) gradient, with no kernel over an empty grid.
        return "eager"
    if backend != "auto":
        return backend
    if x.is_cuda and triton_available():
        limits = _kernel_module(triton_module)
        width = x.shape[-1] if row_width is None else row_width
        if order <= limits.MAX_ORDER and (not whole_rows or width <= limits.SPILL_FREE_ROW):
            return "triton"
    return "fused"


def poly_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str = "auto"
) -> torch.Tensor:
    """sum_i weight[i] * norm(x ** (r - i)) + bias, r = len(weight), norm a per-row RMS norm."""
    name = resolve_backend(backend, x, weight.numel())
    return _BACKENDS[name].poly_norm()(x, weight, bias, eps)


def poly_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """sum_i weight[i] * relu(x) ** (r - i) + bias, r = len(weight)."""
    name = resolve_backend(backend, x, weight.numel(), whole_rows=False)
    return _BACKENDS[name].poly_relu()(x, weight, bias)


def poly_norm_glu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str = "auto"
) -> torch.Tensor:
    """PolyNorm(gate) * up on the fused input [gate | up] (..., 2H) -> (..., H)."""
    name = resolve_backend(
        backend, x, weight.numel(), row_width=x.shape[-1] // 2, triton_module="gated_triton"
    )
    return _BACKENDS[name].poly_norm_glu()(x, weight, bias, eps)


def poly_relu_glu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """PolyReLU(gate) * up on the fused input [gate | up] (..., 2H) -> (..., H)."""
    name = resolve_backend(backend, x, weight.numel(), whole_rows=False, triton_module="gated_triton")
    return _BACKENDS[name].poly_relu_glu()(x, weight, bias)
