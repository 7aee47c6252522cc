"""Routing traces (olmo/routing_trace.py) and their replay (olmo/routing_replay.py,
scripts/replay_routing.py): what a traced step writes, that replaying a model's own trace
reproduces its logits exactly (float64), that another model's trace changes them, and that a
trace from another shape or sequence length is refused in one line before any work."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from moe_model.config import ModelConfig
from moe_model.errors import TraceError
from moe_model.routing import RouteChoice
from olmo.config import TraceConfig, TrainConfig, load_config
from olmo.data import DataConfig
from olmo.metric_names import expert_count, layer_max_load
from olmo.routing_replay import replay
from olmo.routing_trace import (
    RoutingRecorder,
    check_replayable,
    load_trace,
    summary,
    trace_path,
)
from olmo.train_module import MoETrainModule, train_module_config

from .helpers import REPO, TEST_CONFIG, make_data, read_metrics, run_train, tiny_overrides

VOCAB, SEQ = 64, 16


def model_config(**changes) -> ModelConfig:
    return ModelConfig(**{
        "vocab_size": VOCAB, "embedding_size": VOCAB, "d_model": 32, "n_layers": 3,
        "n_heads": 2, "max_sequence_length": SEQ, "activation_type": "polynorm",
        "mlp_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2,
        "moe_first_dense_layers": 1, **changes,
    })  # fmt: skip


def float64_model(seed: int, **changes):
    torch.manual_seed(seed)
    cfg = model_config(**changes)
    return cfg.build().double().eval(), cfg


def tokens(batch: int = 3, seq: int = SEQ, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def record(model, cfg, ids, tmp_path, step=1):
    """The model's routing on ``ids`` written as a trace file and read back."""
    recorder = RoutingRecorder(cfg)
    with torch.no_grad():
        recorder.add(ids, None, model(ids).routes)
    return load_trace(recorder.save(tmp_path, step))


# ---- the train module writes traces on the chosen steps ----------------------------------------


class TrainerStandIn:
    """What train_batch reads from olmo-core's Trainer, with a save folder."""

    def __init__(self, save_folder, global_step):
        self.save_folder, self.global_step, self.max_steps = save_folder, global_step, 4
        self.metrics: dict[str, object] = {}

    def record_metric(self, name, value, reduce_type=None, namespace=None, merge_strategy=None):
        self.metrics[name] = value


def test_train_module_writes_the_trace_of_traced_steps_only(tmp_path):
    torch.manual_seed(0)
    model_cfg = model_config()
    cfg = TrainConfig(model=model_cfg, precision="fp32", global_train_batch_size=4,
                      device_train_microbatch_size=2, trace=TraceConfig(routing_steps=[2]),
                      data=DataConfig(paths=["unused.npy"]))  # fmt: skip
    module = MoETrainModule(model_cfg.build(), train_module_config(cfg), torch.device("cpu"))
    ids = tokens(batch=4)
    for step in (1, 2):
        module._attach_trainer(TrainerStandIn(tmp_path, step))
        if step == 2:
            with torch.no_grad():  # step 2's routing computed independently, per micro-batch
                halves = [module.model(ids[rows]).routes for rows in (slice(0, 2), slice(2, 4))]
            expected = [RouteChoice(torch.cat([a.experts_TK, b.experts_TK]),
                                    torch.cat([a.weights_TK, b.weights_TK]))
                        for a, b in zip(*halves)]  # fmt: skip
        module.train_batch({"input_ids": ids.clone()})
        module.optim_step()
    assert sorted(p.name for p in (tmp_path / "routing").iterdir()) == ["step2.pt"]

    trace = load_trace(trace_path(tmp_path, 2))
    assert (trace.step, trace.rank, trace.world_size) == (2, 0, 1)
    assert trace.moe_layer_ids == [1, 2] and trace.signature["moe_num_experts"] == 4
    assert torch.equal(trace.input_ids, ids.int())
    assert trace.experts.dtype == torch.uint8 and trace.experts.shape == (2, 4 * SEQ, 2)
    for index, route in enumerate(expected):
        layer = trace.layer(index)
        assert torch.equal(layer["experts"], route.experts_TK)
        torch.testing.assert_close(layer["weights"], route.weights_TK, rtol=0, atol=0)
        want_E = torch.bincount(route.experts_TK.reshape(-1), minlength=4)
        assert torch.equal(layer["counts"], want_E)
        # The same counts the step's expert-load metrics recorded.
        metrics = module.trainer.metrics
        recorded_E = [metrics[expert_count(trace.moe_layer_ids[index], e)] for e in range(4)]
        assert torch.stack(recorded_E).long().tolist() == want_E.tolist()
    lines = summary(trace).splitlines()
    assert lines[0].startswith("step 2, rank 0 of 1: 4 x 16 tokens, top-2 of 4 experts")
    overload = float(trace.counts[0].max() / trace.counts[0].double().mean())
    assert f"overload {overload:5.2f}" in lines[1]


