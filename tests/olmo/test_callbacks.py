"""The console a person watches: one line per interval with the objective's terms, and a summary
of the run's outputs at the end; the per-source metrics of a data mixture."""

import os
import re
import statistics
import subprocess
import sys

import pytest

from olmo import metric_names as names
from olmo.callbacks import (
    MetricsCallback,
    format_count,
    format_duration,
    progress_line,
    run_summary,
)

from .helpers import (
    REPO,
    TEST_CONFIG,
    make_data,
    read_metrics,
    run_train,
    tiny_overrides,
    write_token_file,
)

LINE = re.compile(
    r"step (\d+)/(\d+) \| CE ([0-9.]+) \| LB ([0-9.]+) \| Z ([0-9.]+) \| grad ([0-9.]+) \| "
    r"lr ([0-9.e+-]+) \| ([0-9,]+) tok/s \| MFU ([0-9.]+)% \| mem ([0-9.]+) GiB \| "
    r"([0-9.]+[KMBT]?) tokens \| (\w+) elapsed \| ETA (\w+)$"
)


def test_format_duration():
    assert format_duration(0) == "0s"
    assert format_duration(59.6) == "1m00s"
    assert format_duration(3 * 60 + 5) == "3m05s"
    assert format_duration(2 * 3600 + 7 * 60 + 59) == "2h07m"


def test_progress_line_fields_and_medians():
    metrics = {names.CE_LOSS: 6.123456, names.LB_LOSS: 0.0101234, names.Z_LOSS: 0.00212345,
               names.GRAD_NORM: 0.87654, names.LR: 0.0029}
    line = progress_line(20, 150, metrics, [1000.0, 10.0, 1300.0], [11.0, 0.5, 12.5], 292.0)
    assert line == ("step 20/150 | CE 6.1235 | LB 0.01012 | Z 0.00212 | grad 0.877 | lr 2.90e-03 | "
                    "1,000 tok/s | MFU 11.0% | ETA 4m52s")
    # A step with only evaluation metrics: nothing invented.
    assert progress_line(3, None, {}, [], [], None) == "step 3/?"
    assert "skipped 2" in progress_line(5, 9, {names.SKIPPED_STEPS: 2.0}, [], [], None)
    line = progress_line(20, 150, {}, [], [], 10.0, tokens_seen=40_960, elapsed_seconds=65.0,
                         memory_gib=1.234)
    assert line == "step 20/150 | mem 1.23 GiB | 41.0K tokens | 1m05s elapsed | ETA 10s"


def test_format_count():
    assert [format_count(n) for n in (0, 950, 12_345, 4_560_000, 1.2e9, 5.133e12)] == [
        "0", "950", "12.3K", "4.56M", "1.20B", "5.13T"]


def test_run_summary_names_the_newest_wandb_run_and_how_to_upload_it(tmp_path):
    save = tmp_path / "run"
    wandb = save / "wandb"
    for name in ("offline-run-20250101_000000-a1", "offline-run-20250102_000000-a1", "latest-run"):
        (wandb / name).mkdir(parents=True)
    newest = wandb / "offline-run-20250102_000000-a1"
    lines = run_summary(save, 3, 8, "configs/tiny.yaml").splitlines()
    assert lines[0] == f"Run stopped at step 3: {save}"
    assert any(line.startswith(f"  W&B           {newest}  (upload: ") and
               line.endswith(f"wandb sync {newest})") for line in lines)
    # An online run is uploaded already: the line names it, with nothing to sync.
    online = wandb / "run-20250103_000000-a1"
    online.mkdir()
    assert f"  W&B           {online}" in run_summary(save, 8, 8, None).splitlines()
    # wandb.mode=disabled writes no wandb/ folder: no W&B line.
    assert not any("W&B" in line for line in run_summary(tmp_path / "other", 8, 8, None).splitlines())


