"""MoETrainModule in one process: the objective's gradients, the recorded losses, the LR schedule.

The paper's released trainer computed the load-balancing and router z-losses and never added
them to the objective; nothing downstream of the loss value shows that. Here the gradients of
``train_batch`` are compared, parameter by parameter, with a hand-built objective on a copy of
the model, and the test checks that it tells the right objective from the likely faults (an
auxiliary loss left out, or not divided by the number of micro-batches).

``train_batch`` and ``optim_step`` run as olmo-core's Trainer calls them, with a stand-in for
the few Trainer attributes they read.

With FSDP2 over 2 gloo processes: gradients are reduce-scattered once per step (not once per
micro-batch) and PolyNorm coefficients stay fp32 under a bf16 param dtype.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_model.config import ModelConfig
from olmo.config import OptimizerConfig, SchedulerConfig, TrainConfig
from olmo.metric_names import CE_LOSS, EXPERT_LOAD_PREFIX, LB_LOSS, LR, TOTAL_LOSS, Z_LOSS
from olmo.optim import lr_at
from olmo.train_module import MoETrainModule, train_module_config

from .helpers import REPO, TEST_CONFIG, free_port, run_worker

VOCAB, SEQ, BATCH, MICRO = 64, 12, 4, 2
# max |grad - reference| / max |reference| per parameter: the two sides run the same fp32 ops
# except the cross-entropy (here log_softmax + gather), so they agree to rounding.
GRAD_TOL = 1e-5


class TrainerStandIn:
    """What ``train_batch``/``optim_step`` read from olmo-core's Trainer: the step counters and
    ``record_metric`` (one value per name and step, as the Trainer's warn-on-merge expects)."""

    def __init__(self, global_step: int = 1, max_steps: int = 10):
        self.global_step = global_step
        self.max_steps = max_steps
        self.metrics: dict[str, float] = {}

    def record_metric(self, name, value, reduce_type=None, namespace=None, merge_strategy=None):
        assert name not in self.metrics, f"{name} recorded twice in one step"
        self.metrics[name] = float(value)


def model_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, embedding_size=VOCAB, d_model=32, n_layers=2, n_heads=2,
        max_sequence_length=SEQ, activation_type="polynorm", mlp_hidden_size=24,
        moe_num_experts=4, moe_top_k=2,
    )  # fmt: skip
    base.update(changes)
    return ModelConfig(**base)


def make_module(config: ModelConfig, seed: int = 0, **train) -> tuple[MoETrainModule, TrainerStandIn]:
    torch.manual_seed(seed)
    model = config.build()
    with torch.no_grad():  # non-default PolyNorm coefficients, distinct per layer
        for i, block in enumerate(model.blocks):
            block.ffn.act.weight.copy_(torch.tensor([0.5, -0.3, 0.9]) * (i + 1))
            block.ffn.act.bias.fill_(0.1 * (i + 1))
    settings = dict(precision="fp32", global_train_batch_size=BATCH,
                    device_train_microbatch_size=MICRO)
    cfg = TrainConfig(model=config, **{**settings, **train})
    module = MoETrainModule(model, train_module_config(cfg), torch.device("cpu"))
    trainer = TrainerStandIn()
    module._attach_trainer(trainer)  # what olmo-core's Trainer does when it is built
    return module, trainer


