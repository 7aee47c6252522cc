"""The harness of the ``benchmarks/bench_*.py`` benchmarks: each script declares what it measures
(a :class:`Benchmark`: its own flags, its cases, a measure function yielding one row per case, its
table's columns) and :func:`run_benchmark` does the rest the same way for all of them.

The harness owns the common flags (``--device``, ``--quick``, ``--warmup``, ``--iters``,
``--name``, ``--out``), the device pick, the warm-up / iteration defaults, the record of what
produced the numbers (device, torch / CUDA / Triton / Python versions, git revision, the exact
command, the UTC date), the Markdown table, and ``benchmarks/results/<name>.json``::

    {"benchmark": ..., "env": {...}, "settings": {...}, <extra fields>, "results": [rows]}

It also holds the timing helpers the measure functions share (:func:`time_phases`: CUDA events
on GPU, ``perf_counter`` on CPU; :func:`median`; :func:`copy_bandwidth_gbs`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

Column = tuple[str, str, str]
"""(row key, table header, format spec) of one table column."""


@dataclass
class Run:
    """One invocation of a benchmark: what its measure function reads and records."""

    args: argparse.Namespace
    """The parsed command line: the common flags and the script's own."""
    device: torch.device
    warmup: int | None
    """Untimed iterations before timing (None when the benchmark times nothing itself)."""
    iters: int | None
    """Timed iterations; medians are taken over these."""
    overrides: list[str] = field(default_factory=list)
    """``--key=value`` TrainConfig overrides, for benchmarks that accept them."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What was measured (shapes, dtypes, iterations): the JSON's ``settings``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further top-level JSON fields (e.g. a measured copy bandwidth)."""
    error: str | None = None

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def quick(self) -> bool:
        return self.args.quick

    def fail(self, message: str) -> None:
        """Mark the run failed: the table and JSON are still written, the exit status is 1."""
        self.error = message


@dataclass
class Benchmark:
    """What one script measures; :func:`run_benchmark` does everything else."""

    name: str
    """The JSON's ``benchmark`` field and file name: ``<name>_<gpu|cpu>[_quick].json``."""
    doc: str
    """The script's docstring: the ``--help`` text."""
    measure: Callable[[Run], Iterable[dict]]
    """Yields one result row per case; each is printed (``progress``) as it comes."""
    columns: list[Column] | Callable[[Run], list[Column]]
    """The table's columns (a function when they depend on the device or settings)."""
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    """Adds the script's own flags."""
    setup: Callable[[Run], None] | None = None
    """Resolves the script's settings (``--quick`` shapes, per-device defaults) into
    ``run.settings`` before anything is measured."""
    finish: Callable[[Run, list[dict]], None] | None = None
    """Adds what needs all rows (ratios to a reference row); may call ``run.fail``."""
    progress: Callable[[dict], str] | None = None
    """One line printed per row as it is measured."""
    timing: dict[str, tuple[int, int]] | None = field(
        default_factory=lambda: {"cuda": (5, 20), "cpu": (1, 3), "quick": (1, 3)}
    )
    """(warm-up, iterations) defaults for ``cuda``, ``cpu`` and ``quick`` runs; None when the
    benchmark has no iterations of its own (no ``--warmup`` / ``--iters`` flags then)."""
    devices: tuple[str, ...] = ("auto", "cuda", "cpu")
    """Device types ``--device`` may name (``auto`` among them: it may pick), the first the
    default; an index is allowed (``cuda:1``)."""
    result_name: str | None = None
    """A fixed JSON name instead of ``<name>_<gpu|cpu>`` (``_quick`` is still appended)."""
    config_overrides: bool = False
    """Accept ``--key=value`` TrainConfig overrides (``run.overrides``) beside the flags."""


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
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *_invocation()]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _invocation() -> list[str]:
    """This process's arguments as typed: ``-m benchmarks.bench_x ...`` for a module run (whose
    ``sys.argv[0]`` is the file's full path)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name, *sys.argv[1:]]
    return sys.argv


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when inside it: results name no one's checkout."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def write_json(name: str, payload: dict, out_dir: Path | str | None = None) -> Path:
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
    steps: dict[Any, Callable[[], object]], *, warmup: int, iters: int
) -> tuple[dict[Any, float], dict[Any, list[float]]]:
    """Time CPU variants round-robin, so that load from other processes hits them alike.

    Each variant's first call is timed on its own (seconds; for compile it is the compilation),
    then it gets ``warmup - 1`` more untimed calls; then ``iters`` rounds time every variant
    once each (ms). Returns (first call seconds, per-iteration ms), keyed like ``steps``.
    """
    first = {}
    for key, step in steps.items():
        start = time.perf_counter()
        step()
        first[key] = time.perf_counter() - start
        for _ in range(warmup - 1):
            step()
    times: dict[Any, list[float]] = {key: [] for key in steps}
    for _ in range(iters):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append((time.perf_counter() - start) * 1e3)
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


def ratio_to_reference(
    rows: list[dict], key: str, out_key: str, is_reference: Callable[[dict], bool]
) -> None:
    """``row[out_key] = row[key] / reference[key]``, the reference the first row it accepts
    (None everywhere when no row is one)."""
    ref = next((r[key] for r in rows if is_reference(r)), None)
    for r in rows:
        r[out_key] = r[key] / ref if ref else None


def format_table(rows: list[dict], columns: list[Column]) -> str:
    """Rows as a Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append(
                "-"
                if v is None
                else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v))
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser(bench: Benchmark) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=bench.doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", default=bench.devices[0], help=f"{', '.join(bench.devices)}; auto: cuda if any"
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, few iterations: a smoke test")
    if bench.timing is not None:
        p.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing")
        p.add_argument(
            "--iters", type=int, default=None, help="timed iterations (medians over these)"
        )
    p.add_argument(
        "--name", default=None, help="JSON file name without .json (default from the device)"
    )
    p.add_argument(
        "--out", default=None, help=f"results folder (default {RESULTS_DIR.relative_to(REPO)})"
    )
    if bench.add_arguments is not None:
        bench.add_arguments(p)
    return p


