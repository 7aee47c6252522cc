"""The Triton kernels built for H100 (sm_90a) and B200 (sm_100a) on CPU, checked by the GPU's rules.

Each case compiles a kernel with the signature and launch parameters its launcher uses
(``moe_model.kernels.triton_build``: PTX and cubin with the ptxas Triton ships, no driver) and
asserts that it builds, spills no register, and computes row offsets in 64 bits.

The suite builds a representative subset (builds cached by Triton after the first run):
every kernel x order 1-4 in bf16 at the paper's width on sm_90a; every dtype at order 3 on
sm_100a; on sm_90a at the heaviest case (order 4, fp32) the configs' small width (384), the
widest row ``auto`` launches (8192) and ragged rows (1000, 1500, 6008: widths not a multiple
of 16 use another launch table), and for the gated PolyNorm OLMoE's gated H (1024), the widest
gate ``auto`` launches (4096) and a ragged one (3000). ``benchmarks/bench_triton_build.py`` builds the
full matrix (every kernel x order x dtype x width, both GPUs) and fails on the same rules.
"""

from __future__ import annotations

import platform

import pytest
import torch

from moe_model.kernels import dispatch as kernels

if platform.system() != "Linux":  # Triton is a dev dependency on Linux: a failure there
    pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moe_model.kernels.triton_build import KERNELS, build_kernel, row_offset_32bit_ops  # noqa: E402

PAPER_WIDTH = 1536  # configs/olmoe-1b-7b-polynorm.yaml; configs/tiny.yaml and small-gpu use 384
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

CASES = sorted(
    {(k, 90, "bf16", order, PAPER_WIDTH) for k in KERNELS for order in (1, 2, 3, 4)}
    | {(k, 100, dtype, 3, PAPER_WIDTH) for k in KERNELS for dtype in DTYPES}
    | {(k, 90, "fp32", 4, width)
       for k in ("poly_norm_fwd", "poly_norm_bwd")
       for width in (384, 8192, 1000, 1500, 6008)}  # fmt: skip
    # Gated PolyNorm (width = the gate's H): OLMoE's gated H, the widest row auto launches, ragged.
    | {(k, 90, "fp32", 4, width)
       for k in ("poly_norm_glu_fwd", "poly_norm_glu_bwd")
       for width in (1024, 4096, 3000)}  # fmt: skip
    # Gated PolyReLU at a ragged H: the order-1 backward spilled on sm_100a at 4 warps.
    | {(k, 100, dtype, 1, 1000) for k in ("poly_relu_glu_fwd", "poly_relu_glu_bwd") for dtype in DTYPES}
)


@pytest.mark.parametrize("kernel, arch, dtype, order, width", CASES, ids=lambda v: str(v))
def test_kernel_builds_without_spills_and_with_64bit_offsets(kernel, arch, dtype, order, width):
    build = build_kernel(kernel, arch, DTYPES[dtype], order, width)
    assert build.registers > 0  # ptxas reported on a real cubin build
    assert (build.spill_stores, build.spill_loads, build.stack_frame) == (0, 0, 0), (
        f"{kernel} sm_{arch}a {dtype} order {order} width {width} at {build.num_warps} warps: "
        f"{build.registers} registers, spills {build.spill_stores}/{build.spill_loads} B, "
        f"stack {build.stack_frame} B"
    )
    assert build.offset_32bit_ops == (), f"32-bit multiplies of the program id: {build.offset_32bit_ops}"


# ---------------------------------------------------------------------------------------------
# The 64-bit offset check can fail: a kernel that computes row * n_cols in 32 bits is caught.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _copy_rows_int32_offsets(X, Y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    tl.store(Y + row * n_cols + cols, tl.load(X + row * n_cols + cols, mask=mask), mask=mask)


@triton.jit
def _copy_rows_int64_offsets(X, Y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    tl.store(Y + row * n_cols + cols, tl.load(X + row * n_cols + cols, mask=mask), mask=mask)


@triton.jit
def _copy_blocks_int32_offsets(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # a power-of-two constant: a shift
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def _ptx(fn, signature: dict) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, "BLOCK": "constexpr"}, constexprs={"BLOCK": 1024})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def test_offset_check_flags_32bit_row_offsets():
    rows = {"X": "*bf16", "Y": "*bf16", "n_cols": "i32"}
    flagged = row_offset_32bit_ops(_ptx(_copy_rows_int32_offsets, rows))
    assert flagged and all("mul.lo" in line or "mad.lo" in line for line in flagged), flagged
    assert row_offset_32bit_ops(_ptx(_copy_rows_int64_offsets, rows)) == []
    flat = {"X": "*bf16", "Y": "*bf16", "n": "i32"}
    assert any("shl.b32" in line for line in row_offset_32bit_ops(_ptx(_copy_blocks_int32_offsets, flat)))


# ---------------------------------------------------------------------------------------------
# Rows longer than the spill-free range go to the fused path under auto.
# ---------------------------------------------------------------------------------------------


def test_auto_sends_only_spill_free_rows_to_triton():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_model.kernels.polynorm_triton import SPILL_FREE_ROW

    assert kernels.triton_available()
    with FakeTensorMode():  # CUDA tensors without a GPU: routing reads only device and shape
        def on_cuda(width):
            return torch.empty(4, width, device="cuda")

        assert SPILL_FREE_ROW == 8192
        assert kernels.resolve_backend("auto", on_cuda(PAPER_WIDTH), 3) == "triton"
        assert kernels.resolve_backend("auto", on_cuda(SPILL_FREE_ROW), 4) == "triton"
        for width in (SPILL_FREE_ROW + 1, 16384, 65536):
            assert kernels.resolve_backend("auto", on_cuda(width), 3) == "fused", width
            # PolyReLU is elementwise: any width stays on Triton; naming triton keeps it too.
            assert kernels.resolve_backend("auto", on_cuda(width), 3, whole_rows=False) == "triton"
            assert kernels.resolve_backend("triton", on_cuda(width), 3) == "triton"
        assert kernels.resolve_backend("auto", on_cuda(PAPER_WIDTH), 5) == "fused"  # order > 4


def test_auto_sends_only_spill_free_gates_to_triton():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_model.kernels.gated_triton import SPILL_FREE_ROW

    assert SPILL_FREE_ROW == 4096  # aligned 8192 and ragged 6008 gates spill in the backward
    with FakeTensorMode():
        def route(h, backend="auto", order=3):
            return kernels.resolve_backend(
                backend, torch.empty(4, 2 * h, device="cuda"), order, row_width=h,
                triton_module="gated_triton",
            )  # fmt: skip

        assert route(1024) == "triton" and route(SPILL_FREE_ROW, order=4) == "triton"
        for h in (SPILL_FREE_ROW + 1, 8192, 16384):
            assert route(h) == "fused", h
            assert route(h, backend="triton") == "triton"
        assert route(1024, order=5) == "fused"
