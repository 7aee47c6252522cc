"""Benchmark expert activations alone: PolyNorm / PolyReLU backends against SwiGLU.

GPU (default on CUDA): 131072 rows (one OLMoE MoE layer: 16384 tokens x top-8) x {1024, 1536}
in bf16. For each implementation: forward and backward time (medians), peak memory above the
inputs, memory kept for backward, and achieved bandwidth against the floor traffic
(PolyNorm forward reads x and writes y; backward reads x and dy and writes dx) as a share of
the device-to-device copy bandwidth measured in this run.

Implementations: ``eager`` (the reference math), ``eager_ckpt`` (eager under
``torch.utils.checkpoint``, the paper's way), ``compile``, ``fused`` (our autograd.Function),
``triton`` (our kernels), ``liger`` (Liger-Kernel's PolyNorm, order 3 only, when
``liger_kernel`` imports). SwiGLU rows (eager and compiled) are the reference point at equal
parameters: PolyNorm h=1536 against SwiGLU h=1024. The gated forms (``--activations
polynorm_glu polyrelu_glu``, not in the default list) run at SwiGLU's shape (input 2H, output H
= ``--swiglu-hidden``), their floor traffic counted as SwiGLU's.

CPU: the same table at 8192 rows x 1536 (SwiGLU 8192 x 2*1024 -> 1024), eager/fused/compile.
``--quick`` runs tiny shapes (a smoke test of the script).

    python -m benchmarks.bench_activations                      # GPU, full
    python -m benchmarks.bench_activations --device cpu         # CPU, 8192 x 1536
    python -m benchmarks.bench_activations --device cpu --quick # smoke test
"""

from __future__ import annotations

import functools
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_common import (
    Benchmark,
    Run,
    copy_bandwidth_gbs,
    median,
    run_benchmark,
    sync,
    time_phases,
)
from moe_model.kernels import dispatch as kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


@functools.cache
def _swiglu_compiled():
    return torch.compile(_swiglu)


def _liger_poly_norm():
    try:
        from liger_kernel.ops.poly_norm import LigerPolyNormFunction
    except Exception:
        return None
    # in_place=False: keep dy intact between timed iterations (in_place only saves an allocation).
    return lambda x, w, b, eps: LigerPolyNormFunction.apply(x, w, b, eps, False)


EPS = 1e-6
# Backend name -> f(x, weight, bias), per polynomial activation (gated: x is [gate | up]).
POLY_CALLS = {
    "polynorm": lambda be: lambda x, w, b: kernels.poly_norm(x, w, b, EPS, backend=be),
    "polyrelu": lambda be: lambda x, w, b: kernels.poly_relu(x, w, b, backend=be),
    "polynorm_glu": lambda be: lambda x, w, b: kernels.poly_norm_glu(x, w, b, EPS, backend=be),
    "polyrelu_glu": lambda be: lambda x, w, b: kernels.poly_relu_glu(x, w, b, backend=be),
}
GATED = ("swiglu", "polynorm_glu", "polyrelu_glu")
"""Activations whose input is [gate | up] of width 2H, sized like SwiGLU (``--swiglu-hidden``)."""


def implementations(activation: str, device: torch.device, names: list[str]) -> dict:
    """name -> f(x, weight, bias) for the requested implementations that can run here."""
    out = {}
    if activation == "swiglu":
        for name in names:
            if name == "eager":
                out[name] = lambda x, w, b: _swiglu(x)
            elif name == "compile":
                out[name] = lambda x, w, b: _swiglu_compiled()(x)
        return out
    call = POLY_CALLS[activation]
    for name in names:
        if name in ("eager", "fused", "compile"):
            out[name] = call(name)
        elif name == "eager_ckpt":
            eager = call("eager")
            out[name] = lambda x, w, b, eager=eager: torch.utils.checkpoint.checkpoint(
                eager, x, w, b, use_reentrant=False
            )
        elif name == "triton" and device.type == "cuda" and kernels.triton_available():
            out[name] = call("triton")
        elif name == "liger" and activation == "polynorm" and device.type == "cuda":
            liger = _liger_poly_norm()
            if liger is not None:
                out[name] = lambda x, w, b, liger=liger: liger(x, w, b, EPS)
    return out


def traffic_bytes(activation: str, rows: int, cols: int, elem: int) -> tuple[int, int]:
    """Floor bytes moved (forward, backward); for gated ones ``cols`` is the output width H."""
    n = rows * cols * elem
    if activation in GATED:
        return 3 * n, 5 * n  # fwd: read a, b, write y; bwd: read a, b, dy, write da, db
    return 2 * n, 3 * n