def parse(bench: Benchmark, argv: list[str] | None = None) -> Run:
    """The command line as a :class:`Run`, with the warm-up / iteration defaults applied."""
    parser = _parser(bench)
    if bench.config_overrides:
        args, overrides = parser.parse_known_args(argv)
        bad = [a for a in overrides if not (a.startswith("--") and "=" in a)]
        if bad:
            parser.error(
                f"unrecognized arguments: {' '.join(bad)} (config overrides look like --key=value)"
            )
    else:
        args, overrides = parser.parse_args(argv), []
    try:
        device = pick_device(args.device)
    except RuntimeError:
        device = None
    if device is None or not ({args.device, device.type} & set(bench.devices)):
        parser.error(f"--device={args.device} is not one of {', '.join(bench.devices)}")
    warmup = iters = None
    if bench.timing is not None:
        kind = "quick" if args.quick else device.type
        warmup, iters = bench.timing[kind]
        warmup = args.warmup if args.warmup is not None else warmup
        iters = args.iters if args.iters is not None else iters
        if warmup < 0 or iters < 1:
            parser.error(f"--warmup={warmup} must be >= 0 and --iters={iters} >= 1")
    return Run(args=args, device=device, warmup=warmup, iters=iters, overrides=overrides)


def run_benchmark(bench: Benchmark, argv: list[str] | None = None) -> int:
    """Parse the command line, measure, print the table, write the JSON; the exit status."""
    run = parse(bench, argv)
    env = environment(run.device)
    print(f"# {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | triton {env['triton']} "
          f"| git {env['git_rev']}")  # fmt: skip
    print(f"# {env['command']}")
    run.settings["quick"] = run.quick
    if bench.timing is not None:
        run.settings.update(warmup=run.warmup, iters=run.iters)
    if bench.setup is not None:
        bench.setup(run)
    rows = []
    try:
        for row in bench.measure(run):
            rows.append(row)
            if bench.progress is not None:
                print("  " + bench.progress(row), flush=True)
        if bench.finish is not None:
            bench.finish(run, rows)
    except Exception as err:  # keep what was measured (a GPU round's case may run out of memory)
        traceback.print_exc()
        run.fail(f"{type(err).__name__} after {len(rows)} rows: {err}")
    columns = bench.columns(run) if callable(bench.columns) else bench.columns
    print()
    print(format_table(rows, columns))
    name = run.args.name or (
        (bench.result_name or f"{bench.name}_{'gpu' if run.gpu else 'cpu'}")
        + ("_quick" if run.quick else "")
    )
    payload = {
        "benchmark": bench.name,
        "env": env,
        "settings": run.settings,
        **run.extra,
        "results": rows,
    }
    path = write_json(name, payload, run.args.out)
    print(f"\nwrote {path}")
    if run.error:
        print(f"error: {run.error}", file=sys.stderr)
        return 1
    return 0
