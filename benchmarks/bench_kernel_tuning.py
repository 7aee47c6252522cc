"""Sweep the launch parameters of the Triton PolyNorm kernels, to tune them from one GPU run.

The kernels (moe_model/kernels/polynorm_triton.py) are bandwidth-bound and their launch
parameters are fixed by rule: forward ``num_warps`` by row length, backward ``num_warps`` the
same and 8 programs per SM. This script times every combination of

- forward: ``num_warps`` in 1, 2, 4, 8, 16 (one program per row);
- backward: ``num_warps`` in 2, 4, 8, 16 x programs per SM in 1, 2, 4, 8, 16, 32;

at 131072 rows (one OLMoE MoE layer: 16384 tokens x top-8) x {1024, 1536}, bf16, order 3,
as a share of the device-to-device copy bandwidth measured in the same run, and checks every
variant against the default launch (dx and y bitwise: they are per-row; dweight and dbias to
fp32 summation order). ``finish`` names the best launch per kernel and width and its speed-up
over the default: what to set in polynorm_triton.py.

Without CUDA only ``--quick`` runs, in Triton's NumPy interpreter (a check of the script: its
times mean nothing).

    python -m benchmarks.bench_kernel_tuning                  # GPU
    python -m benchmarks.bench_kernel_tuning --device cpu --quick
"""

from __future__ import annotations

import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    # Triton's CPU interpreter, set before anything imports the kernels (they decide at their
    # first import); only when run: importing this module (the harness test reads BENCHMARK in
    # its own process) must leave the environment and the kernels as they were.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.bench_common import (  # noqa: E402
    Benchmark,
    Run,
    copy_bandwidth_gbs,
    median,
    run_benchmark,
    time_phases,
)

FWD_WARPS = (1, 2, 4, 8, 16)
BWD_WARPS = (2, 4, 8, 16)
BWD_PROGRAMS_PER_SM = (1, 2, 4, 8, 16, 32)
EPS = 1e-6


def _triton_kernels():
    """The Triton PolyNorm module, imported when the benchmark runs (see the top of the file)."""
    from moe_model.kernels import polynorm_triton

    return polynorm_triton


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--cols", type=int, nargs="+", default=[1024, 1536])
    p.add_argument("--order", type=int, default=3)


def setup(run: Run) -> None:
    args, pt = run.args, _triton_kernels()
    if not run.gpu and not run.quick:
        raise SystemExit("bench_kernel_tuning needs CUDA; --quick runs it in Triton's interpreter")
    if run.quick:
        args.rows, args.cols = 16, [40]  # 40: a masked tail in the 64-wide block
    run.settings.update(rows=args.rows, cols=args.cols, order=args.order, dtype="bfloat16",
                        fwd_warps=FWD_WARPS, bwd_warps=BWD_WARPS,
                        bwd_programs_per_sm=BWD_PROGRAMS_PER_SM,
                        default_bwd_programs_per_sm=pt.BWD_PROGRAMS_PER_SM)  # fmt: skip
    run.extra["copy_gbs"] = None
    if run.gpu:
        run.extra["copy_gbs"] = copy_bandwidth_gbs(run.device)
        print(f"# measured copy bandwidth: {run.extra['copy_gbs']:.0f} GB/s (read + write)")


def _time(fn, run: Run) -> list[float]:
    [ms] = time_phases(lambda: [fn], device=run.device, warmup=run.warmup, iters=run.iters)
    return ms