def bench_one(activation, name, fn, rows, cols, dtype, device, order, warmup, iters, copy_gbs):
    in_cols = 2 * cols if activation in GATED else cols
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, in_cols, device=device, dtype=dtype, generator=gen).requires_grad_()
    w = torch.full((order,), 1.0 / order, device=device, requires_grad=True)
    b = torch.zeros(1, device=device, requires_grad=True)
    g = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)
    state = {}

    def phases():
        x.grad = w.grad = b.grad = None
        state.clear()

        def fwd():
            state["y"] = fn(x, w, b)

        def bwd():
            state["y"].backward(g)

        return [fwd, bwd]

    # First call separately: for compile it is the compilation, which a median would hide.
    t = time.perf_counter()
    for f in phases():
        f()
    sync(device)
    first_call_s = time.perf_counter() - t

    peak_mib = saved_mib = None
    if device.type == "cuda":
        x.grad = w.grad = b.grad = None
        state.clear()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        y = fn(x, w, b)
        torch.cuda.synchronize(device)
        saved_mib = (
            torch.cuda.memory_allocated(device) - base - y.numel() * y.element_size()
        ) / 2**20
        y.backward(g)
        del y
        torch.cuda.synchronize(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20

    fwd_ms, bwd_ms = time_phases(phases, device=device, warmup=warmup, iters=iters)
    fwd, bwd = median(fwd_ms), median(bwd_ms)
    bytes_f, bytes_b = traffic_bytes(activation, rows, cols, x.element_size())
    row = {
        "activation": activation,
        "impl": name,
        "shape": f"{rows}x{in_cols}" + (f"->{cols}" if activation in GATED else ""),
        "dtype": str(dtype).removeprefix("torch."),
        "fwd_ms": fwd,
        "bwd_ms": bwd,
        "total_ms": fwd + bwd,
        "fwd_gbs": bytes_f / (fwd * 1e-3) / 1e9,
        "bwd_gbs": bytes_b / (bwd * 1e-3) / 1e9,
        "peak_mib": peak_mib,
        "saved_mib": saved_mib,
        "first_call_s": first_call_s,
        "fwd_ms_all": fwd_ms,
        "bwd_ms_all": bwd_ms,
    }
    if copy_gbs:
        row["fwd_pct_copy"] = 100 * row["fwd_gbs"] / copy_gbs
        row["bwd_pct_copy"] = 100 * row["bwd_gbs"] / copy_gbs
    return row


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, help="rows (default: 131072 on GPU, 8192 on CPU)")
    p.add_argument(
        "--cols",
        type=int,
        nargs="+",
        help="PolyNorm/PolyReLU row lengths (GPU: 1024 1536; CPU: 1536)",
    )
    p.add_argument(
        "--swiglu-hidden", type=int, default=1024, help="SwiGLU output width H (input 2H)"
    )
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--activations", nargs="+", default=["polynorm", "polyrelu", "swiglu"])
    p.add_argument(
        "--impls", nargs="+", default=["eager", "eager_ckpt", "compile", "fused", "triton", "liger"]
    )


def dtype_of(run: Run) -> torch.dtype:
    return DTYPES[run.args.dtype or ("bf16" if run.gpu else "fp32")]


def setup(run: Run) -> None:
    args, gpu = run.args, run.gpu
    if run.quick:
        rows, cols, hid = args.rows or 256, args.cols or [192], 128
        impls = [i for i in args.impls if i != "compile"]
    else:
        rows = args.rows or (131072 if gpu else 8192)
        cols = args.cols or ([1024, 1536] if gpu else [1536])
        hid = args.swiglu_hidden
        impls = args.impls
    if not gpu:
        impls = [i for i in impls if i not in ("triton", "liger")]
    run.settings.update(rows=rows, cols=cols, swiglu_hidden=hid, dtype=str(dtype_of(run)),
                        order=args.order, impls=impls, activations=args.activations)  # fmt: skip
    run.extra["copy_gbs"] = None
    if not run.quick:
        run.extra["copy_gbs"] = copy_bandwidth_gbs(
            run.device, n_bytes=(1 << 30) if gpu else (1 << 27)
        )
        print(f"# measured copy bandwidth: {run.extra['copy_gbs']:.0f} GB/s (read + write)")


def measure(run: Run):
    s, dtype = run.settings, dtype_of(run)
    for act in s["activations"]:
        for cols in [s["swiglu_hidden"]] if act in GATED else s["cols"]:
            for name, fn in implementations(act, run.device, s["impls"]).items():
                yield bench_one(act, name, fn, s["rows"], cols, dtype, run.device, s["order"],
                                run.warmup, run.iters, run.extra["copy_gbs"])  # fmt: skip


def columns(run: Run) -> list:
    cols = [
        ("activation", "activation", ""), ("impl", "impl", ""), ("shape", "shape", ""),
        ("fwd_ms", "fwd ms", ".3f"), ("bwd_ms", "bwd ms", ".3f"), ("total_ms", "fwd+bwd ms", ".3f"),
        ("fwd_gbs", "fwd GB/s", ".1f"), ("bwd_gbs", "bwd GB/s", ".1f"),
    ]  # fmt: skip
    if run.extra["copy_gbs"] and run.gpu:
        cols += [("fwd_pct_copy", "fwd % copy", ".0f"), ("bwd_pct_copy", "bwd % copy", ".0f")]
    if run.gpu:
        cols += [("peak_mib", "peak MiB", ".0f"), ("saved_mib", "saved MiB", ".0f")]
    return cols + [("first_call_s", "1st call s", ".1f")]


BENCHMARK = Benchmark(
    name="activations",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    columns=columns,
    progress=lambda r: (
        f"{r['activation']:9s} {r['impl']:10s} {r['shape']:>14s}  fwd {r['fwd_ms']:8.3f} ms  "
        f"bwd {r['bwd_ms']:8.3f} ms  first call {r['first_call_s']:.1f} s"
    ),  # fmt: skip
    timing={"cuda": (5, 50), "cpu": (2, 10), "quick": (1, 3)},
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