def test_trace_steps_need_moe_layers():
    with pytest.raises(Exception, match=r"^trace.routing_steps=\[3\] needs MoE layers"):
        load_config(None, ["--trace.routing_steps=[3]", "--model.block_type=dense"])
    with pytest.raises(Exception, match=r"^trace.routing_steps has 0; expected steps >= 1"):
        load_config(None, ["--trace.routing_steps=[0]"])


# ---- replay ------------------------------------------------------------------------------------


def test_replaying_own_trace_reproduces_logits_exactly(tmp_path):
    model, cfg = float64_model(seed=0)
    ids = tokens()
    trace = record(model, cfg, ids, tmp_path)
    assert trace.weights.dtype == torch.float64
    with torch.no_grad():
        fresh = model(ids)
        replayed = model(ids, routes=trace.routes())
    assert torch.equal(fresh.logits, replayed.logits)
    result = replay(model, trace, batch_size=2)
    assert result.loss_fresh == result.loss_recorded
    assert result.expert_agreement == 1.0 and result.tokens == ids.numel()


def test_replaying_another_models_trace_changes_logits(tmp_path):
    model, cfg = float64_model(seed=0)
    other, _ = float64_model(seed=1)
    ids = tokens()
    trace = record(other, cfg, ids, tmp_path)
    with torch.no_grad():
        fresh = model(ids)
        replayed = model(ids, routes=trace.routes())
        # Reference: the other model's routing imposed layer by layer is what the layers used.
        assert all(torch.equal(r.experts_TK, t.experts_TK)
                   for r, t in zip(replayed.routes, trace.routes()))  # fmt: skip
    assert not torch.allclose(fresh.logits, replayed.logits)
    result = replay(model, trace, batch_size=3)
    assert result.loss_fresh != result.loss_recorded and result.expert_agreement < 1.0


@pytest.mark.parametrize("change,message", [
    (dict(moe_num_experts=8), r"model.moe_num_experts=8 in the trace but 4 in this model"),
    (dict(moe_top_k=1), r"model.moe_top_k=1 in the trace but 2 in this model"),
    (dict(moe_first_dense_layers=0), r"model.moe_layer_ids=\[0, 1, 2\] in the trace but \[1, 2\]"),
    (dict(d_model=16), r"model.d_model=16 in the trace but 32 in this model"),
])  # fmt: skip
def test_trace_from_another_shape_is_refused(tmp_path, change, message):
    other, other_cfg = float64_model(seed=0, **change)
    trace = record(other, other_cfg, tokens(), tmp_path)
    with pytest.raises(TraceError, match=r"^routing trace: " + message) as err:
        check_replayable(trace, model_config())
    assert "\n" not in str(err.value)


