"""The benchmark harness (benchmarks/bench_common.py) and every bench script's --quick run."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_common
from benchmarks.bench_common import (
    Benchmark,
    Run,
    ratio_to_reference,
    run_benchmark,
    time_phases,
)
from tests.olmo.helpers import REPO

ENV_KEYS = {"device", "torch", "cuda", "triton", "python", "git_rev", "command", "date_utc"}


def toy(**kw) -> Benchmark:
    """A benchmark timing two sizes of a sum, plus a ratio column."""

    def add_arguments(p):
        p.add_argument("--size", type=int, default=64)

    def setup(run: Run):
        run.settings["size"] = run.args.size
        run.extra["note"] = "toy"

    def measure(run: Run):
        for n in (run.args.size, 2 * run.args.size):
            x = torch.ones(n)
            [ms] = time_phases(
                lambda x=x: [x.sum], device=run.device, warmup=run.warmup, iters=run.iters
            )
            yield {"n": n, "ms": bench_common.median(ms), "ms_all": ms}

    fields = dict(name="toy", doc="toy benchmark", add_arguments=add_arguments, setup=setup,
                  measure=measure,
                  columns=[("n", "n", "d"), ("ms", "ms", ".4f"), ("x", "x first", ".2f")],
                  finish=lambda run, rows: ratio_to_reference(rows, "ms", "x", lambda r: r["n"] == 64),
                  timing={"cuda": (5, 20), "cpu": (2, 4), "quick": (1, 3)})  # fmt: skip
    return Benchmark(**{**fields, **kw})


def test_harness_writes_table_and_json_with_the_environment(tmp_path, capsys):
    assert run_benchmark(toy(), ["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# CPU") and "| n | ms | x first |" in out
    payload = json.loads((tmp_path / "toy_cpu_quick.json").read_text())
    assert payload["benchmark"] == "toy" and payload["note"] == "toy"
    assert set(payload["env"]) == ENV_KEYS
    assert payload["env"]["torch"] == torch.__version__
    assert payload["settings"] == {"quick": True, "warmup": 1, "iters": 3, "size": 64}
    rows = payload["results"]
    assert [r["n"] for r in rows] == [64, 128] and all(len(r["ms_all"]) == 3 for r in rows)
    assert rows[0]["x"] == 1.0 and rows[1]["x"] == pytest.approx(rows[1]["ms"] / rows[0]["ms"])


def test_device_defaults_flags_and_name(tmp_path):
    argv = ["--device", "cpu", "--out", str(tmp_path), "--size", "8"]
    assert run_benchmark(toy(), argv) == 0
    payload = json.loads((tmp_path / "toy_cpu.json").read_text())
    assert (payload["settings"]["warmup"], payload["settings"]["iters"]) == (2, 4)
    assert [r["n"] for r in payload["results"]] == [8, 16]
    assert run_benchmark(toy(result_name="fixed"), [*argv, "--warmup=0", "--iters=5"]) == 0
    payload = json.loads((tmp_path / "fixed.json").read_text())
    assert (payload["settings"]["warmup"], payload["settings"]["iters"]) == (0, 5)
    assert run_benchmark(toy(), [*argv, "--name", "mine"]) == 0
    assert (tmp_path / "mine.json").is_file()


def test_failure_still_writes_and_exits_1(tmp_path, capsys):
    bench = toy(finish=lambda run, rows: run.fail("rows disagree"))
    assert run_benchmark(bench, ["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: rows disagree\n"
    payload = json.loads((tmp_path / "toy_cpu_quick.json").read_text())
    assert [r["n"] for r in payload["results"]] == [64, 128]
    assert all(len(r["ms_all"]) == 3 for r in payload["results"])
    # The failed run's rows are the ones printed.
    assert bench_common.format_table(payload["results"], bench.columns) in captured.out


def test_an_exception_keeps_the_rows_measured_before_it(tmp_path, capsys):
    def measure(run):
        yield {"n": 1, "ms": 0.5}
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    bench = toy(measure=measure, finish=None)
    assert run_benchmark(bench, ["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    payload = json.loads((tmp_path / "toy_cpu_quick.json").read_text())
    assert payload["results"] == [{"n": 1, "ms": 0.5}]
    assert "error: OutOfMemoryError after 1 rows: CUDA out of memory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bench_kw, argv",
    [
        ({}, ["--iters=0"]),
        ({}, ["--model.d_model=8"]),  # overrides only where the benchmark takes them
        ({"timing": None}, ["--iters=3"]),  # no iterations of its own: no such flag
        ({"devices": ("cpu",)}, ["--device", "cuda"]),
        ({}, ["--device", "tpu"]),
        ({}, ["--device", "nonsense"]),
        ({"config_overrides": True}, ["stray"]),
    ],
)
def test_bad_command_lines_are_rejected(bench_kw, argv, tmp_path):
    with pytest.raises(SystemExit) as info:
        run_benchmark(toy(**bench_kw), ["--out", str(tmp_path), *argv])
    assert info.value.code == 2
    assert not list(tmp_path.iterdir())


def test_device_may_carry_an_index():
    assert bench_common.parse(toy(), ["--device=cuda:1"]).device == torch.device("cuda:1")


def test_config_overrides_reach_the_run():
    run = bench_common.parse(
        toy(config_overrides=True), ["--device=cpu", "--model.d_model=8", "--seed=1"]
    )
    assert run.overrides == ["--model.d_model=8", "--seed=1"] and run.device == torch.device("cpu")


class FakeClock:
    """``time.perf_counter`` that moves only when a step says how long it took (seconds)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def step(self, name: str, seconds: float, calls: list):
        def run():
            calls.append(name)
            self.now += seconds
        return run