def test_metrics_callback_load_summaries_by_block(tmp_path):
    """Counts recorded for blocks 1 and 2 (block 0 dense): max/mean and min/mean load, the
    dropped fraction of each layer's routed rows, and ``expert_load`` naming its blocks."""
    callback = MetricsCallback()
    metrics = {names.expert_count(1, e): c for e, c in enumerate([6.0, 2.0, 0.0, 0.0])}
    metrics |= {names.expert_count(2, e): 2.0 for e in range(4)}
    metrics |= {names.dropped_count(1): 2.0, names.dropped_count(2): 0.0, names.CE_LOSS: 1.0}
    callback._path = tmp_path / "metrics.jsonl"
    callback.pre_log_metrics(5, metrics)
    assert metrics[names.layer_max_load(1)] == 3.0 and metrics[names.layer_min_load(1)] == 0.0
    assert metrics[names.layer_max_load(2)] == 1.0
    assert metrics[names.layer_dropped_fraction(1)] == 0.25
    assert metrics[names.layer_dropped_fraction(2)] == 0.0
    assert not any(k.startswith((names.EXPERT_LOAD_PREFIX, names.DROPPED_PREFIX)) for k in metrics)
    assert names.layer_max_load(0) not in metrics
    callback.log_metrics(5, metrics)
    record = read_metrics(tmp_path)[0]
    assert record["expert_load"] == [[0.75, 0.25, 0.0, 0.0], [0.25] * 4]
    assert record["expert_load_layers"] == [1, 2]


def test_per_source_sums_become_loss_tokens_and_a_running_total():
    def step_metrics(web, code):
        m = {names.CE_LOSS: 5.0}
        for name, (ce, loss_tokens, tokens) in (("web", web), ("code", code)):
            m[names.source_sum(name, names.SOURCE_CE)] = ce
            m[names.source_sum(name, names.SOURCE_LOSS_TOKENS)] = loss_tokens
            m[names.source_sum(name, names.SOURCE_TOKENS)] = tokens
        return m

    callback = MetricsCallback()
    first = step_metrics(web=(30.0, 12.0, 16.0), code=(0.0, 0.0, 0.0))
    callback.pre_log_metrics(1, first)
    assert not any(k.startswith(names.SOURCE_SUM_PREFIX) for k in first)
    assert first[names.source_loss("web")] == 2.5
    assert names.source_loss("code") not in first  # no code tokens in this step: no loss
    assert first[names.source_tokens("code")] == 0

    resumed = MetricsCallback()
    resumed.load_state_dict(callback.state_dict())
    second = step_metrics(web=(10.0, 4.0, 8.0), code=(9.0, 3.0, 8.0))
    resumed.pre_log_metrics(2, second)
    assert second[names.source_loss("code")] == 3.0
    assert second[names.source_tokens("web")] == 8
    assert second[names.source_tokens_seen("web")] == 24
    assert second[names.source_tokens_seen("code")] == 8


def _speed_windows(records: list[dict], line_steps: set[int]) -> dict[int, tuple[list, list]]:
    """{step: (tok/s values, MFU values)} each console line takes the median of, replayed from
    metrics.jsonl, which holds one record per logging call in call order: the values logged
    since the previous line, up to the first record of the line's step. olmo-core times no step
    before the second, and logs the speed of a step that validated or saved after that step's
    own record, so it counts towards the next line."""
    windows, tps, mfu = {}, [], []
    for r in records:
        tps += [r[names.TOKENS_PER_SECOND]] if names.TOKENS_PER_SECOND in r else []
        mfu += [r[names.MFU]] if names.MFU in r else []
        if r["step"] in line_steps and r["step"] not in windows:
            windows[r["step"]], tps, mfu = (tps, mfu), [], []
    return windows


