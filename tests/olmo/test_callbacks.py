"""The console a person watches: one line per interval with the objective's terms, and a summary
of the run's outputs at the end; the per-source metrics of a data mixture."""

import re
import statistics

import pytest

from olmo import metric_names as names
from olmo.callbacks import MetricsCallback, format_duration, progress_line, run_summary

from .helpers import TEST_CONFIG, make_data, read_metrics, run_train, tiny_overrides

LINE = re.compile(
    r"step (\d+)/(\d+) \| CE ([0-9.]+) \| LB ([0-9.]+) \| Z ([0-9.]+) \| grad ([0-9.]+) \| "
    r"lr ([0-9.e+-]+) \| ([0-9,]+) tok/s \| MFU ([0-9.]+)% \| ETA (\w+)$"
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


def test_run_summary_names_the_newest_wandb_run_and_how_to_upload_it(tmp_path):
    save = tmp_path / "run"
    wandb = save / "wandb"
    for name in ("offline-run-20250101_000000-a1", "offline-run-20250102_000000-a1", "latest-run"):
        (wandb / name).mkdir(parents=True)
    newest = wandb / "offline-run-20250102_000000-a1"
    lines = run_summary(save, 3, 8, "configs/tiny.yaml").splitlines()
    assert lines[0] == f"Run stopped at step 3: {save}"
    assert f"  W&B           {newest}  (upload: wandb sync {newest})" in lines
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
    assert lines[-1][10] == "0s"  # the last step: nothing left to run
    out = text
    assert f"Run complete: {save}" in out
    assert f"checkpoint    {save / 'step8'}" in out
    assert f"metrics       {save / 'metrics.jsonl'}" in out
    assert f"config        {save / 'config.yaml'}" in out
    for command in ("scripts/generate.py", "scripts/convert_to_hf.py", "scripts/analyze.py",
                    "scripts/compare_activations.py", "scripts/evaluate_downstream.py"):
        assert f"python {command} " in out