def test_time_phases_times_each_phase_per_iteration(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(bench_common.time, "perf_counter", clock)
    times = time_phases(lambda: [clock.step("a", 0.0015, calls), clock.step("b", 0.004, calls)],
                        device=torch.device("cpu"), warmup=2, iters=3)  # fmt: skip
    assert calls == ["a", "b"] * 5
    assert times == [pytest.approx([1.5] * 3), pytest.approx([4.0] * 3)]  # ms, per phase


def test_time_interleaved_runs_the_steps_round_robin(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(bench_common.time, "perf_counter", clock)
    steps = {"a": clock.step("a", 0.25, calls), "b": clock.step("b", 0.5, calls)}
    first, times = bench_common.time_interleaved(steps, warmup=2, iters=3)
    # Each step's warm-up (its first call timed alone), then the timed calls in turn.
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert first == pytest.approx({"a": 0.25, "b": 0.5})  # seconds
    assert times == {"a": pytest.approx([250.0] * 3), "b": pytest.approx([500.0] * 3)}  # ms


# Every benchmark script: a new one is run here without being listed. bench_common.py and
# bench_profile.py are the libraries the scripts share.
# bench_triton_build.py (a build report, no timing: its builder is tested in
# tests/moe_model/kernels/test_triton_build.py) and bench_object_store.py (it starts an S3
# server) do not use the harness.
NOT_HARNESS = ("bench_common.py", "bench_profile.py", "bench_triton_build.py",
               "bench_object_store.py")  # fmt: skip
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py") if p.name not in NOT_HARNESS)
# The quantity each script measures, which a --quick run must find positive in every row.
MEASURED = {
    "bench_activations.py": "total_ms",
    "bench_convert.py": "seconds",
    "bench_cpu_step.py": "median_ms",
    "bench_doc_masking.py": "median_ms",
    "bench_expert_parallel.py": "total",
    "bench_init_memory.py": "peak_rss_gib",
    "bench_kernel_tuning.py": "ms",
    "bench_moe_layer.py": "total_ms",
    "bench_moe_variants.py": "median_ms",
    "bench_train_step.py": "step_ms",
    "bench_combine.py": "total_gb",
    "bench_muon.py": "train_step_ms",
}


def test_the_glob_finds_the_benchmarks():
    assert {"bench_activations.py", "bench_convert.py", "bench_train_step.py"} <= set(SCRIPTS)
    assert not {"bench_common.py", "bench_profile.py"} & set(SCRIPTS)


def failure_report(stderr: str) -> str:
    """A failed run's stderr for the assertion message: the lines torchrun's workers wrote
    (``--tee`` prefixes them ``[default1]:``), which its closing traceback pushes out of a plain
    tail, then that tail."""
    rank_lines = [line for line in stderr.splitlines() if re.match(r"\[\w+\d+\]:", line)]
    return "\n".join([*rank_lines[-40:], "..."]) + "\n" + stderr[-2000:]


# The default test command runs one cheap script through the whole harness; the rest are slow.
IN_DEFAULT_RUN = {"bench_activations.py"}


@pytest.mark.parametrize(
    "script", [s if s in IN_DEFAULT_RUN else pytest.param(s, marks=pytest.mark.slow) for s in SCRIPTS]
)
def test_every_bench_script_runs_quick_on_cpu(script, tmp_path):
    assert script in MEASURED, f"add {script}'s measured row key to MEASURED"
    module = importlib.import_module(f"benchmarks.{script[: -len('.py')]}")
    bench = module.BENCHMARK
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script[: -len('.py')]}", *argv],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, failure_report(proc.stderr)
    name = (bench.result_name or f"{bench.name}_cpu") + "_quick"
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.json"]
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert list(payload)[:3] == ["benchmark", "env", "settings"] and list(payload)[-1] == "results"
    assert payload["benchmark"] == bench.name and set(payload["env"]) == ENV_KEYS
    assert payload["env"]["torch"] == torch.__version__
    assert payload["settings"]["quick"] is True
    rows = payload["results"]
    assert rows and all(r[MEASURED[script]] > 0 for r in rows)
    # The table printed is the JSON's rows, row for row.
    run = bench_common.parse(bench, argv)
    run.settings.update(payload["settings"])
    run.extra.update({k: v for k, v in payload.items()
                      if k not in ("benchmark", "env", "settings", "results")})
    columns = bench.columns(run) if callable(bench.columns) else bench.columns
    assert bench_common.format_table(rows, columns) in proc.stdout
    assert proc.stdout.rstrip().endswith(f"wrote {tmp_path / name}.json")
