"""Triton PolyNorm and PolyReLU, forward and backward, for any order 1..4.

PolyNorm is bandwidth-bound (few FLOPs per byte): the floor is one read of x and one
write of y forward, one read of x and dy and one write of dx backward. So:

* forward: one program per row holds the whole row in registers (``BLOCK`` = next power of two
  of the row length), computes x**p by repeated multiplication, one row-sum per power, and
  stores y plus ``rstd[row, p-1] = rsqrt(mean(x**2p) + eps)`` (``order`` fp32 per row);
* backward: a grid of a few programs per SM, each walking a strided set of rows, recomputes
  x**p from x, needs one extra row-sum per power (``sum(dy * x**p)``) and accumulates its
  share of dweight and dbias in registers; one small (programs x order) partial array is then
  summed by torch. No atomics, so the result is deterministic.

PolyReLU is elementwise: a flat forward kernel, and a backward whose programs keep per-power
partial sums of ``dy * relu(x)**p`` for dweight.

Interpreter mode: Triton decides at decoration time (``triton.jit``) whether a kernel runs on
the GPU or in its NumPy interpreter, from ``TRITON_INTERPRET=1`` in the environment. Set it
before this module is first imported to run these kernels on CPU tensors (the tests do).

Math and the weight convention (``weight[0]`` multiplies the highest power) are documented in
:mod:`moe_model.kernels.polynorm_fused`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moe_model.precision import autocast_off

# One program holds a whole row in registers. Up to SPILL_FREE_ROW every kernel builds without
# register spills for sm_90a and sm_100a at every order and dtype (ptxas -v; the build tests and
# benchmarks/bench_triton_build.py check it), so ``auto`` sends rows up to there to Triton and longer
# ones to the fused torch path. Longer rows still launch when asked for (backend ``triton``) up
# to MAX_ROW, but spill: at 65536, 32 warps cap ptxas at 64 registers a thread and the backward
# spills 0.5-4 KB a thread (benchmarks/results/triton_build_sm90.json, ``--widths``).
SPILL_FREE_ROW = 8192
MAX_ROW = 65536
MAX_ORDER = 4
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# num_warps by BLOCK (the row length rounded up to a power of two), first match from the top:
# enough threads that each holds few elements of the row, so that ptxas fits them without
# spilling (it caps registers well below the 255 a thread may have: 48-64 at 4-8 warps).
# Ragged rows (a width not a multiple of 16) have tables of their own: Triton cannot prove
# their loads aligned and issues them one element at a time, with an address register each.
# What moved from the old single table (one rule for both kernels), by ptxas -v on sm_90a:
# - forward 4096: 8 -> 16 warps (8 elements a thread, as 2048 at 8): 48 registers and a
#   4-byte spill at order 3 (bf16, fp16) before;
# - ragged forward 1024: 4 -> 8 warps (4-byte spill at order 4, fp32, 520 and 1000 wide);
# - ragged backward 2048: 8 -> 16 warps, 4096: 8 -> 32 (16 spilled 8 B at order 3 on sm_100a,
#   3000 wide); 8192 stays at 16 (32 cap ptxas at 64 registers: 8 B spilled at order 4, 6008).
# benchmarks/bench_triton_build.py prints the whole table; the build tests hold it spill-free.
_FWD_WARPS = ((32768, 32), (4096, 16), (2048, 8), (1, 4))
_FWD_WARPS_RAGGED = ((32768, 32), (4096, 16), (1024, 8), (1, 4))
_BWD_WARPS = ((32768, 32), (8192, 16), (2048, 8), (1, 4))
_BWD_WARPS_RAGGED = ((16384, 32), (8192, 16), (4096, 32), (2048, 16), (1, 4))


def _block_and_warps(aligned: tuple, ragged: tuple, n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    table = ragged if n_cols % 16 else aligned
    return block, next(warps for min_block, warps in table if block >= min_block)


def poly_norm_fwd_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the PolyNorm forward for rows of ``n_cols``."""
    return _block_and_warps(_FWD_WARPS, _FWD_WARPS_RAGGED, n_cols)


