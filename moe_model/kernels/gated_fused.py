"""Gated PolyNorm / PolyReLU (``act(gate) * up``) as ``torch.autograd.Function``s in plain
PyTorch (any device): the fallback of the Triton kernels and the fast path on CPU.

The input is the expert's fused projection ``[gate | up]`` (N, 2H); the output (N, H). They save
the input in its own dtype (and, for PolyNorm, one fp32 ``rsqrt`` per row and power), recompute
``act(gate)`` in the backward, and compute in fp32 with one cast back at the end -- the product
included, as Motif's ``FusedMulPolyNorm`` does (see :mod:`.reference`). With ``a = act(gate)``::

    y       = a * up
    d up    = dy * a
    d gate  = act'(gate)^T (dy * up)      (PolyNorm's / PolyReLU's backward of g = dy * up)
    dweight, dbias: those of act for g = dy * up
"""

from __future__ import annotations

import torch

from moe_model.kernels.polynorm_fused import (
    _acc,
    _check,
    _rows,
    poly_norm_rows_backward,
    poly_norm_rows_forward,
    poly_relu_backward,
    poly_relu_forward,
)
from moe_model.kernels.reference import split_gate_up
from moe_model.precision import autocast_off

__all__ = ["poly_norm_glu_fused", "poly_relu_glu_fused"]


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (gate, up) rows (N, H) of the fused input (..., 2H)."""
    split_gate_up(x)  # the one-line error for an odd width, naming the caller's shape
    return _rows(x).chunk(2, dim=-1)


def _out_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], x.shape[-1] // 2)


def _grad_input(d_gate: torch.Tensor, d_up: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[d gate | d up] in the input's dtype and shape."""
    return torch.cat([d_gate, d_up], dim=-1).to(x.dtype).reshape(x.shape)


class PolyNormGLUFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        _check(x, weight, bias)
        gate, up = _halves(x)
        a, rstd = poly_norm_rows_forward(
            gate, weight.detach().to(_acc(x)), bias.detach().to(_acc(x)), eps
        )
        ctx.save_for_backward(x, weight, bias, rstd)
        return (a * up).to(x.dtype).reshape(_out_shape(x))

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, bias, rstd = ctx.saved_tensors
        gate, up = _halves(x)
        w32 = weight.detach().to(_acc(x))
        g = grad_out.reshape(up.shape).to(up.dtype)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        g_act = g * up
        d_gate, dw = poly_norm_rows_backward(gate, g_act, w32, rstd, need_dx, need_dw)
        d_up = None
        if need_dx:
            # a = PolyNorm(gate) again, from the saved statistics: sum_p w_p r_p gate**p + b.
            order = w32.numel()
            a = bias.detach().to(_acc(x)).reshape(1, 1).expand_as(gate).clone()
            gp = gate
            for p in range(1, order + 1):
                a.addcmul_(gp, rstd[:, p - 1 : p] * w32[order - p])
                gp = gp * gate
            d_up = a.mul_(g)
        grad_x = _grad_input(d_gate, d_up, x) if need_dx else None
        grad_w = dw.to(weight.dtype) if need_dw else None
        grad_b = g_act.sum().reshape(bias.shape).to(bias.dtype) if need_db else None
        return grad_x, grad_w, grad_b, None


class PolyReLUGLUFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        _check(x, weight, bias)
        gate, up = _halves(x)
        a = poly_relu_forward(torch.relu(gate), weight.detach().to(_acc(x)), bias.detach().to(_acc(x)))
        ctx.save_for_backward(x, weight, bias)
        return a.mul_(up).to(x.dtype).reshape(_out_shape(x))

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        gate, up = _halves(x)
        w32 = weight.detach().to(_acc(x))
        g = grad_out.reshape(up.shape).to(up.dtype)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        g_act = g * up
        d_gate, dw = poly_relu_backward(gate, g_act, w32, need_dx, need_dw)
        d_up = None
        if need_dx:
            d_up = poly_relu_forward(torch.relu(gate), w32, bias.detach().to(_acc(x))).mul_(g)
        grad_x = _grad_input(d_gate, d_up, x) if need_dx else None
        grad_w = dw.to(weight.dtype) if need_dw else None
        grad_b = g_act.sum().reshape(bias.shape).to(bias.dtype) if need_db else None
        return grad_x, grad_w, grad_b


def poly_norm_glu_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return PolyNormGLUFunction.apply(x, weight, bias, eps)


def poly_relu_glu_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return PolyReLUGLUFunction.apply(x, weight, bias)