@pytest.mark.slow
def test_console_prints_one_line_per_interval_and_a_run_summary(tmp_path):
    data = make_data(tmp_path)
    save = tmp_path / "run"
    proc = run_train([TEST_CONFIG, *tiny_overrides(save, data, console_log_interval=3)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Where olmo-core's logging writes depends on its set-up; read both streams.
    text = proc.stdout + proc.stderr
    lines = [m for m in map(LINE.search, text.splitlines()) if m]
    # Steps 3 and 6 by the interval, 8 as the last step; no line for any other step.
    assert [int(m[1]) for m in lines] == [3, 6, 8]
    assert not re.search(r"\[step=\d+/", text), "olmo-core's per-step progress lines remain"
    in_order = read_metrics(save)
    records = {r["step"]: r for r in in_order if names.CE_LOSS in r}
    speeds = _speed_windows(in_order, {int(m[1]) for m in lines})
    for m in lines:
        step = int(m[1])
        record = records[step]
        assert int(m[2]) == 8
        assert float(m[3]) == pytest.approx(record[names.CE_LOSS], abs=5e-5)
        assert float(m[4]) == pytest.approx(record[names.LB_LOSS], abs=5e-6)
        assert float(m[5]) == pytest.approx(record[names.Z_LOSS], abs=5e-6)
        assert float(m[6]) == pytest.approx(record[names.GRAD_NORM], abs=5e-4)
        assert float(m[7]) == pytest.approx(record[names.LR], rel=5e-3)
        tps, mfu = speeds[step]
        assert float(m[8].replace(",", "")) == pytest.approx(statistics.median(tps), abs=0.5)
        assert float(m[9]) == pytest.approx(statistics.median(mfu), abs=0.05)
        assert 0 < float(m[10]) < 64  # GiB: the process's RSS, not bytes or KiB
        assert m[11] == format_count(step * 8 * 32)  # global batch 8 x 32 tokens per step
    assert lines[-1][13] == "0s"  # the last step: nothing left to run
    memory = [r[names.PEAK_MEMORY_GIB] for r in in_order if names.PEAK_MEMORY_GIB in r]
    assert len(memory) >= 7 and memory == sorted(memory)  # a peak since start only grows
    assert memory[-1] <= float(lines[-1][10]) + 0.005
    out = text
    assert f"Run complete: {save}" in out
    assert f"checkpoint    {save / 'step8'}" in out
    assert f"metrics       {save / 'metrics.jsonl'}" in out
    assert f"config        {save / 'config.yaml'}" in out
    for command in ("scripts/generate.py", "scripts/convert_to_hf.py", "scripts/analyze.py",
                    "scripts/compare_activations.py", "scripts/evaluate_downstream.py"):
        assert f"python {command} " in out
    # One MFU figure per record: olmo-core's run average is not passed on.
    assert not any(names.MFU_RUN_AVERAGE in r for r in in_order)


def _plain_shell_env() -> dict[str, str]:
    """A login shell's environment: no activated virtual environment, no venv on PATH."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if "PYTHONPATH" in os.environ:  # a developer's work tree; unset in CI and a user's shell
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def test_every_printed_next_command_works_from_a_plain_shell(tmp_path):
    """Train a run with the OLMo tokenizer's vocabulary, then run each command of its summary
    exactly as printed, through bash, without the project's environment activated."""
    data = tmp_path / "data"
    vocab = 50280
    write_token_file(data / "train-0.npy", 40_000, vocab=vocab, seed=0)
    write_token_file(data / "val-0.npy", 4_000, vocab=vocab, seed=1)
    save = tmp_path / "run"
    overrides = tiny_overrides(save, data, max_duration=2, save_interval=2, eval_interval=2,
                               **{"model.vocab_size": vocab, "model.embedding_size": 50304,
                                  "data.eos_token_id": 50279, "wandb.mode": "offline"})
    proc = run_train([TEST_CONFIG, *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The summary is printed to stdout; log lines (stderr) can interleave with it in ``text``.
    summary = proc.stdout[proc.stdout.index("Next:"):].splitlines()[1:7]
    commands = {line[:14].strip(): line[14:] for line in summary}
    assert set(commands) == {"train longer", "generate", "export", "analyse", "evaluate", "compare"}
    sync = next(line for line in proc.stdout.splitlines() if "(upload: " in line)
    wandb_cli = sync.split("(upload: ", 1)[1].split()[0]
    assert os.access(REPO / wandb_cli if not os.path.isabs(wandb_cli) else wandb_cli, os.X_OK)

    def run(command: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=REPO, env=_plain_shell_env(),
                              capture_output=True, text=True, timeout=timeout)

    # These only read the run: they run side by side (each is one single-threaded process).
    # The sweep itself trains 18 runs; its report mode runs the same interpreter and script.
    reading = {name: commands[name] for name in ("generate", "export", "analyse", "evaluate")}
    reading["compare"] = commands["compare"].replace(
        "--out runs/compare", f"--out {tmp_path / 'cmp'}") + " --report-only"
    started = {name: subprocess.Popen(["bash", "-c", command], cwd=REPO, env=_plain_shell_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, command in reading.items()}  # fmt: skip
    try:
        for name, proc in started.items():
            _, stderr = proc.communicate(timeout=900)
            if name == "compare":
                assert "No module named" not in stderr, stderr[-2000:]
            else:
                assert proc.returncode == 0, f"{name}: {reading[name]}\n{stderr[-2000:]}"
    finally:
        for proc in started.values():
            proc.kill()
            proc.wait()
    # Train longer: bash run_pretrain.sh with the interpreter that trained (PYTHON unset, no
    # .venv needed in the work tree since the printed command names the config and folder).
    longer = commands["train longer"].replace("--max_duration=4", "--max_duration=3")
    assert longer.endswith("--max_duration=3")
    # A user's checkout has the .venv the main job made; a developer's extra work tree may not.
    result = run(longer if (REPO / ".venv").is_dir() else f"PYTHON={sys.executable} {longer}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert max(r["step"] for r in read_metrics(save)) == 3