def poly_norm_bwd_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the PolyNorm backward for rows of ``n_cols``."""
    return _block_and_warps(_BWD_WARPS, _BWD_WARPS_RAGGED, n_cols)


def _num_programs(device: torch.device, n_work: int, per_sm: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: programs run one after another; few keeps the Python loop short
        sms = 2
    return max(1, min(n_work, sms * per_sm))


@triton.jit
def _poly_norm_row(x, W, B, RSTD_ROW, n_cols, eps, ORDER: tl.constexpr, BLOCK: tl.constexpr):
    """PolyNorm of one row ``x`` (fp32, masked columns 0), fp32; stores each power's
    ``r_p = rsqrt(mean(x**2p) + eps)`` at ``RSTD_ROW + p - 1`` for the backward."""
    y = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(B).to(tl.float32)
    xp = x
    for p in tl.static_range(1, ORDER + 1):
        if p > 1:
            xp = xp * x
        # Masked columns are 0, so they add nothing to the sum; divide by the true length.
        r = tl.rsqrt(tl.sum(xp * xp, axis=0) / n_cols + eps)
        w = tl.load(W + (ORDER - p)).to(tl.float32)
        y += (w * r) * xp
        tl.store(RSTD_ROW + (p - 1), r)
    return y


@triton.jit
def _poly_norm_fwd(X, W, B, Y, RSTD, n_cols, eps, ORDER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = _poly_norm_row(x, W, B, RSTD + row * ORDER, n_cols, eps, ORDER, BLOCK)
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _poly_norm_row_grad(x, g, RSTD_ROW, W, n_cols, dw_acc, ORDER: tl.constexpr, BLOCK: tl.constexpr):
    """PolyNorm's backward of one row: ``(dx, dw_acc)``, dx for the output gradient ``g`` at
    ``x`` (fp32 rows), and ``r_p * sum(g * x**p)`` added to slot p-1 of ``dw_acc`` (4 slots)."""
    slots = tl.arange(0, 4)
    dx = tl.zeros([BLOCK], dtype=tl.float32)
    xp = x
    xpm1 = x  # x**(p-1); unused for p == 1
    for p in tl.static_range(1, ORDER + 1):
        if p > 1:
            xpm1 = xp
            xp = xp * x
        r = tl.load(RSTD_ROW + (p - 1))
        w = tl.load(W + (ORDER - p)).to(tl.float32)
        gxp = tl.sum(g * xp, axis=0)
        # d norm(u)/du applied to g: r * (g - r^2 * u * mean(g * u)), chained by p x^(p-1).
        term = (w * p * r) * (g - (r * r * gxp / n_cols) * xp)
        if p > 1:
            term = term * xpm1
        dx += term
        dw_acc += tl.where(slots == p - 1, r * gxp, 0.0)
    return dx, dw_acc


@triton.jit
def _poly_norm_bwd(
    X, DY, W, RSTD, DX, DW_PART, DB_PART, n_rows, n_cols,
    ORDER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    slots = tl.arange(0, 4)  # slot p-1 accumulates dweight for power p (= weight[ORDER - p])
    dw_acc = tl.zeros([4], dtype=tl.float32)
    db_acc = tl.zeros([1], dtype=tl.float32)
    # int64 offsets (rows * n_cols can pass 2**31); adding an int64 zero promotes the loop
    # index, which is a plain int under the interpreter and has no .to() there.
    zero64 = pid.to(tl.int64) * 0
    for row in range(pid, n_rows, n_progs):
        row64 = row + zero64
        base = row64 * n_cols
        x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
        db_acc += tl.sum(g, axis=0)
        dx, dw_acc = _poly_norm_row_grad(x, g, RSTD + row64 * ORDER, W, n_cols, dw_acc, ORDER, BLOCK)
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
    # Store in weight order: power p goes to column ORDER - p. The offset in int64 like every
    # offset from the program id (triton_build.row_offset_32bit_ops checks the PTX for it).
    tl.store(DW_PART + (pid + zero64) * ORDER + (ORDER - 1 - slots), dw_acc, mask=slots < ORDER)
    tl.store(DB_PART + pid + tl.arange(0, 1), db_acc)


@triton.jit
def _poly_relu_fwd(X, W, B, Y, n_elem, ORDER: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    rx = tl.maximum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    # Horner in relu(x): ((w_r rx + w_{r-1}) rx + ...) rx + b, W[0] being w_r.
    y = rx * tl.load(W).to(tl.float32)
    for i in tl.static_range(1, ORDER):
        y = (y + tl.load(W + i).to(tl.float32)) * rx
    y += tl.load(B).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_power_products(g, rx, acc1, acc2, acc3, acc4, ORDER: tl.constexpr):
    """acc_p += g * rx**p for p = 1..ORDER (PolyReLU's dweight terms; unused ones unchanged)."""
    gp = g * rx
    acc1 += gp
    if ORDER >= 2:
        gp = gp * rx
        acc2 += gp
    if ORDER >= 3:
        gp = gp * rx
        acc3 += gp
    if ORDER >= 4:
        gp = gp * rx
        acc4 += gp
    return acc1, acc2, acc3, acc4


@triton.jit
def _store_power_partials(
    DW_PART, DB_PART, pid, zero64, acc1, acc2, acc3, acc4, accb, ORDER: tl.constexpr
):
    """This program's dweight (row ``pid`` of DW_PART, in weight order: slot ORDER - p holds
    power p) and dbias partial sums."""
    out = DW_PART + (pid + zero64) * ORDER
    tl.store(out + (ORDER - 1), tl.sum(acc1, axis=0))
    if ORDER >= 2:
        tl.store(out + (ORDER - 2), tl.sum(acc2, axis=0))
    if ORDER >= 3:
        tl.store(out + (ORDER - 3), tl.sum(acc3, axis=0))
    if ORDER >= 4:
        tl.store(out + (ORDER - 4), tl.sum(acc4, axis=0))
    tl.store(DB_PART + pid + tl.arange(0, 1), tl.sum(accb, axis=0) + tl.zeros([1], tl.float32))


@triton.jit
def _poly_relu_bwd(
    X, DY, W, DX, DW_PART, DB_PART, n_elem, ORDER: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    # Vector accumulators, reduced once at the end (one per power; unused ones stay zero).
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK], dtype=tl.float32)
    acc4 = tl.zeros([BLOCK], dtype=tl.float32)
    accb = tl.zeros([BLOCK], dtype=tl.float32)
    n_blocks = tl.cdiv(n_elem, BLOCK)
    zero64 = pid.to(tl.int64) * 0  # see _poly_norm_bwd
    for blk in range(pid, n_blocks, n_progs):
        offs = (blk + zero64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rx = tl.maximum(x, 0.0)
        # d/dx = sum_p p w_p rx^(p-1) [x > 0], Horner in rx.
        d = tl.zeros([BLOCK], dtype=tl.float32) + ORDER * tl.load(W).to(tl.float32)
        for i in tl.static_range(1, ORDER):
            d = d * rx + (ORDER - i) * tl.load(W + i).to(tl.float32)
        dx = tl.where(x > 0, d * g, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        accb += g
        acc1, acc2, acc3, acc4 = _add_power_products(g, rx, acc1, acc2, acc3, acc4, ORDER)
    _store_power_partials(DW_PART, DB_PART, pid, zero64, acc1, acc2, acc3, acc4, accb, ORDER)


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "the triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
            "moe_model.kernels.polynorm_triton is imported (CPU interpreter, slow)"
        )


# Backward programs per SM: several hide load latency; each keeps its dweight share in registers.
BWD_PROGRAMS_PER_SM = 8


def launch_poly_norm_fwd(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    *, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PolyNorm forward of contiguous rows ``x2`` (rows, cols): ``(y, rstd)``, rstd (rows, order)
    fp32. ``num_warps`` None = by row length; benchmarks/bench_kernel_tuning.py sweeps it."""
    order = weight.numel()
    n_rows, n_cols = x2.shape
    if not 1 <= order <= MAX_ORDER or n_cols > MAX_ROW:
        raise ValueError(f"triton PolyNorm supports order 1..{MAX_ORDER} and rows <= {MAX_ROW}")
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, order, dtype=torch.float32, device=x2.device)
    block, default_warps = poly_norm_fwd_launch(n_cols)
    if n_rows > 0:
        _poly_norm_fwd[(n_rows,)](
            x2, weight.contiguous(), bias.contiguous(), y, rstd, n_cols, eps,
            ORDER=order, BLOCK=block, num_warps=num_warps or default_warps,
        )  # fmt: skip
    return y, rstd


def launch_poly_norm_bwd(
    x2: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    *, num_warps: int | None = None, programs_per_sm: int = BWD_PROGRAMS_PER_SM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """PolyNorm backward of contiguous rows: ``(dx, dweight, dbias)``, the last two fp32 sums."""
    order = weight.numel()
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2)
    block, default_warps = poly_norm_bwd_launch(n_cols)
    progs = _num_programs(x2.device, n_rows, per_sm=programs_per_sm)
    dw_part = torch.zeros(progs, order, dtype=torch.float32, device=x2.device)
    db_part = torch.zeros(progs, dtype=torch.float32, device=x2.device)
    if n_rows > 0:
        _poly_norm_bwd[(progs,)](
            x2, g, weight.contiguous(), rstd, dx, dw_part, db_part, n_rows, n_cols,
            ORDER=order, BLOCK=block, num_warps=num_warps or default_warps,
        )  # fmt: skip
    return dx, dw_part.sum(0), db_part.sum()


class TritonPolyNorm(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        _check_device(x)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = launch_poly_norm_fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.bias_meta = (bias.shape, bias.dtype)
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        g = grad_out.reshape(x2.shape).contiguous()
        dx, dw, db = launch_poly_norm_bwd(x2, g, weight, rstd)
        bias_shape, bias_dtype = ctx.bias_meta
        return dx.reshape(ctx.x_shape), dw.to(weight.dtype), db.reshape(bias_shape).to(bias_dtype), None


# Elements per program of the flat PolyReLU kernels: 16 B/thread loads at 4 warps for bf16.
RELU_BLOCK = 2048
RELU_NUM_WARPS = 4


class TritonPolyReLU(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        _check_device(x)
        order = weight.numel()
        if not 1 <= order <= MAX_ORDER:
            raise ValueError(f"triton PolyReLU supports order 1..{MAX_ORDER}")
        xc = x.contiguous()
        y = torch.empty_like(xc)
        n = xc.numel()
        if n > 0:
            _poly_relu_fwd[(triton.cdiv(n, RELU_BLOCK),)](
                xc, weight.contiguous(), bias.contiguous(), y, n, ORDER=order, BLOCK=RELU_BLOCK
            )
        ctx.save_for_backward(xc, weight)
        ctx.bias_meta = (bias.shape, bias.dtype)
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out: torch.Tensor):
        xc, weight = ctx.saved_tensors
        order = weight.numel()
        g = grad_out.contiguous()
        dx = torch.empty_like(xc)
        n = xc.numel()
        progs = _num_programs(xc.device, triton.cdiv(max(n, 1), RELU_BLOCK), per_sm=8)
        dw_part = torch.zeros(progs, order, dtype=torch.float32, device=xc.device)
        db_part = torch.zeros(progs, dtype=torch.float32, device=xc.device)
        if n > 0:
            _poly_relu_bwd[(progs,)](
                xc, g, weight.contiguous(), dx, dw_part, db_part, n, ORDER=order, BLOCK=RELU_BLOCK
            )
        bias_shape, bias_dtype = ctx.bias_meta
        return dx, dw_part.sum(0).to(weight.dtype), db_part.sum().reshape(bias_shape).to(bias_dtype)


def poly_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return TritonPolyNorm.apply(x, weight, bias, eps)


def poly_relu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return TritonPolyReLU.apply(x, weight, bias)