def sweep(run: Run, cols: int):
    """Every launch of both kernels at one row length, checked against the default launch."""
    args, dev, copy_gbs = run.args, run.device, run.extra["copy_gbs"]
    pt = _triton_kernels()
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.rows, cols, device=dev, dtype=torch.bfloat16, generator=gen)
    g = torch.randn(args.rows, cols, device=dev, dtype=torch.bfloat16, generator=gen)
    w = torch.tensor([0.5, 0.3, 0.2, 0.1][: args.order], device=dev)
    b = torch.full((1,), 0.1, device=dev)
    y_ref, rstd = pt.launch_poly_norm_fwd(x, w, b, EPS)
    dx_ref, dw_ref, db_ref = pt.launch_poly_norm_bwd(x, g, w, rstd)
    n = x.numel() * x.element_size()
    # The launches the kernels use by default (forward and backward have their own tables).
    default_warps = {"fwd": pt.poly_norm_fwd_launch(cols)[1], "bwd": pt.poly_norm_bwd_launch(cols)[1]}

    def row(kernel, warps, per_sm, ms, n_bytes, exact, rel_err):
        gbs = n_bytes / (median(ms) * 1e-3) / 1e9
        default = warps == default_warps[kernel] and per_sm in (None, pt.BWD_PROGRAMS_PER_SM)
        return {
            "kernel": kernel, "cols": cols, "num_warps": warps, "programs_per_sm": per_sm,
            "default": default, "ms": median(ms), "gbs": gbs,
            "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None,
            "bitwise_dx_y": exact, "dw_db_rel_err": rel_err, "ms_all": ms,
        }  # fmt: skip

    for warps in FWD_WARPS:

        def fwd(warps=warps):
            return pt.launch_poly_norm_fwd(x, w, b, EPS, num_warps=warps)

        exact = torch.equal(fwd()[0], y_ref)
        yield row("fwd", warps, None, _time(fwd, run), 2 * n, exact, None)
    for warps in BWD_WARPS:
        for per_sm in BWD_PROGRAMS_PER_SM:

            def bwd(warps=warps, per_sm=per_sm):
                return pt.launch_poly_norm_bwd(
                    x, g, w, rstd, num_warps=warps, programs_per_sm=per_sm
                )

            dx, dw, db = bwd()
            err = max(((dw - dw_ref).abs().max() / dw_ref.abs().max()).item(),
                      (abs(db - db_ref) / db_ref.abs()).item())  # fmt: skip
            yield row("bwd", warps, per_sm, _time(bwd, run), 3 * n, torch.equal(dx, dx_ref), err)


def measure(run: Run):
    for cols in run.args.cols:
        yield from sweep(run, cols)


def finish(run: Run, rows: list[dict]) -> None:
    best = {}
    for r in rows:
        key = (r["kernel"], r["cols"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    summary = []
    for (kernel, cols), r in best.items():
        default = next(d for d in rows if d["default"] and (d["kernel"], d["cols"]) == (kernel, cols))
        summary.append({"kernel": kernel, "cols": cols, "best_num_warps": r["num_warps"],
                        "best_programs_per_sm": r["programs_per_sm"], "best_ms": r["ms"],
                        "default_ms": default["ms"], "speedup": default["ms"] / r["ms"],
                        "best_pct_copy": r["pct_copy"]})  # fmt: skip
        print(f"# best {kernel} at {cols} cols: num_warps {r['num_warps']}"
              + (f", {r['programs_per_sm']} programs/SM" if r["programs_per_sm"] else "")
              + f": {r['ms']:.3f} ms, {default['ms'] / r['ms']:.2f}x the default")  # fmt: skip
    run.extra["best"] = summary
    bad = [r for r in rows if not r["bitwise_dx_y"] or (r["dw_db_rel_err"] or 0) > 1e-4]
    if bad:
        run.fail(f"{len(bad)} launches disagree with the default launch: " + ", ".join(
            f"{r['kernel']} warps {r['num_warps']} programs/SM {r['programs_per_sm']}" for r in bad
        ))  # fmt: skip


def columns(run: Run) -> list:
    cols = [
        ("kernel", "kernel", ""), ("cols", "cols", "d"), ("num_warps", "warps", "d"),
        ("programs_per_sm", "programs/SM", ""), ("default", "default", ""), ("ms", "ms", ".3f"),
        ("gbs", "GB/s", ".1f"),
    ]  # fmt: skip
    if run.gpu:
        cols.append(("pct_copy", "% copy", ".0f"))
    return cols + [("bitwise_dx_y", "dx/y exact", ""), ("dw_db_rel_err", "dw/db rel err", ".1e")]


BENCHMARK = Benchmark(
    name="kernel_tuning",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    finish=finish,
    columns=columns,
    timing={"cuda": (3, 20), "cpu": (1, 1), "quick": (1, 1)},
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