def make_batch(seed: int = 1, size: int = BATCH) -> dict[str, torch.Tensor]:
    """Micro-batches with different numbers of predicted tokens (a label mask in the first),
    so dividing each micro-batch's CE by its own token count would show."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (size, SEQ), generator=gen)
    label_mask = torch.ones(size, SEQ, dtype=torch.bool)
    label_mask[0, :5] = False
    label_mask[1, 7:] = False
    return {"input_ids": input_ids, "label_mask": label_mask}


# The objective (lb and z-loss divided by the number of micro-batches) and the faults the test
# must tell from it: each auxiliary loss left out, or not divided.
AUX_SCALES = {
    "right": (0.5, 0.5),
    "lb dropped": (0.0, 0.5),
    "z-loss dropped": (0.5, 0.0),
    "lb not divided": (1.0, 0.5),
    "z-loss not divided": (0.5, 1.0),
}
assert BATCH // MICRO == 2


def reference_step(model, batch, lb_scale: float, z_scale: float, eos_token_id: int | None = None):
    """The objective written out: per micro-batch, CE summed over its predicted tokens divided
    by the predicted tokens of the whole batch, plus ``lb_scale * lb_loss + z_scale * z_loss``.

    Backpropagates into ``model``; returns the losses as the trainer should record them (summed
    over micro-batches, aux losses divided by their number) and the routed-row counts. With
    ``eos_token_id``, attention stays inside the documents it ends.
    """
    from moe_model.attention import document_ids

    ids, mask = batch["input_ids"], batch["label_mask"]
    # Token t predicts token t + 1 where the mask allows; the last position predicts nothing.
    targets, keep = ids[:, 1:], mask[:, 1:]
    n_tokens = keep.sum()
    n_micro = BATCH // MICRO
    totals = {"ce": 0.0, "lb": 0.0, "z": 0.0}
    counts_LE = 0
    for rows in torch.arange(BATCH).split(MICRO):
        docs = None if eos_token_id is None else document_ids(ids[rows], eos_token_id)
        out = model(ids[rows], docs)
        logprobs = out.logits[:, :-1].float().log_softmax(-1)
        picked = logprobs.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
        ce = -(picked * keep[rows]).sum() / n_tokens
        (ce + lb_scale * out.lb_loss + z_scale * out.z_loss).backward()
        totals["ce"] += ce.item()
        totals["lb"] += out.lb_loss.item() / n_micro
        totals["z"] += out.z_loss.item() / n_micro
        counts_LE = counts_LE + out.tokens_per_expert_LE
    return totals, counts_LE


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def worst_relative_error(got: dict, want: dict) -> tuple[float, str]:
    errors = {
        n: ((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)).item()
        for n in want
    }
    name = max(errors, key=errors.get)
    return errors[name], name


def test_train_batch_gradients_are_ce_plus_aux_over_micro_batches():
    # Aux weights above OLMoE's (0.01, 0.001) so that each term moves the router gradient far
    # beyond rounding; the objective's form does not depend on them.
    config = model_config(moe_loss_weight=0.05, moe_zloss_weight=0.02)
    module, trainer = make_module(config)
    batch = make_batch()
    reference = {name: copy.deepcopy(module.model) for name in AUX_SCALES}

    module.train_batch({k: v.clone() for k, v in batch.items()})
    got = grads_of(module.model)
    assert set(got) == {n for n, _ in module.model.named_parameters()}

    ref_grads, ref_totals = {}, {}
    for name, model in reference.items():
        model.train()
        ref_totals[name], counts_LE = reference_step(model, batch, *AUX_SCALES[name])
        ref_grads[name] = grads_of(model)

    err, param = worst_relative_error(got, ref_grads["right"])
    assert err <= GRAD_TOL, f"{param}: gradient differs from CE + (lb + z) / n_micro by {err:.2e}"
    # The comparison can fail: each fault is far outside the tolerance.
    for wrong in AUX_SCALES.keys() - {"right"}:
        err, param = worst_relative_error(got, ref_grads[wrong])
        assert err > 100 * GRAD_TOL, f"{wrong}: indistinguishable ({param}: {err:.2e})"

    totals = ref_totals["right"]
    assert trainer.metrics[CE_LOSS] == pytest.approx(totals["ce"], rel=1e-6)
    assert trainer.metrics[LB_LOSS] == pytest.approx(totals["lb"], rel=1e-6)
    assert trainer.metrics[Z_LOSS] == pytest.approx(totals["z"], rel=1e-6)
    assert trainer.metrics[TOTAL_LOSS] == pytest.approx(sum(totals.values()), rel=1e-6)
    # Raw routed-row counts per layer and expert, summed over the micro-batches.
    for layer, counts_E in enumerate(counts_LE.tolist()):
        for expert, count in enumerate(counts_E):
            assert trainer.metrics[f"{EXPERT_LOAD_PREFIX}layer{layer}/expert{expert}"] == count
    assert counts_LE.sum() == BATCH * SEQ * config.moe_top_k * config.n_layers


def test_per_source_sums_and_unchanged_objective_with_a_mixture_batch():
    """Rows tagged with their mixture source: per-source CE sums, predicted and input tokens,
    from the reference's per-token log-probabilities grouped by source; the gradients and the
    recorded CE are those of the same batch without tags."""
    from olmo.data import DataConfig
    from olmo.metric_names import SOURCE_SUM_PREFIX, source_sum

    sources = {n: {"paths": ["unused.npy"], "fraction": f} for n, f in (("web", 0.5), ("code", 0.5))}
    module, trainer = make_module(model_config(), data=DataConfig(sources=sources))
    plain, plain_trainer = make_module(model_config())
    batch = make_batch()
    source = torch.tensor([1, 0, 1, 1])  # code, web, code, code: one micro-batch mixes them
    module.train_batch({**{k: v.clone() for k, v in batch.items()}, "source": source})
    plain.train_batch({k: v.clone() for k, v in batch.items()})
    err, param = worst_relative_error(grads_of(module.model), grads_of(plain.model))
    assert err <= GRAD_TOL, f"{param}: tagging rows changed the gradient by {err:.2e}"
    assert trainer.metrics[CE_LOSS] == pytest.approx(plain_trainer.metrics[CE_LOSS], rel=1e-6)

    with torch.no_grad():
        logprobs = plain.model(batch["input_ids"]).logits[:, :-1].log_softmax(-1)
    nll_BS = -logprobs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    keep_BS = batch["label_mask"][:, 1:]
    for index, name in enumerate(("web", "code")):
        rows = source == index
        assert trainer.metrics[source_sum(name, "ce")] == pytest.approx(
            (nll_BS[rows] * keep_BS[rows]).sum().item(), rel=1e-5)
        assert trainer.metrics[source_sum(name, "loss_tokens")] == keep_BS[rows].sum().item()
        assert trainer.metrics[source_sum(name, "tokens")] == rows.sum().item() * SEQ
    assert not any(k.startswith(SOURCE_SUM_PREFIX) for k in plain_trainer.metrics)



FUSED_TOL = 1e-12
"""float64: fused and unfused losses and gradients differed by at most 1.1e-15 relative."""


def test_fused_lm_loss_equals_the_logits_cross_entropy_in_float64():
    """fused_lm_loss (the LM head and its cross-entropy a slice of tokens at a time) gives the
    losses, per-source sums and gradients of the logits path, in float64."""
    from olmo.data import DataConfig

    sources = {n: {"paths": ["unused.npy"], "fraction": f} for n, f in (("web", 0.5), ("code", 0.5))}
    runs = {}
    for fused in (False, True):
        module, trainer = make_module(model_config(), fused_lm_loss=fused,
                                      data=DataConfig(sources=sources))  # fmt: skip
        module.model.double()
        module.train_batch({**make_batch(), "source": torch.tensor([1, 0, 1, 1])})
        runs[fused] = grads_of(module.model), trainer.metrics
    err, param = worst_relative_error(runs[True][0], runs[False][0])
    assert err <= FUSED_TOL, f"{param}: fused gradient differs by {err:.2e}"
    assert runs[True][1].keys() == runs[False][1].keys()
    for name, value in runs[False][1].items():
        assert runs[True][1][name] == pytest.approx(value, rel=FUSED_TOL, abs=1e-12), name
    from olmo.metric_names import SOURCE_SUM_PREFIX

    assert any(k.startswith(SOURCE_SUM_PREFIX) for k in runs[True][1])


def test_fused_lm_loss_nan_fault_stops_the_step():
    """MOE_FAULT=nan_loss's hook (olmo/faults.py) poisons the per-token losses when the fused
    loss leaves no logits: the step stops before the update, as with logits."""
    from moe_model.errors import NonFiniteError
    from olmo.faults import _nan_logits

    module, _ = make_module(model_config(), fused_lm_loss=True)
    module.model.register_forward_hook(_nan_logits)
    module.train_batch(make_batch())
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        module.optim_step()


@pytest.mark.parametrize("mode", ["full", "moe", "attention", True])
def test_activation_checkpointing_modes_keep_losses_and_gradients(mode):
    """Each checkpointing mode recomputes part of each block in backward: the step's losses and
    gradients equal those without checkpointing (float64, within FUSED_TOL)."""
    runs = {}
    for setting in (False, mode):
        module, trainer = make_module(model_config(), activation_checkpointing=setting)
        module.model.double()
        module.train_batch(make_batch())
        grads = {n.replace("_checkpoint_wrapped_module.", ""): g
                 for n, g in grads_of(module.model).items()}  # fmt: skip
        runs[setting] = grads, trainer.metrics
    wrappers = [m for m in module.model.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrappers) == module.config.model.n_layers
    err, param = worst_relative_error(runs[mode][0], runs[False][0])
    assert err <= FUSED_TOL, f"{mode}: {param} differs by {err:.2e}"
    for name, value in runs[False][1].items():
        assert runs[mode][1][name] == pytest.approx(value, rel=FUSED_TOL, abs=1e-12), name


def test_document_masking_reads_the_batchs_document_ids():
    """The train module takes document boundaries from the batch (the data layer's collator);
    the gradients and losses equal those of the model given document_ids(input_ids, EOS), as the
    train module computed them itself before; a batch without them is refused."""
    from moe_model.attention import document_ids
    from olmo.data import BatchCollator, DataConfig

    eos = VOCAB - 1
    config = model_config(document_masking=True)
    module, trainer = make_module(config, data=DataConfig(eos_token_id=eos))
    reference = copy.deepcopy(module.model)
    batch = make_batch()
    batch["input_ids"][:, 4] = eos  # a boundary in every row, and one more in the first
    batch["input_ids"][0, 8] = eos
    collated = BatchCollator(pad_token_id=1, vocab_size=VOCAB, eos_token_id=eos)(
        [{"input_ids": row} for row in batch["input_ids"]]
    )
    # The boundaries the train module derived from the EOS id itself before.
    assert torch.equal(collated["doc_ids"], document_ids(batch["input_ids"], eos))
    module.train_batch({**{k: v.clone() for k, v in batch.items()}, "doc_ids": collated["doc_ids"]})
    reference.train()
    totals, _ = reference_step(reference, batch, 0.5, 0.5, eos_token_id=eos)
    err, param = worst_relative_error(grads_of(module.model), grads_of(reference))
    assert err <= GRAD_TOL, f"{param}: gradient differs from the document-masked model's by {err:.2e}"
    assert trainer.metrics[CE_LOSS] == pytest.approx(totals["ce"], rel=1e-6)
    with pytest.raises(ValueError, match="model.document_masking is on but the batch has no 'doc_ids'"):
        module.train_batch(make_batch())



def test_train_module_config_takes_each_setting_from_the_run_config():
    """The train module's own config: every field from its TrainConfig key, defaults resolved."""
    from olmo.config import ParallelConfig
    from olmo.data import DataConfig

    sources = {n: {"paths": ["unused.npy"], "fraction": 0.5} for n in ("web", "code")}
    cfg = TrainConfig(
        model=model_config(), seed=3, precision="bf16", init_on_device=True, compile=True,
        activation_checkpointing=True, device_train_microbatch_size=2, max_grad_norm=0.5,
        reduce_grads_every_microbatch=True, nonfinite_policy="skip",
        parallel=ParallelConfig(expert_parallel_degree=2), data=DataConfig(sources=sources),
    )  # fmt: skip
    tm = train_module_config(cfg)
    assert tm.model is cfg.model and tm.optimizer is cfg.optimizer and tm.scheduler is cfg.scheduler
    assert (tm.seed, tm.precision, tm.init_on_device, tm.compile, tm.activation_checkpointing) == (
        3, "bf16", True, True, True)
    assert (tm.microbatch_size, tm.eval_batch_size, tm.max_grad_norm) == (2, 2, 0.5)
    assert (tm.reduce_grads_every_microbatch, tm.nonfinite_policy, tm.expert_parallel_degree) == (
        True, "skip", 2)
    assert tm.source_names == ("web", "code")
    cfg.eval_batch_size = 5
    assert train_module_config(cfg).eval_batch_size == 5

def test_dry_run_leaves_no_gradient_and_records_nothing():
    module, trainer = make_module(model_config())
    module.train_batch(make_batch(), dry_run=True)
    assert all(p.grad is None for p in module.model.parameters())
    assert trainer.metrics == {}


# ---- learning-rate schedule --------------------------------------------------------------------


def cosine_closed_form(step, peak, warmup, max_steps, alpha_f):
    if step < warmup:
        return peak * step / warmup
    final = alpha_f * peak
    t = min(1.0, (step - warmup) / (max_steps - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * t))


def test_lr_schedules_against_closed_forms():
    peak, warmup, max_steps = 4e-4, 10, 110
    cosine = SchedulerConfig(name="cosine_with_warmup", t_warmup=warmup, alpha_f=0.1)
    for step in (0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 200):
        want = cosine_closed_form(step, peak, warmup, max_steps, 0.1)
        assert lr_at(cosine, peak, step, max_steps) == pytest.approx(want, rel=1e-12), step
    # Landmarks: half-way through the decay the LR is the mean of peak and final.
    assert lr_at(cosine, peak, 60, max_steps) == pytest.approx((peak + 0.1 * peak) / 2, rel=1e-12)
    assert lr_at(cosine, peak, 1, max_steps) == pytest.approx(peak / warmup, rel=1e-12)

    linear = SchedulerConfig(name="linear_with_warmup", t_warmup=warmup, alpha_f=0.2)
    for step, want in ((5, peak / 2), (10, peak), (60, peak * 0.6), (110, peak * 0.2)):
        assert lr_at(linear, peak, step, max_steps) == pytest.approx(want, rel=1e-12), step
    constant = SchedulerConfig(name="constant_with_warmup", t_warmup=warmup)
    for step, want in ((2, peak / 5), (10, peak), (110, peak), (500, peak)):
        assert lr_at(constant, peak, step, max_steps) == pytest.approx(want, rel=1e-12), step
    no_warmup = SchedulerConfig(t_warmup=0, alpha_f=0.0)
    assert lr_at(no_warmup, peak, 0, 100) == pytest.approx(peak, rel=1e-12)
    assert lr_at(no_warmup, peak, 50, 100) == pytest.approx(peak / 2, rel=1e-12)


def test_optim_step_sets_the_scheduled_lr_on_every_group():
    peak, warmup = 2e-3, 4
    module, trainer = make_module(
        model_config(), optimizer=OptimizerConfig(learning_rate=peak),
        scheduler=SchedulerConfig(t_warmup=warmup),
    )  # fmt: skip
    assert len(module.optim.param_groups) == 2  # decayed, and the PolyNorm coefficients
    for step in (1, 3, 6):
        trainer.global_step, trainer.metrics = step, {}
        module.zero_grads()
        module.train_batch(make_batch(seed=step))
        module.optim_step()
        want = cosine_closed_form(step, peak, warmup, trainer.max_steps, 0.1)
        assert trainer.metrics[LR] == pytest.approx(want, rel=1e-12)
        assert [g["lr"] for g in module.optim.param_groups] == [trainer.metrics[LR]] * 2


def test_model_only_checkpoint_starts_with_a_fresh_optimizer_at_warmup_step_one(tmp_path):
    """What ``--load_path`` does with scripts/convert_from_hf.py's output: the weights load
    strictly, AdamW starts empty, and step 1's learning rate is peak / t_warmup."""
    from olmo_core.train.checkpoint import Checkpointer

    from olmo.checkpoint_io import save_model_dcp

    peak, warmup = 3e-3, 2
    source, _ = make_module(model_config(), seed=5)
    state = {k: v.clone() for k, v in source.model.state_dict().items()}
    for key in state:
        if ".act." in key:  # make_module gives every model the same coefficients
            state[key] += 0.25
    model_dir = save_model_dcp(state, TrainConfig(model=source.config.model).to_yaml(), tmp_path / "imported")

    module, trainer = make_module(
        model_config(), seed=6, optimizer=OptimizerConfig(learning_rate=peak),
        scheduler=SchedulerConfig(t_warmup=warmup),
    )  # fmt: skip
    Checkpointer(work_dir=tmp_path / "work").load(model_dir, module)
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not module.optim.state  # nothing to load: AdamW starts from zero moments

    # No trainer state in the checkpoint: the trainer starts from step 0, its first step is 1.
    trainer.global_step, trainer.metrics = 1, {}
    module.train_batch(make_batch())
    module.optim_step()
    assert trainer.metrics[LR] == pytest.approx(peak / warmup, rel=1e-12)
    steps = {float(s["step"]) for s in module.optim.state.values()}
    assert steps == {1.0}


# ---- routing variants ----------------------------------------------------------------------------


def test_bias_update_after_the_step_and_resume_from_state_dict():
    """Auxiliary-loss-free balancing: after each optimizer step every layer's bias moves by
    rate * sign(mean - load) of the step's routed rows (all micro-batches); the bias rides in
    the state dict, not the optimizer, and a module loaded from it continues identically."""
    from moe_model.routing import update_expert_bias_

    config = model_config(moe_bias_update_rate=0.01, moe_first_dense_layers=1, n_layers=3)
    module, trainer = make_module(config)
    assert not any(b is p for b in module.model.buffers() for g in module.optim.param_groups
                   for p in g["params"])
    layers = module.model.moe_layers()
    assert len(layers) == 2 and config.moe_layer_ids == [1, 2]
    expected = [torch.zeros(4) for _ in layers]
    for step in (1, 2):
        trainer.global_step, trainer.metrics = step, {}
        module.zero_grads()
        module.train_batch(make_batch(seed=step))
        counts = [[trainer.metrics[f"{EXPERT_LOAD_PREFIX}layer{block}/expert{e}"] for e in range(4)]
                  for block in (1, 2)]
        module.optim_step()
        for want, load in zip(expected, counts):
            update_expert_bias_(want, torch.tensor(load), 0.01)
        for layer, want in zip(layers, expected):
            torch.testing.assert_close(layer.expert_bias_E, want, rtol=0, atol=1e-7)
    assert all(w.abs().max() > 0 for w in expected)
    assert {"blocks.1.ffn.expert_bias_E", "blocks.2.ffn.expert_bias_E"} <= set(
        module.state_dict()["model"])
    # Routing diagnostics: entropy, bias range, by block index.
    assert trainer.metrics["moe/layer2/BiasRange"] == pytest.approx(
        (expected[1].max() - expected[1].min()).item())
    assert 0 < trainer.metrics["moe/layer1/RouterEntropy"] < math.log(4)
    assert not any(k.startswith(("moe/layer0/", f"{EXPERT_LOAD_PREFIX}layer0/"))
                   for k in trainer.metrics)

    state = copy.deepcopy(module.state_dict())
    resumed, resumed_trainer = make_module(config, seed=9)
    resumed.load_state_dict(state)
    for t, m in ((trainer, module), (resumed_trainer, resumed)):
        t.global_step, t.metrics = 3, {}
        m.zero_grads()
        m.train_batch(make_batch(seed=3))
        m.optim_step()
    assert resumed_trainer.metrics[CE_LOSS] == trainer.metrics[CE_LOSS]
    for a, b in zip(module.model.moe_layers(), resumed.model.moe_layers()):
        assert torch.equal(a.expert_bias_E, b.expert_bias_E)


def test_routing_statistics_are_summed_over_micro_batches_and_recorded_every_step():
    """Dropped rows and router entropy: the sum (mean) over the step's micro-batches of what the
    model returns, recorded at every step whatever the console interval."""
    config = model_config(moe_capacity_factor=0.5)
    module, trainer = make_module(config, console_log_interval=2)
    for step in (1, 2):
        trainer.global_step, trainer.metrics = step, {}
        batch = make_batch(seed=step)
        with torch.no_grad():
            outs = [copy.deepcopy(module.model).train()(ids) for ids in batch["input_ids"].split(MICRO)]
        module.train_batch(batch)
        module.optim_step()
        recorded = {k for k in trainer.metrics if k.startswith(("moe_dropped/", "moe/"))}
        assert recorded == {f"moe_dropped/layer{i}" for i in (0, 1)} | {
            f"moe/layer{i}/RouterEntropy" for i in (0, 1)}
        dropped_L = sum(o.dropped_rows_L for o in outs)
        entropy_L = sum(o.router_entropy_L for o in outs) / len(outs)
        for i in (0, 1):
            assert trainer.metrics[f"moe_dropped/layer{i}"] == dropped_L[i].item()
            assert trainer.metrics[f"moe/layer{i}/RouterEntropy"] == pytest.approx(entropy_L[i].item(), rel=1e-6)
    # Capacity 0.5 of the even share: at least half of the rows go.
    routed = BATCH * SEQ * config.moe_top_k
    assert all(trainer.metrics[f"moe_dropped/layer{i}"] >= routed / 2 for i in (0, 1))


# ---- FSDP2: gradient sync once per step, fp32 coefficients under bf16 params ----------------

_SCRIPT = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import moe_model.activations as activations
    from olmo.config import load_config
    from olmo.parallelism import activation_modules_with_params
    from olmo.train_module import MoETrainModule, train_module_config

    CONFIG = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []


    def check(ok, message):
        if not ok:
            failures.append(f"rank {rank}: {message}")


    def build(*overrides):
        cfg = load_config(CONFIG, list(overrides))
        tm = MoETrainModule(cfg.model.build(init_device="meta"), train_module_config(cfg), torch.device("cpu"))
        # train_batch / optim_step read only these from olmo-core's Trainer.
        tm._trainer = SimpleNamespace(global_step=1, max_steps=8, record_metric=lambda *a, **k: None)
        return cfg, tm


    # Every rank draws the same global batch and trains on its own 8 sequences: 4 micro-batches.
    gen = torch.Generator().manual_seed(5)
    global_ids = torch.randint(0, 512, (8 * world, 32), generator=gen)
    batches = [{"input_ids": global_ids[8 * r : 8 * (r + 1)]} for r in range(world)]
    NUM_MICRO = 4

    # ---- gradient sync: one reduce-scatter per FSDP group per step -------------------------
    calls = {"n": 0, "depth": 0}


    def counted(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += calls["depth"] == 0  # an op calling another counts once
            calls["depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                calls["depth"] -= 1

        return wrapper


    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name)))

    grads, counts = {}, {}
    for every in (False, True):
        cfg, tm = build("--precision=fp32", f"--reduce_grads_every_microbatch={every}")
        calls["n"] = 0
        tm.train_batch(dict(batches[rank]))
        counts[every] = calls["n"]
        grads[every] = {n: p.grad.full_tensor() for n, p in tm.model.named_parameters()}
    # The LM head (in the root's FSDP unit) fused with its loss: the same gradients.
    cfg, tm = build("--precision=fp32", "--fused_lm_loss=true")
    tm.train_batch(dict(batches[rank]))
    grads["fused"] = {n: p.grad.full_tensor() for n, p in tm.model.named_parameters()}
    check(counts[False] > 0, "no reduce-scatter at all")
    check(
        counts[True] == NUM_MICRO * counts[False],
        f"reduce-scatters per step: {counts[False]} syncing on the last micro-batch only, "
        f"{counts[True]} syncing every one ({NUM_MICRO} micro-batches)",
    )

    # Reference: the same model whole, each rank's batch in turn, losses normalised as
    # train_batch does, gradients averaged over ranks as FSDP's reduce-scatter does.
    torch.manual_seed(cfg.seed)
    ref = cfg.model.build(init_device="meta")
    ref.to_empty(device="cpu")
    ref.init_weights()
    for batch in batches:
        ids = batch["input_ids"]
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)
        n_tokens = (labels != -100).sum()
        for ids_mb, labels_mb in zip(ids.chunk(NUM_MICRO), labels.chunk(NUM_MICRO)):
            out = ref(ids_mb)
            ce = F.cross_entropy(out.logits.flatten(0, 1), labels_mb.flatten(), reduction="sum")
            loss = ce / n_tokens + (out.lb_loss + out.z_loss) / NUM_MICRO
            (loss / world).backward()
    for name, p in ref.named_parameters():
        for every in (False, True, "fused"):
            try:
                torch.testing.assert_close(grads[every][name], p.grad, rtol=1e-5, atol=1e-7)
            except AssertionError as err:
                check(False, f"every={every} {name}: {str(err).splitlines()[-1]}")

    # ---- PolyNorm coefficients under bf16 params --------------------------------------------
    real_poly_norm = activations.poly_norm
    seen = []


    def spy(x, weight, bias, eps, backend="auto"):
        y = real_poly_norm(x, weight, bias, eps, backend)
        seen.append((x.dtype, y.dtype, weight.detach().clone(), bias.dtype))
        return y


    activations.poly_norm = spy
    for per_expert in (False, True):
        cfg, tm = build("--precision=bf16", f"--model.moe_activation_per_expert={per_expert}")
        seen.clear()
        tm.train_batch(dict(batches[rank]))
        tm.optim_step()
        sets = cfg.model.moe_num_experts if per_expert else 1
        check(len(seen) == NUM_MICRO * cfg.model.n_layers * sets, f"{len(seen)} activation calls")
        for x_dtype, y_dtype, weight, bias_dtype in seen:
            check(x_dtype == y_dtype == torch.bfloat16, f"activation in/out {x_dtype}, {y_dtype}")
            check(weight.dtype == bias_dtype == torch.float32, f"coefficients {weight.dtype}")
            # The fp32 init 1/3 exactly; bf16 would have made it 0.333984375.
            check(torch.equal(weight, torch.full((3,), 1 / 3)), f"coefficients {weight.tolist()}")
        acts = [m for block in tm.model.blocks for m in activation_modules_with_params(block)]
        check(len(acts) == cfg.model.n_layers * sets, f"{len(acts)} coefficient sets")
        for act in acts:
            weight = act.weight.full_tensor()
            check(weight.dtype == torch.float32, f"master {weight.dtype}")
            check(not torch.equal(weight, torch.full((3,), 1 / 3)), "coefficients did not train")
    activations.poly_norm = real_poly_norm

    dist.destroy_process_group()
    if failures:
        sys.exit("\\n".join(failures))
    print("ok")
    """
)


def test_fsdp_grad_sync_and_fp32_coefficients(tmp_path):
    """2 gloo ranks: the gradient is reduce-scattered once per step, not once per micro-batch,
    and equals the whole-model reference either way; under bf16 params the PolyNorm forward gets
    the exact fp32 coefficients (shared and per-expert sets) and they train."""
    script = tmp_path / "fsdp_train_module.py"
    script.write_text(_SCRIPT)
    # The repo first, then whatever the caller's path holds (carried wheels on a GPU machine).
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(script), TEST_CONFIG],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2


def run_ep_worker(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return run_worker("tests.olmo.ep_train_worker", nproc, *args)


@pytest.mark.parametrize(
    "nproc, args",
    [
        (2, ("2",)),
        pytest.param(4, ("2", "per_expert"), marks=pytest.mark.slow),
        pytest.param(2, ("2", "shared", "capacity"), marks=pytest.mark.slow),
        pytest.param(2, ("2", "aux_free"), marks=pytest.mark.slow),
    ],
    ids=["2 ranks ep2", "4 ranks ep2 x fsdp2, per-expert sets", "shared expert, capacity drops",
         "sigmoid, expert bias, global-batch balance loss"],
)  # fmt: skip
def test_expert_parallel_gradients_equal_plain_fsdp(nproc, args):
    """parallelize_model with expert parallelism against plain FSDP on the same tokens: initial
    weights, loss, expert load, every gradient (the sharded expert weights' included) and the
    clipped gradients with their global norm."""
    proc = run_ep_worker(nproc, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok") == nproc
