"""Triton gated PolyNorm / PolyReLU (``act(gate) * up``), forward and backward, order 1..4.

The input is the expert's fused projection ``[gate | up]``, rows of ``2H`` (row stride 2H,
gate in columns ``0..H``, up in ``H..2H``); the output rows of ``H``. The activation and the
product are one kernel each way, so the activation's output never goes to memory:

* PolyNorm forward: one program per row holds the gate row and the up row in registers,
  computes the gate's PolyNorm as :mod:`.polynorm_triton` does (``rstd`` per power stored, fp32)
  and writes ``PolyNorm(gate) * up`` (the product in fp32, one cast);
* PolyNorm backward: a persistent grid walks rows, recomputes ``a = PolyNorm(gate)`` from the
  saved ``rstd``, writes ``d up = dy * a`` and ``d gate`` = PolyNorm's backward of
  ``g = dy * up``, and keeps its share of dweight (``sum r_p * sum(g * gate**p)``) and dbias
  (``sum g``) in registers: one small partial array summed by torch, no atomics;
* PolyReLU (elementwise): blocks of one row's columns, the forward non-persistent, the backward
  persistent with per-power partial sums of ``g * relu(gate)**p``.

Offsets derived from the program id are int64 (131072 rows x 2 x 8192 passes 2**31);
:mod:`.triton_build` checks the PTX for 32-bit ones. Interpreter mode as in
:mod:`.polynorm_triton` (``TRITON_INTERPRET=1`` before the first import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_model.kernels.polynorm_triton import (
    BWD_PROGRAMS_PER_SM,
    MAX_ORDER,
    MAX_ROW,
    RELU_NUM_WARPS,
    _add_power_products,
    _block_and_warps,
    _check_device,
    _num_programs,
    _poly_norm_row,
    _poly_norm_row_grad,
    _store_power_partials,
)
from moe_model.kernels.reference import split_gate_up
from moe_model.precision import autocast_off

__all__ = ["MAX_ORDER", "SPILL_FREE_ROW", "poly_norm_glu_triton", "poly_relu_glu_triton"]

# num_warps by BLOCK (H rounded up to a power of two), first match from the top, as in
# polynorm_triton. A program holds two rows (gate, up) forward and, backward, gate, up and dy
# plus the running sums (two passes over the powers keep five rows live, not eight), so the
# backward needs more warps than the plain PolyNorm's at the same width. By ptxas -v on sm_90a
# (benchmarks/bench_triton_build.py): aligned 8192 spills 44-80 B at 32 warps (capped at 64
# registers) and none at 16; ragged rows above 4096 (6008) spill at 16 and 32 warps alike. So
# ``auto`` sends gates up to SPILL_FREE_ROW = 4096 here (OLMoE's gated H is 1024), longer ones
# to the fused torch path; ``triton`` asked for by name takes them up to MAX_ROW.
SPILL_FREE_ROW = 4096
_GLU_FWD_WARPS = ((16384, 32), (4096, 16), (2048, 8), (1, 4))
_GLU_FWD_WARPS_RAGGED = ((8192, 32), (2048, 16), (1024, 8), (1, 4))
_GLU_BWD_WARPS = ((16384, 32), (4096, 16), (1024, 8), (1, 4))
_GLU_BWD_WARPS_RAGGED = ((4096, 32), (2048, 16), (512, 8), (1, 4))

# Columns per program of the elementwise PolyReLU kernels (one row's, at most this many).
RELU_GLU_BLOCK = 1024


def poly_norm_glu_fwd_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the gated PolyNorm forward for an output width ``n_cols`` (H)."""
    return _block_and_warps(_GLU_FWD_WARPS, _GLU_FWD_WARPS_RAGGED, n_cols)


def poly_norm_glu_bwd_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the gated PolyNorm backward for an output width ``n_cols`` (H)."""
    return _block_and_warps(_GLU_BWD_WARPS, _GLU_BWD_WARPS_RAGGED, n_cols)


def poly_relu_glu_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the gated PolyReLU kernels for an output width ``n_cols`` (H).

    Ragged widths (not a multiple of 16) take twice the warps: their loads go one element at a
    time, and at 4 warps the order-1 backward spilled 4 B on sm_100a (fp32, fp16)."""
    block = min(RELU_GLU_BLOCK, triton.next_power_of_2(n_cols))
    return block, 2 * RELU_NUM_WARPS if n_cols % 16 else RELU_NUM_WARPS