def test_trace_from_another_sequence_length_is_refused(tmp_path):
    model, cfg = float64_model(seed=0)
    trace = record(model, cfg, tokens(seq=SEQ // 2), tmp_path)
    with pytest.raises(TraceError, match=r"sequences of 8 tokens but model.max_sequence_length=16"):
        check_replayable(trace, cfg)
    with pytest.raises(ValueError, match=r"routes\[0\].experts_TK has shape \(24, 2\); expected"):
        model(tokens(), routes=trace.routes())


def test_missing_or_foreign_trace_file(tmp_path):
    with pytest.raises(TraceError, match=r"does not exist"):
        load_trace(tmp_path / "step1.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(TraceError, match=r"is not a format-1 routing trace"):
        load_trace(tmp_path / "other.pt")


# ---- end to end: a traced run, its replay, a refusal -------------------------------------------


@pytest.mark.slow
def test_replay_cli_on_a_traced_run(tmp_path):
    """Step 3's forward ran with step 2's weights: replayed on them, the recorded routing is the
    model's own (agreement 1, equal losses); a trace from another shape is refused in one line."""
    data = make_data(tmp_path)
    save = tmp_path / "run"
    proc = run_train([TEST_CONFIG, *tiny_overrides(save, data, max_duration=3, save_interval=2,
                                                   **{"trace.routing_steps": "[1,3]"})])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (save / "routing").iterdir()) == ["step1.pt", "step3.pt"]
    # The overload factor metrics.jsonl (and W&B) log for step 1 is the trace's max / mean load.
    step1 = load_trace(save / "routing" / "step1.pt")
    record = next(r for r in read_metrics(save) if r["step"] == 1)
    for layer, counts_E in zip(step1.moe_layer_ids, step1.counts.double()):
        overload = float(counts_E.max() / counts_E.mean())
        assert record[layer_max_load(layer)] == pytest.approx(overload, rel=1e-9)
    script = str(REPO / "scripts" / "replay_routing.py")
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, script, str(save), "--step", "3", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checkpoint"].endswith("step2/model_and_optim")
    assert result["expert_agreement"] == 1.0
    assert result["loss_recorded"] == pytest.approx(result["loss_fresh"], rel=1e-6)
    assert result["tokens"] == 8 * 32

    # A trace of a model with other experts: refused before the weights are read.
    cfg = load_config(TEST_CONFIG, [])
    other_cfg = dataclasses.replace(cfg.model, moe_num_experts=8)
    torch.manual_seed(0)
    other = other_cfg.build().eval()
    recorder = RoutingRecorder(other_cfg)
    ids = tokens(batch=2, seq=other_cfg.max_sequence_length)
    with torch.no_grad():
        recorder.add(ids, None, other(ids).routes)
    foreign = recorder.save(tmp_path / "other", 3)
    proc = subprocess.run([sys.executable, script, str(save), "--step", "3", "--trace", str(foreign)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: routing trace {str(foreign)!r}: model.moe_num_experts=8 in the trace but 4 in "
        "this model; a trace replays only on a model of the same shape"
    ]


@pytest.mark.slow
def test_two_data_parallel_ranks_trace_their_own_tokens(tmp_path):
    """2 gloo ranks: one file per rank, disjoint halves of the step's sequences, and their
    counts summed give the expert load metrics.jsonl logs for the step."""
    from olmo.analysis import trace_load

    data = make_data(tmp_path)
    save = tmp_path / "run"
    proc = run_train([TEST_CONFIG, *tiny_overrides(save, data, max_duration=1,
                                                   **{"trace.routing_steps": "[1]"})], nproc=2)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in (save / "routing").iterdir())
    assert names == ["step1-rank0.pt", "step1-rank1.pt"]
    traces = [load_trace(save / "routing" / name) for name in names]
    assert [(t.rank, t.world_size) for t in traces] == [(0, 2), (1, 2)]
    assert all(t.input_ids.shape == (4, 32) for t in traces)  # 8 sequences per step, 4 per rank
    rows = {tuple(r) for t in traces for r in t.input_ids.tolist()}
    assert len(rows) == 8
    record = next(r for r in read_metrics(save) if r["step"] == 1)
    load = trace_load(traces)["expert_load"]
    for got, want in zip(load, record["expert_load"], strict=True):
        assert got == pytest.approx(want, abs=5.1e-7)  # metrics.jsonl keeps 6 decimals
