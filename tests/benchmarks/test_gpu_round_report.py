"""benchmarks/gpu_round_report.py reads a run's metrics under the names the trainer writes."""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu_round_report import pretrain_record
from olmo import metric_names as names
from olmo.run_files import METRICS_FNAME


def test_pretrain_record_from_metrics(tmp_path):
    run = tmp_path / "olmoe-polynorm"
    run.mkdir()
    rows = [
        {"step": s, "tokens": 1000 * s, names.CE_LOSS: 10.0 - s, names.TOKENS_PER_SECOND: 100.0 * s,
         names.MFU: 1.0 * s}
        for s in range(1, 13)
    ]
    rows[3][names.eval_loss("c4")] = 7.5
    rows[3][names.eval_perplexity("c4")] = 1808.0  # not a loss: left out
    rows[7][names.eval_loss("c4")] = 6.5
    (run / METRICS_FNAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = pretrain_record(run)
    assert record["steps"] == 12 and record["tokens"] == 12_000
    assert record["first_loss"] == 9.0
    assert record["final_loss_last10"] == pytest.approx(sum(10.0 - s for s in range(3, 13)) / 10)
    assert record["median_tokens_per_s"] == 650.0 and record["median_mfu_pct"] == 6.5
    assert record["eval"] == {names.eval_loss("c4"): [(4, 7.5), (8, 6.5)]}
    assert record["loss_curve"][:2] == [(1, 9.0), (2, 8.0)]