@triton.jit
def _poly_norm_glu_fwd(X, W, B, Y, RSTD, n_cols, eps, ORDER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = X + row * (2 * n_cols)
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    a = _poly_norm_row(x, W, B, RSTD + row * ORDER, n_cols, eps, ORDER, BLOCK)
    tl.store(Y + row * n_cols + cols, (a * up).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _poly_norm_glu_bwd(
    X, DY, W, B, RSTD, DX, DW_PART, DB_PART, n_rows, n_cols,
    ORDER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    slots = tl.arange(0, 4)  # slot p-1 accumulates dweight for power p (= weight[ORDER - p])
    dw_acc = tl.zeros([4], dtype=tl.float32)
    db_acc = tl.zeros([1], dtype=tl.float32)
    bias = tl.load(B).to(tl.float32)
    zero64 = pid.to(tl.int64) * 0  # int64 row offsets; see polynorm_triton._poly_norm_bwd
    for row in range(pid, n_rows, n_progs):
        row64 = row + zero64
        x_base = row64 * (2 * n_cols)
        y_base = row64 * n_cols
        x = tl.load(X + x_base + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + x_base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + y_base + cols, mask=mask, other=0.0).to(tl.float32)
        # Two passes over the powers keep five rows live at a time (not eight): first
        # a = PolyNorm(gate) and d up = dy * a, then, with dy and up folded into g, d gate.
        a = tl.zeros([BLOCK], dtype=tl.float32) + bias
        xp = x
        for p in tl.static_range(1, ORDER + 1):
            if p > 1:
                xp = xp * x
            r = tl.load(RSTD + row64 * ORDER + (p - 1))
            a += (tl.load(W + (ORDER - p)).to(tl.float32) * r) * xp
        tl.store(DX + x_base + n_cols + cols, (dy * a).to(DX.dtype.element_ty), mask=mask)
        g = dy * up  # the gradient reaching PolyNorm(gate)
        db_acc += tl.sum(g, axis=0)
        dx, dw_acc = _poly_norm_row_grad(x, g, RSTD + row64 * ORDER, W, n_cols, dw_acc, ORDER, BLOCK)
        tl.store(DX + x_base + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + (pid + zero64) * ORDER + (ORDER - 1 - slots), dw_acc, mask=slots < ORDER)
    tl.store(DB_PART + pid + tl.arange(0, 1), db_acc)


@triton.jit
def _poly_relu_glu_fwd(X, W, B, Y, n_cols, n_col_blocks, ORDER: tl.constexpr, BLOCK: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    row = blk // n_col_blocks
    cols = (blk - row * n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = X + row * (2 * n_cols)
    rx = tl.maximum(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), 0.0)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # Horner in relu(gate), W[0] being the highest power's coefficient.
    a = rx * tl.load(W).to(tl.float32)
    for i in tl.static_range(1, ORDER):
        a = (a + tl.load(W + i).to(tl.float32)) * rx
    a += tl.load(B).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (a * up).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _poly_relu_glu_bwd(
    X, DY, W, B, DX, DW_PART, DB_PART, n_rows, n_cols, n_col_blocks,
    ORDER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK], dtype=tl.float32)
    acc4 = tl.zeros([BLOCK], dtype=tl.float32)
    accb = tl.zeros([BLOCK], dtype=tl.float32)
    bias = tl.load(B).to(tl.float32)
    zero64 = pid.to(tl.int64) * 0
    for blk in range(pid, n_rows * n_col_blocks, n_progs):
        blk64 = blk + zero64
        row = blk64 // n_col_blocks
        cols = (blk64 - row * n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x_base = row * (2 * n_cols)
        x = tl.load(X + x_base + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + x_base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rx = tl.maximum(x, 0.0)
        g = dy * up
        # a = PolyReLU(gate) and a' = d a / d gate, both by Horner in relu(gate).
        a = rx * tl.load(W).to(tl.float32)
        d = tl.zeros([BLOCK], dtype=tl.float32) + ORDER * tl.load(W).to(tl.float32)
        for i in tl.static_range(1, ORDER):
            w = tl.load(W + i).to(tl.float32)
            a = (a + w) * rx
            d = d * rx + (ORDER - i) * w
        a += bias
        dgate = tl.where(x > 0, d * g, 0.0)
        tl.store(DX + x_base + cols, dgate.to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + x_base + n_cols + cols, (dy * a).to(DX.dtype.element_ty), mask=mask)
        accb += g
        acc1, acc2, acc3, acc4 = _add_power_products(g, rx, acc1, acc2, acc3, acc4, ORDER)
    _store_power_partials(DW_PART, DB_PART, pid, zero64, acc1, acc2, acc3, acc4, accb, ORDER)


def _rows_2h(x: torch.Tensor, order: int) -> tuple[torch.Tensor, int]:
    """The fused input as contiguous rows (N, 2H) and H; checks order, width and device."""
    _check_device(x)
    split_gate_up(x)  # the one-line error for an odd width
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"triton gated activations support order 1..{MAX_ORDER}, got {order}")
    n_cols = x.shape[-1] // 2
    if n_cols > MAX_ROW:
        raise ValueError(f"triton gated PolyNorm supports H <= {MAX_ROW}, got {n_cols}")
    return x.reshape(-1, x.shape[-1]).contiguous(), n_cols


def launch_poly_norm_glu_fwd(
    x2: torch.Tensor, n_cols: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated PolyNorm forward of rows ``x2`` (N, 2H): ``(y (N, H), rstd (N, order) fp32)``."""
    order = weight.numel()
    n_rows = x2.shape[0]
    y = torch.empty(n_rows, n_cols, dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(n_rows, order, dtype=torch.float32, device=x2.device)
    block, warps = poly_norm_glu_fwd_launch(n_cols)
    if n_rows > 0:
        _poly_norm_glu_fwd[(n_rows,)](
            x2, weight.contiguous(), bias.contiguous(), y, rstd, n_cols, eps,
            ORDER=order, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return y, rstd


def launch_poly_norm_glu_bwd(
    x2: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gated PolyNorm backward: ``(dx (N, 2H), dweight, dbias)``, the last two fp32 sums."""
    order = weight.numel()
    n_rows, n_cols = g.shape
    dx = torch.empty_like(x2)
    block, warps = poly_norm_glu_bwd_launch(n_cols)
    progs = _num_programs(x2.device, n_rows, per_sm=BWD_PROGRAMS_PER_SM)
    dw_part = torch.zeros(progs, order, dtype=torch.float32, device=x2.device)
    db_part = torch.zeros(progs, dtype=torch.float32, device=x2.device)
    if n_rows > 0:
        _poly_norm_glu_bwd[(progs,)](
            x2, g, weight.contiguous(), bias.contiguous(), rstd, dx, dw_part, db_part,
            n_rows, n_cols, ORDER=order, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return dx, dw_part.sum(0), db_part.sum()


class TritonPolyNormGLU(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        x2, n_cols = _rows_2h(x, weight.numel())
        y, rstd = launch_poly_norm_glu_fwd(x2, n_cols, weight, bias, eps)
        ctx.save_for_backward(x2, weight, bias, rstd)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], n_cols)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, bias, rstd = ctx.saved_tensors
        g = grad_out.reshape(x2.shape[0], x2.shape[1] // 2).contiguous()
        dx, dw, db = launch_poly_norm_glu_bwd(x2, g, weight, bias, rstd)
        grad_b = db.reshape(bias.shape).to(bias.dtype)
        return dx.reshape(ctx.x_shape), dw.to(weight.dtype), grad_b, None


class TritonPolyReLUGLU(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        x2, n_cols = _rows_2h(x, weight.numel())
        n_rows = x2.shape[0]
        y = torch.empty(n_rows, n_cols, dtype=x2.dtype, device=x2.device)
        block, warps = poly_relu_glu_launch(n_cols)
        n_col_blocks = triton.cdiv(n_cols, block)
        if n_rows > 0:
            _poly_relu_glu_fwd[(n_rows * n_col_blocks,)](
                x2, weight.contiguous(), bias.contiguous(), y, n_cols, n_col_blocks,
                ORDER=weight.numel(), BLOCK=block, num_warps=warps,
            )  # fmt: skip
        ctx.save_for_backward(x2, weight, bias)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], n_cols)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, bias = ctx.saved_tensors
        order = weight.numel()
        n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
        g = grad_out.reshape(n_rows, n_cols).contiguous()
        dx = torch.empty_like(x2)
        block, warps = poly_relu_glu_launch(n_cols)
        n_col_blocks = triton.cdiv(n_cols, block)
        progs = _num_programs(x2.device, max(1, n_rows * n_col_blocks), per_sm=8)
        dw_part = torch.zeros(progs, order, dtype=torch.float32, device=x2.device)
        db_part = torch.zeros(progs, dtype=torch.float32, device=x2.device)
        if n_rows > 0:
            _poly_relu_glu_bwd[(progs,)](
                x2, g, weight.contiguous(), bias.contiguous(), dx, dw_part, db_part,
                n_rows, n_cols, n_col_blocks, ORDER=order, BLOCK=block, num_warps=warps,
            )  # fmt: skip
        grad_b = db_part.sum().reshape(bias.shape).to(bias.dtype)
        return dx.reshape(ctx.x_shape), dw_part.sum(0).to(weight.dtype), grad_b


def poly_norm_glu_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return TritonPolyNormGLU.apply(x, weight, bias, eps)


def poly_relu_glu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return TritonPolyReLUGLU.apply(x, weight, bias)
