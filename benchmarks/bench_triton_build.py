"""Build every Triton kernel for one GPU on CPU and record what ptxas reports.

For ``--arch`` 90 (H100, sm_90a) or 100 (B200, sm_100a), each kernel of
moe_model/kernels/polynorm_triton.py and gated_triton.py x order 1-4 x bf16/fp32/fp16 x row
width (PolyNorm, and the gated kernels, whose width is the gate's H; the plain PolyReLU kernels
are elementwise and built once per order and dtype) is compiled with the launch parameters its
launcher picks (moe_model/kernels/triton_build.py). Per build: BLOCK,
num_warps, registers, spill bytes, stack frame, dynamic shared memory, and the count of
32-bit multiplies of program-id-derived values in the PTX (row offsets that could wrap).

Default widths: the configs' (384, 1536), 1024-8192 in powers of two, ragged ones (1000, 1500,
3000, 6008: not multiples of 16) -- every width ``auto`` sends to Triton is one of these
launch shapes -- and 16384, 65536 (above ``SPILL_FREE_ROW``: ``auto`` sends them to the fused
path; recorded to show why; the gated PolyNorm's limit is ``gated_triton.SPILL_FREE_ROW``,
4096). The run fails (exit 1) if any build ``auto`` would launch spills
or has a 32-bit row offset. Builds are cached (Triton's cache): a rerun takes seconds.

    python -m benchmarks.bench_triton_build --arch 90    # benchmarks/results/triton_build_sm90.json
    python -m benchmarks.bench_triton_build --arch 100   # benchmarks/results/triton_build_sm100.json
"""

from __future__ import annotations

import torch

from benchmarks.bench_common import Benchmark, Run, run_benchmark
from moe_model.kernels import gated_triton as gt
from moe_model.kernels import polynorm_triton as pt
from moe_model.kernels.triton_build import ARCHS, KERNELS, WIDTH_KERNELS, build_kernel

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
WIDTHS = (384, 1000, 1024, 1500, 1536, 2048, 3000, 4096, 6008, 8192, 16384, 65536)


def add_arguments(p) -> None:
    p.add_argument("--arch", type=int, choices=ARCHS, default=90, help="compute capability")
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="PolyNorm row widths")
    p.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))


def setup(run: Run) -> None:
    args = run.args
    if run.quick:
        args.widths, args.orders, args.dtypes = [1536], [3], ["bf16"]
    bad = [w for w in args.widths if not 1 <= w <= pt.MAX_ROW]
    if bad:
        raise SystemExit(f"--widths: {bad} outside 1..{pt.MAX_ROW} (the longest row the kernels take)")
    if not args.name:
        args.name = f"triton_build_sm{args.arch}"
    run.settings.update(
        arch=f"sm_{args.arch}a", widths=args.widths, orders=args.orders, dtypes=args.dtypes,
        spill_free_row=pt.SPILL_FREE_ROW, gated_spill_free_row=gt.SPILL_FREE_ROW,
    )  # fmt: skip


def auto_row_limit(kernel: str) -> int | None:
    """The longest row ``auto`` sends to ``kernel`` (None: any; the elementwise PolyReLU ones)."""
    if kernel.startswith("poly_norm_glu"):
        return gt.SPILL_FREE_ROW
    return pt.SPILL_FREE_ROW if kernel.startswith("poly_norm") else None


def measure(run: Run):
    args = run.args
    for kernel in KERNELS:
        widths = args.widths if kernel in WIDTH_KERNELS else [None]
        limit = auto_row_limit(kernel)
        for dtype in args.dtypes:
            for order in args.orders:
                for width in widths:
                    row = build_kernel(kernel, args.arch, DTYPES[dtype], order, width).as_row()
                    row["auto_launches"] = width is None or limit is None or width <= limit
                    yield row


def finish(run: Run, rows: list[dict]) -> None:
    bad = [
        f"{r['kernel']} {r['dtype']} order {r['order']} width {r['width']}"
        for r in rows
        if r["auto_launches"] and (r["spill_stores"] or r["spill_loads"] or r["offset_32bit_ops"])
    ]
    run.extra["spilling_or_32bit_builds_auto_launches"] = bad
    if bad:
        run.fail(f"{len(bad)} builds that auto launches spill or use 32-bit row offsets: {bad}")


def progress(r: dict) -> str:
    return (f"{r['kernel']:14s} {r['dtype']} o{r['order']} w{r['width']} BLOCK {r['block']} "
            f"warps {r['num_warps']}: {r['registers']} regs, spill {r['spill_stores']}/"
            f"{r['spill_loads']} B, smem {r['shared']} B")  # fmt: skip


BENCH = Benchmark(
    name="triton_build",
    doc=__doc__,
    measure=measure,
    columns=[
        ("kernel", "kernel", ""),
        ("dtype", "dtype", ""),
        ("order", "order", "d"),
        ("width", "width", ""),
        ("block", "BLOCK", "d"),
        ("num_warps", "warps", "d"),
        ("registers", "registers", "d"),
        ("spill_stores", "spill stores B", "d"),
        ("spill_loads", "spill loads B", "d"),
        ("stack_frame", "stack B", "d"),
        ("shared", "smem B", "d"),
        ("offset_32bit_ops", "32-bit offsets", "d"),
        ("auto_launches", "auto launches", ""),
    ],
    add_arguments=add_arguments,
    setup=setup,
    finish=finish,
    progress=progress,
    timing=None,
    devices=("cpu",),
)

if __name__ == "__main__":
    raise SystemExit(run_benchmark(BENCH))
