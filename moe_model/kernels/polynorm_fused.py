"""PolyNorm and PolyReLU as ``torch.autograd.Function``s in plain PyTorch (any device).

Why this exists: the eager reference lets autograd save every intermediate (x**p, each norm,
each product) in fp32, about ``3 * order`` fp32 copies of the input per call. These functions
save only the input (in its own dtype) and, for PolyNorm, one fp32 ``rsqrt`` per row and power,
and compute the backward analytically. They are the fast path on CPU and the fallback on any
device without Triton.

Math (``weight[0]`` multiplies the highest power; ``w_p = weight[order - p]``)::

    norm(u)     = u * rsqrt(mean(u**2, -1) + eps)
    PolyNorm(x) = sum_p w_p * norm(x**p) + bias          p = 1..order
    PolyReLU(x) = sum_p w_p * relu(x)**p + bias

PolyNorm backward, with ``r_p = rsqrt(mean(x**2p) + eps)`` and ``s_p = mean(g * x**p)`` per row::

    dx   = sum_p w_p * p * x**(p-1) * r_p * (g - r_p**2 * x**p * s_p)
    dw_p = sum_rows r_p * sum(g * x**p)
    db   = sum(g)
"""

from __future__ import annotations

import torch

from moe_model.precision import autocast_off


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> int:
    order = weight.numel()
    if weight.dim() != 1 or order < 1:
        raise ValueError(f"weight must have shape (order,) with order >= 1, got {tuple(weight.shape)}")
    if bias.numel() != 1:
        raise ValueError(f"bias must have one element, got shape {tuple(bias.shape)}")
    if x.dim() == 0:
        raise ValueError("input must have at least one dimension (the normalised one)")
    return order


def _acc(t: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; float64 stays float64 (so gradcheck sees exact math)."""
    return torch.promote_types(t.dtype, torch.float32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The input as fp32 rows of its last dimension (a copy only when a cast is needed)."""
    return x.reshape(-1, x.shape[-1]).to(_acc(x))


def _powers(x32: torch.Tensor, order: int) -> list[torch.Tensor]:
    """[x, x**2, ..., x**order] by repeated multiplication (cheaper than pow, same in fp32)."""
    out = [x32]
    for _ in range(order - 1):
        out.append(out[-1] * x32)
    return out


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) as an (N, 1) column without materialising a * b."""
    # Why einsum: it lowers to a batched dot product; (a * b).sum(-1) writes a full temporary.
    # A bmm is what autocast casts to bf16: the callers run with autocast off (precision.py).
    return torch.einsum("nd,nd->n", a, b).unsqueeze(-1)


def poly_norm_rows_forward(
    x32: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PolyNorm of accumulation-dtype rows (N, C): ``(y, rstd)``, rstd (N, order) per power."""
    order = w32.numel()
    n_cols = x32.shape[-1]
    xs = _powers(x32, order)
    rstd = torch.empty(x32.shape[0], order, dtype=x32.dtype, device=x32.device)
    # Broadcast the bias tensor rather than .item() (a host sync on accelerators).
    y = b32.reshape(1, 1).expand_as(x32).clone()
    for p in range(1, order + 1):
        xp = xs[p - 1]
        r = torch.rsqrt(_rowdot(xp, xp) / n_cols + eps)
        rstd[:, p - 1 : p] = r
        y.addcmul_(xp, r * w32[order - p])
    return y, rstd


