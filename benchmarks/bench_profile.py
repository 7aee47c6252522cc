"""Where a benchmarked step spends its time: the torch profiler's kernels, grouped by kind.

:func:`profile_step` runs a benchmark's step a few times under ``torch.profiler`` and returns, per step, the
device time of every kernel (CUDA; on CPU the self time of every operator), the share of each
kind (matmul, attention, the Triton activation kernels, communication, memory, optimizer, other)
and the top kernels by time: what limits a step, in the benchmark's own JSON.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# Substrings of kernel or operator names (lower case), first match wins; order matters
# ("cutlass" flash-attention kernels are attention, so attention is tried before matmul).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "cublas", "matmul", "xmma", "grouped_mm", "aten::mm",
                "aten::bmm", "aten::addmm", "aten::linear")),
    ("activation kernel", ("_poly_norm", "_poly_relu")),
    ("communication", ("nccl", "all_to_all", "reduce_scatter", "all_gather", "c10d")),
    ("memory", ("memcpy", "memset", "copy_", "index", "scatter", "gather", "cat")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)  # fmt: skip
NAME_CHARS = 120  # kernel names of templated CUDA code run to thousands of characters


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def add_profile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 steps: time per kernel kind and the top kernels, in the JSON")  # fmt: skip


def profile_step(
    phases: Callable[[], list[Callable[[], object]]], device: torch.device, *, steps: int = 3,
    top: int = 12,
) -> dict:  # fmt: skip
    """Profile ``steps`` steps, each the phases ``phases()`` returns (as bench_common.time_phases
    takes them; warmed up beforehand by the caller); times are ms per step. On CUDA the rows are
    kernels; on CPU, operators by self time (nested operators are counted once, in the one that
    does the work)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            for phase in phases():
                phase()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    if cuda:
        # Kernels are events of their own; the operators that launched them would count twice.
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        timed = [(e, e.self_device_time_total) for e in kernels or events]
    else:
        timed = [(e, e.self_cpu_time_total) for e in events]
    rows = [
        {"name": e.key[:NAME_CHARS], "kind": kind_of(e.key), "calls": e.count / steps,
         "ms": us / 1e3 / steps}
        for e, us in timed
        if us > 0
    ]  # fmt: skip
    total = sum(r["ms"] for r in rows)
    kinds: dict[str, float] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["pct"] = 100 * r["ms"] / total if total else 0.0
    return {
        "what": "CUDA kernels" if cuda else "CPU operators (self time)",
        "steps": steps,
        "total_ms": total,
        "kinds": sorted(
            ({"kind": k, "ms": ms, "pct": 100 * ms / total if total else 0.0} for k, ms in kinds.items()),
            key=lambda r: -r["ms"],
        ),
        "top": rows[:top],
    }


def format_profile(label: str, prof: dict) -> str:
    """A few lines for the console: the kinds' shares, then the top entries."""
    kinds = ", ".join(f"{k['kind']} {k['pct']:.0f}%" for k in prof["kinds"])
    lines = [f"# profile {label}: {prof['total_ms']:.2f} ms of {prof['what']} per step: {kinds}"]
    for r in prof["top"][:6]:
        lines.append(f"#   {r['pct']:5.1f}%  {r['ms']:8.3f} ms  x{r['calls']:<5.0f} {r['name'][:80]}")
    return "\n".join(lines)
