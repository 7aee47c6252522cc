"""Shared helpers of the ``scripts/bench_*.py`` benchmarks: timing, environment record, output.

Every benchmark records what produced its numbers (device, torch/Triton versions, git revision,
the exact command, the date) next to them in ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# Allow `python scripts/bench_x.py` from anywhere without installing the package.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """What produced a result: machine, versions, revision, command, date."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"
    return {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_rev": _git_rev(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phases(
    phases: Callable[[], list[Callable[[], object]]],
    *,
    device: torch.device,
    warmup: int,
    iters: int,
) -> list[list[float]]:
    """Time consecutive phases of one iteration (e.g. forward then backward), in ms.

    ``phases()`` returns fresh callables for one iteration, run in order; each phase is timed
    separately (CUDA events on GPU, so no host sync between phases; perf_counter on CPU).
    Returns one list of per-iteration times per phase.
    """
    for _ in range(warmup):
        for fn in phases():
            fn()
    sync(device)
    n_phase = len(phases())
    times: list[list[float]] = [[] for _ in range(n_phase)]
    for _ in range(iters):
        fns = phases()
        if device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(fns) + 1)]
            events[0].record()
            for fn, ev in zip(fns, events[1:]):
                fn()
                ev.record()
            torch.cuda.synchronize(device)
            for i in range(len(fns)):
                times[i].append(events[i].elapsed_time(events[i + 1]))
        else:
            t = time.perf_counter()
            for i, fn in enumerate(fns):
                fn()
                now = time.perf_counter()
                times[i].append((now - t) * 1e3)
                t = now
    return times


def time_interleaved(
    steps: dict[str, Callable[[], object]], *, warmup: int, iters: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """CPU wall time of several step functions, interleaved round-robin so that load from other
    processes hits them alike. Returns each one's first call in s (timed alone: a compilation
    shows there) and its ``iters`` timed calls in ms, after ``warmup`` calls in all."""
    first: dict[str, float] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
        for _ in range(warmup - 1):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return first, times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def copy_bandwidth_gbs(device: torch.device, n_bytes: int = 1 << 30, iters: int = 20) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), GB/s."""
    n = n_bytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    [ms] = time_phases(lambda: [lambda: dst.copy_(src)], device=device, warmup=3, iters=iters)
    return 2 * n * 2 / (median(ms) * 1e-3) / 1e9


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as a Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