def poly_norm_rows_backward(
    x32: torch.Tensor, g: torch.Tensor, w32: torch.Tensor, rstd: torch.Tensor,
    need_dx: bool, need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(dx, dweight) of PolyNorm for rows ``x32`` and output gradient ``g`` (same shape)."""
    order = w32.numel()
    n_cols = x32.shape[-1]
    xs = _powers(x32, order)
    # dx = g * sum_p a_p x**(p-1)  -  sum_p c_p x**(2p-1), with per-row a_p, c_p:
    # grouping by power keeps every step a single fused multiply-add over the rows.
    dx = torch.zeros_like(x32) if need_dx else None
    dw = torch.empty(order, dtype=g.dtype, device=x32.device) if need_dw else None
    for p in range(1, order + 1):
        xp = xs[p - 1]
        r = rstd[:, p - 1 : p]
        gxp = _rowdot(g, xp)  # (N, 1): sum(g * x**p)
        if need_dw:
            dw[order - p] = (r * gxp).sum()
        if need_dx:
            a = (w32[order - p] * p) * r
            c = a * r * r * (gxp / n_cols)
            dx.addcmul_(g if p == 1 else g * xs[p - 2], a)
            # x**(2p-1) = x**p * x**(p-1)
            dx.addcmul_(xp if p == 1 else xp * xs[p - 2], c, value=-1.0)
    return dx, dw


def poly_relu_forward(rx: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor) -> torch.Tensor:
    """PolyReLU of ``rx = relu(x)`` in the accumulation dtype (a new tensor)."""
    order = w32.numel()
    # Horner in relu(x): ((w_r rx + w_{r-1}) rx + ...) rx + b, weight[0] being w_r.
    y = rx * w32[0]
    for i in range(1, order):
        y.add_(w32[i]).mul_(rx)
    return y.add_(b32.reshape(()))


def poly_relu_backward(
    x32: torch.Tensor, g: torch.Tensor, w32: torch.Tensor, need_dx: bool, need_dw: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight) of PolyReLU at ``x32`` for output gradient ``g`` (accumulation dtype)."""
    order = w32.numel()
    rx = torch.relu(x32)
    dx = dw = None
    if need_dx:
        # d/dx = sum_p p w_p relu(x)**(p-1) * [x > 0], Horner in relu(x).
        if order == 1:
            dx = g * w32[0]
        else:
            dx = rx * (order * w32[0])
            for i in range(1, order - 1):
                dx.add_((order - i) * w32[i]).mul_(rx)
            dx.add_(w32[order - 1]).mul_(g)
        dx.mul_(x32 > 0)
    if need_dw:
        dw = torch.empty(order, dtype=g.dtype, device=x32.device)
        gp = g
        for p in range(1, order + 1):
            gp = gp * rx
            dw[order - p] = gp.sum()
    return dx, dw


class PolyNormFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        _check(x, weight, bias)
        y, rstd = poly_norm_rows_forward(
            _rows(x), weight.detach().to(_acc(x)), bias.detach().to(_acc(x)), eps
        )
        ctx.save_for_backward(x, weight, rstd)
        ctx.bias_shape = bias.shape
        ctx.bias_dtype = bias.dtype
        return y.to(x.dtype).reshape(x.shape)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = _rows(x)
        g = grad_out.reshape(x32.shape).to(x32.dtype)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw = poly_norm_rows_backward(
            x32, g, weight.detach().to(_acc(x)), rstd, need_dx, need_dw
        )
        grad_x = dx.to(x.dtype).reshape(x.shape) if need_dx else None
        grad_w = dw.to(weight.dtype) if need_dw else None
        grad_b = g.sum().reshape(ctx.bias_shape).to(ctx.bias_dtype) if need_db else None
        return grad_x, grad_w, grad_b, None


class PolyReLUFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        _check(x, weight, bias)
        w32 = weight.detach().to(_acc(x))
        y = poly_relu_forward(torch.relu(x.to(_acc(x))), w32, bias.detach().to(_acc(x)))
        ctx.save_for_backward(x, weight)
        ctx.bias_shape = bias.shape
        ctx.bias_dtype = bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        x32 = x.to(_acc(x))
        g = grad_out.to(x32.dtype)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw = poly_relu_backward(x32, g, weight.detach().to(_acc(x)), need_dx, need_dw)
        grad_x = dx.to(x.dtype) if need_dx else None
        grad_w = dw.to(weight.dtype) if need_dw else None
        grad_b = g.sum().reshape(ctx.bias_shape).to(ctx.bias_dtype) if need_db else None
        return grad_x, grad_w, grad_b


def poly_norm_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return PolyNormFunction.apply(x, weight, bias, eps)


def poly_relu_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return PolyReLUFunction.apply(x, weight, bias)
