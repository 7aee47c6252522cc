"""End-to-end training on CPU: metrics, resume, and 1- vs 2-process equivalence (gloo + FSDP2)."""

import math

import pytest
import torch

from olmo import metric_names as names
from olmo.checkpoint_io import load_state_dict
from olmo.config import load_config
from tests.cpu_capability import INDUCTOR_CPU

from .helpers import (
    TEST_CONFIG,
    ce_losses,
    direct_accuracy,
    make_data,
    read_metrics,
    run_train,
    tiny_overrides,
)

# The default test command runs the straight runs' checks, exact resume and expert parallelism;
# the runs marked slow prove the same properties in other settings.
REQUIRED_KEYS = {
    "step", "tokens", names.CE_LOSS, names.LB_LOSS, names.Z_LOSS,
    names.LR, names.GRAD_NORM, "expert_load",
}
# olmo-core's speed monitor leaves out the first step and steps right after a checkpoint or an
# evaluation (their wall time is not training); every other step has them.
SPEED_KEYS = {names.TOKENS_PER_SECOND, names.MFU}


def tiny_test_lr(step: int) -> float:
    """tests/olmo/tiny_test.yaml's schedule written out: peak 3e-3, linear warm-up over 2 steps,
    cosine to 0.1 x peak at step 8."""
    peak, final = 3.0e-3, 3.0e-4
    if step < 2:
        return peak * step / 2
    return final + (peak - final) * (1 + math.cos(math.pi * (step - 2) / 6)) / 2


def _train(tmp_path, name, nproc=1, output=None, **extra):
    """Train; the process's stdout and stderr are appended to the list `output` when given."""
    data = make_data(tmp_path)
    save = tmp_path / name
    proc = run_train([TEST_CONFIG, *tiny_overrides(save, data, **extra)], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if output is not None:
        output.append(proc.stdout + proc.stderr)
    return save


def _final_weights(save, step):
    return load_state_dict(save / f"step{step}")


def _train_on_one_and_two_ranks(tmp_path, name, **extra):
    """Train ``name`` in 1 process and on 2 FSDP ranks: the first steps' losses agree to fp32
    rounding and the loss falls; returns the 2-rank run's save folder."""
    runs = {n: _train(tmp_path / f"{name}{n}", name, nproc=n, **extra) for n in (1, 2)}
    one, two = ce_losses(runs[1]), ce_losses(runs[2])
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 9))
    for (step, a), (_, b) in zip(one[:2], two[:2]):
        assert a == pytest.approx(b, rel=2e-5), f"step {step}: {a} vs {b}"
    assert one[-1][1] < one[0][1] - 0.3
    return runs[2]


def test_metrics_file_has_the_keys_and_loss_falls(straight_runs):
    records = read_metrics(straight_runs[1])
    train = [r for r in records if names.CE_LOSS in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for record in train:
        missing = REQUIRED_KEYS - record.keys()
        assert not missing, f"step {record['step']} lacks {missing}"
        for key in REQUIRED_KEYS - {"expert_load"}:
            assert math.isfinite(record[key]), (key, record[key])
        # 2 MoE layers x 4 experts, fractions summing to 1.
        assert len(record["expert_load"]) == 2
        assert all(abs(sum(row) - 1) < 1e-4 and len(row) == 4 for row in record["expert_load"])
        # Load balancing is weighted 0.01 and equals its weight at perfect balance.
        assert 0.01 <= record[names.LB_LOSS] < 0.02
    timed = [r for r in train if SPEED_KEYS <= r.keys()]
    assert {r["step"] for r in timed} >= {2, 3, 6, 7}
    assert train[-1][names.CE_LOSS] < train[0][names.CE_LOSS] - 0.3
    assert train[0]["tokens"] == 8 * 32
    for record in train:
        assert record[names.LR] == pytest.approx(tiny_test_lr(record["step"]), rel=1e-6)
    assert train[0][names.LR] == pytest.approx(1.5e-3, rel=1e-6)  # half-way up the warm-up
    assert train[-1][names.LR] == pytest.approx(3.0e-4, rel=1e-6)  # final = 0.1 x peak
    evals = [r for r in records if names.eval_loss("val") in r]
    assert {r["step"] for r in evals} == {4, 8}
    # Checkpoints and the resolved config are in the save folder.
    assert (straight_runs[1] / "step8" / "model_and_optim" / ".metadata").is_file()
    data = straight_runs[1].parent / "data"
    resolved = load_config(TEST_CONFIG, tiny_overrides(straight_runs[1], data))
    assert load_config(straight_runs[1] / "config.yaml").to_dict() == resolved.to_dict()


def test_two_processes_match_one(straight_runs):
    one, two = ce_losses(straight_runs[1]), ce_losses(straight_runs[2])
    assert [s for s, _ in one] == [s for s, _ in two]
    # Summation order differs (gradient reduce-scatter vs one process), so losses agree to fp32
    # rounding at first. After a few AdamW updates, entries whose gradient is ~0 can take a
    # step of either sign (Adam normalises magnitude away) and near-tied top-k choices flip,
    # so later steps drift slightly (measured: at most 6e-4 relative over 8 steps).
    for (step, a), (_, b) in zip(one[:2], two[:2]):
        assert a == pytest.approx(b, rel=2e-5), f"step {step}: {a} vs {b}"
    for (step, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=2e-3), f"step {step}: {a} vs {b}"


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_continues_exactly(tmp_path, straight_runs, nproc):
    save = _train(tmp_path, "split", nproc=nproc, stop_at=4)
    assert ce_losses(save)[-1][0] == 4
    save = _train(tmp_path, "split", nproc=nproc)  # same save_folder: resumes from step4
    assert ce_losses(save) == ce_losses(straight_runs[nproc]), "per-step losses differ after resume"
    resumed, straight = _final_weights(save, 8), _final_weights(straight_runs[nproc], 8)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


@pytest.mark.slow
def test_activation_checkpointing_and_wandb_offline(tmp_path, straight_runs):
    # Recomputing blocks in backward must not change the numbers; W&B logs offline, no key.
    save = _train(tmp_path, "ac", activation_checkpointing="true", **{"wandb.mode": "offline"})
    ac, plain = ce_losses(save), ce_losses(straight_runs[1])
    assert [s for s, _ in ac] == [s for s, _ in plain]
    assert [loss for _, loss in ac] == pytest.approx([loss for _, loss in plain], rel=1e-6)
    runs = list((save / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), list((save / "wandb").iterdir())


def test_rerunning_a_finished_run_is_a_no_op(straight_runs):
    save = straight_runs[1]
    before = ce_losses(save)
    data = save.parent / "data"
    proc = run_train([TEST_CONFIG, *tiny_overrides(save, data)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only a checkpoint-load timing line may be added; no training step runs again.
    assert ce_losses(save) == before
    assert max(r["step"] for r in read_metrics(save)) == 8


@pytest.mark.slow
@INDUCTOR_CPU
def test_compiled_blocks_match_eager(tmp_path, straight_runs):
    # torch.compile of each block (inductor on CPU) computes the same step.
    save = _train(tmp_path, "compiled", compile="true")
    compiled, plain = ce_losses(save), ce_losses(straight_runs[1])
    assert [s for s, _ in compiled] == [s for s, _ in plain]
    # Fused kernels reorder fp32 sums; the first steps agree to rounding.
    assert [loss for _, loss in compiled[:3]] == pytest.approx([loss for _, loss in plain[:3]], rel=1e-4)


@pytest.mark.slow
def test_in_loop_downstream_accuracy_and_mfu(tmp_path):
    # Downstream tasks need the OLMo tokenizer's vocabulary; the synthetic ids fit inside it.
    # A stated peak FLOP/s makes MFU a known function of the measured tokens per second.
    peak = 1e12
    save = _train(tmp_path, "downstream", max_duration=4, downstream_tasks="[arc_easy,piqa]",
                  downstream_limit=6, device_peak_flops=peak,
                  **{"model.vocab_size": 50280, "model.embedding_size": 50304,
                     "data.eos_token_id": 50279})
    records = [r for r in read_metrics(save) if names.downstream_accuracy("piqa") in r]
    assert [r["step"] for r in records] == [4]
    # The step-4 checkpoint holds the weights the in-loop evaluation scored.
    from olmo.checkpoint_io import load_checkpoint

    model, cfg = load_checkpoint(save)
    for task in ("arc_easy", "piqa"):
        assert records[0][names.downstream_instances(task)] == 6
        assert records[0][names.downstream_accuracy(task)] == direct_accuracy(model, task, 6), task

    flops_per_token = cfg.model.num_flops_per_token(cfg.model.max_sequence_length)
    timed = [r for r in read_metrics(save) if SPEED_KEYS <= r.keys()]
    assert timed
    for r in timed:
        want = 100 * r[names.TOKENS_PER_SECOND] * flops_per_token / peak
        assert r[names.MFU] == pytest.approx(want, rel=1e-6), r["step"]


@pytest.mark.slow
def test_per_expert_coefficients_train_under_fsdp(tmp_path):
    """One PolyNorm set per expert: 2 FSDP ranks match 1 process, and the sets drift apart."""
    save = _train_on_one_and_two_ranks(tmp_path, "per_expert",
                                       **{"model.moe_activation_per_expert": "true"})
    weights = _final_weights(save, 8)
    sets = [weights[f"blocks.0.ffn.act.{e}.weight"] for e in range(4)]
    assert all(torch.isfinite(w).all() for w in sets)
    # Trained separately from the same init: no two experts end with the same coefficients.
    assert len({tuple(w.tolist()) for w in sets}) == 4


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["polynorm_glu", "polyrelu_glu"])
def test_gated_poly_trains_on_two_fsdp_ranks_like_one(tmp_path, activation):
    """The gated forms through the trainer (FSDP2, gloo): 2 ranks match 1 process, the loss
    falls, and the layer's coefficient set trains (it leaves its 1/3 init)."""
    extra = {"model.activation_type": activation, "model.mlp_hidden_size": 32}
    weights = _final_weights(_train_on_one_and_two_ranks(tmp_path, activation, **extra), 8)
    assert weights["blocks.0.ffn.w_in_EDH"].shape[-1] == 64  # [gate | up], 2 x 32
    coeffs = weights["blocks.0.ffn.act.weight"]
    assert torch.isfinite(coeffs).all() and not torch.allclose(coeffs, torch.full((3,), 1 / 3))


# DeepSeek-V3's recipe, shrunk: a dense first block, a shared expert, sigmoid routing with
# auxiliary-loss-free bias balancing and a global-batch balance loss; plus token dropping.
ROUTING_VARIANTS = {
    "model.n_layers": 3, "model.moe_first_dense_layers": 1, "model.moe_shared_experts": 1,
    "model.moe_router_score": "sigmoid", "model.moe_renormalize": "true",
    "model.moe_zloss_weight": 0, "model.moe_bias_update_rate": 0.01,
    "model.moe_lb_granularity": "global_batch", "model.moe_capacity_factor": 1.0,
}


@pytest.mark.slow
def test_routing_variants_resume_exactly_on_two_ranks(tmp_path):
    """Trained on 2 FSDP ranks, stopped at step 4 and resumed: the per-step losses and the final
    weights, expert biases included, are the uninterrupted run's; the routing diagnostics are in
    metrics.jsonl, by block index."""
    straight = _train(tmp_path, "straight", nproc=2, **ROUTING_VARIANTS)
    _train(tmp_path, "split", nproc=2, stop_at=4, **ROUTING_VARIANTS)
    split = _train(tmp_path, "split", nproc=2, **ROUTING_VARIANTS)
    assert ce_losses(split) == ce_losses(straight)
    resumed, uninterrupted = _final_weights(split, 8), _final_weights(straight, 8)
    assert {"blocks.1.ffn.expert_bias_E", "blocks.2.ffn.expert_bias_E"} <= resumed.keys()
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    bias = uninterrupted["blocks.1.ffn.expert_bias_E"]
    # 8 steps of +-0.01 (or 0): every entry a multiple of the rate, and some moved.
    assert bias.abs().max() > 0
    torch.testing.assert_close(bias / 0.01, (bias / 0.01).round(), rtol=0, atol=1e-4)
    for record in (r for r in read_metrics(straight) if names.CE_LOSS in r):
        assert record["expert_load_layers"] == [1, 2]
        for layer in (1, 2):
            assert 0 < record[names.layer_dropped_fraction(layer)] < 1
            assert 0 < record[names.layer_router_entropy(layer)] <= math.log(4)
            assert record[names.layer_bias_range(layer)] <= 2 * 0.01 * record["step"] + 1e-6
        assert names.layer_max_load(0) not in record


def fsdp_bf16_steps_match_cpu_fp32(tmp_path, device: str):
    """Steps of the tiny run in bf16 through torchrun on ``device`` (one process: FSDP2 on a GPU,
    bf16 autocast on CPU) against the fp32 CPU run of the same init and data."""
    data = make_data(tmp_path)
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    proc = run_train([TEST_CONFIG, *tiny_overrides(bf16, data, precision="bf16", max_duration=4)],
                     torchrun=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"1 process(es) on {device}, precision torch.bfloat16" in proc.stdout + proc.stderr
    cpu = run_train([TEST_CONFIG, *tiny_overrides(fp32, data, max_duration=1)],
                    env={"CUDA_VISIBLE_DEVICES": ""})
    assert cpu.returncode == 0, cpu.stdout[-3000:] + cpu.stderr[-3000:]
    losses = ce_losses(bf16)
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss in losses)
    # Step 1 runs the initial weights, which are drawn on the CPU whatever the device: the bf16
    # forward sees what the fp32 one does, to bf16 rounding.
    assert losses[0][1] == pytest.approx(ce_losses(fp32)[0][1], rel=1e-2)
    assert losses[-1][1] < losses[0][1]
    weights = _final_weights(bf16, 4)
    for layer in range(2):
        coefficients = weights[f"blocks.{layer}.ffn.act.weight"]
        assert coefficients.dtype == torch.float32
        assert not torch.equal(coefficients, torch.full((3,), 1 / 3)), "coefficients did not train"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_bf16_steps_on_gpu(tmp_path):
    """FSDP2 with bf16 params, fp32 reduction and fp32 PolyNorm coefficients on one GPU; 4
    micro-batches per step, gradients reduce-scattered after the last."""
    fsdp_bf16_steps_match_cpu_fp32(tmp_path, "cuda:0")


# --- a data mixture with document masking --------------------------------------------------------


def _mix_overrides(data) -> dict:
    """Two sources (web 75%, code 25% upsampled from a small file) with a validation set of
    code's own, and attention kept inside documents (EOS 511 every 13th token of both)."""
    import numpy as np

    from .helpers import write_token_file

    for name, tokens, seed in (("web-0.npy", 20_000, 0), ("code-0.npy", 3_000, 2)):
        path = write_token_file(data / name, tokens, seed=seed)
        mm = np.memmap(path, dtype=np.uint16, mode="r+")
        mm[::13] = 511
        mm.flush()
        del mm
    return {
        "data.paths": "[]",
        "data.sources.web.paths": f"[{data}/web-*.npy]",
        "data.sources.web.fraction": 0.75,
        "data.sources.code.paths": f"[{data}/code-*.npy]",
        "data.sources.code.fraction": 0.25,
        "data.sources.code.max_repetition": 2,
        "data.sources.code.validation": f"[{data}/val-*.npy]",
        "model.document_masking": "true",
    }


def _source_series(save) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("source/")}
            for r in read_metrics(save) if names.CE_LOSS in r}


@pytest.mark.slow
def test_mixture_trains_logs_per_source_and_resumes_exactly(tmp_path):
    data = make_data(tmp_path)
    extra = _mix_overrides(data)
    output: list[str] = []
    runs = {n: _train(tmp_path / f"p{n}", "mix", nproc=n, output=output, **extra) for n in (1, 2)}
    # The realised mix and the run's repetition are in the training log, once per run (rank 0).
    for text in output:
        assert text.count("data mixture: 2 sources, 744 sequences x 32 = 23,808 tokens per pass") == 1
        assert "run: 2,048 tokens = 0.086 passes over the mix" in text
    series = _source_series(runs[1])
    assert sorted(series) == list(range(1, 9))
    seen = {"web": 0, "code": 0}
    for _, metrics in sorted(series.items()):
        # 8 sequences of 32 tokens per step, every one from exactly one source.
        assert metrics[names.source_tokens("web")] + metrics[names.source_tokens("code")] == 8 * 32
        for name in seen:
            seen[name] += metrics[names.source_tokens(name)]
            assert metrics[names.source_tokens_seen(name)] == seen[name]
            if metrics[names.source_tokens(name)]:
                assert math.isfinite(metrics[names.source_loss(name)])
    # The same global batches on 2 ranks: per-source counts are sums over the ranks.
    two = _source_series(runs[2])
    for step in series:
        for name in seen:
            assert two[step][names.source_tokens(name)] == series[step][names.source_tokens(name)]
    evals = [r for r in read_metrics(runs[1]) if names.eval_loss("code") in r]
    assert {r["step"] for r in evals} == {4, 8}

    # The realised mix is in the checkpoint: code binds, its 3,000 // 32 = 93 sequences twice
    # over at 25% -> 744 sequences per pass (a multiple of the 8-sequence batch).
    state = torch.load(runs[1] / "step8" / "train" / "rank0.pt", weights_only=False)
    mixture = state["data_loader"]["mixture"]
    assert {n: m["sequences"] for n, m in mixture.items()} == {"web": 558, "code": 186}
    assert mixture["code"]["repetition"] == 2.0

    # Stopped at step 4 and resumed: the same batches, so the same losses and token counts.
    save = _train(tmp_path / "split", "mix", stop_at=4, **extra)
    save = _train(tmp_path / "split", "mix", **extra)
    assert ce_losses(save) == ce_losses(runs[1])
    assert _source_series(save) == series


EP = "parallel.expert_parallel_degree"


# The step's losses and routing that expert parallelism must not change: the auxiliary losses and
# the load come from the global quantities, as without it.
MATCHED_LOSSES = (names.CE_LOSS, names.LB_LOSS, names.Z_LOSS)
ROWS_PER_STEP = 8 * 32 * 2  # tiny_test.yaml: 8 sequences x 32 tokens x top-2, per layer


def _series(save, key) -> dict[int, object]:
    return {m["step"]: m[key] for m in read_metrics(save) if names.CE_LOSS in m}


def _assert_steps_match(got, want, first_tol=1e-5, later_tol=2e-3):
    """The runs saved in ``got`` and ``want`` agree at every step ``got`` trained: each of
    MATCHED_LOSSES to fp32 rounding (``first_tol``) in its first two steps, then within
    test_two_processes_match_one's tolerance (later steps drift through near-zero Adam updates
    and near-tied top-k choices); the per-expert load identical in the first two steps, then
    within two rows per expert (a flipped near-tie moves one row between two experts)."""
    for key in (*MATCHED_LOSSES, "expert_load"):
        ours, theirs = _series(got, key), _series(want, key)
        steps = sorted(ours)
        assert steps and set(steps) <= set(theirs), (key, steps, sorted(theirs))
        for i, step in enumerate(steps):
            a, b = ours[step], theirs[step]
            if key == "expert_load":
                if i < 2:
                    assert a == b, f"step {step}: {a} vs {b}"
                else:
                    flat_a, flat_b = sum(a, []), sum(b, [])  # layers x experts, one list
                    assert flat_a == pytest.approx(flat_b, abs=2 / ROWS_PER_STEP), (
                        f"step {step}: {a} vs {b}"
                    )
            else:
                tol = first_tol if i < 2 else later_tol
                assert a == pytest.approx(b, rel=tol), f"{key} step {step}: {a} vs {b}"


@pytest.mark.slow
def test_expert_parallel_trains_like_fsdp_and_resumes_with_plain_fsdp(tmp_path, straight_runs):
    """2 processes: steps 1-4 with expert parallelism (2 experts per rank), then a resume from
    its step-4 checkpoint without (DCP gathers the experts back), against plain FSDP on the same
    data throughout."""
    save = _train(tmp_path, "ep", nproc=2, stop_at=4, **{EP: 2})
    # The checkpoint holds whole-model tensors whatever the degree that wrote it.
    ours, plain = _final_weights(save, 4), _final_weights(straight_runs[2], 4)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in plain.items()}
    for key in plain:
        torch.testing.assert_close(ours[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)
    save = _train(tmp_path, "ep", nproc=2, **{EP: 1})
    _assert_steps_match(save, straight_runs[2])


@pytest.mark.slow
def test_plain_fsdp_checkpoint_resumes_with_expert_parallelism(tmp_path, straight_runs):
    """2 processes: plain FSDP's step-4 checkpoint loaded with expert parallelism (DCP gives each
    rank its experts); steps 5-8 continue plain FSDP's losses."""
    save = _train(tmp_path, "ep", nproc=2, load_path=straight_runs[2] / "step4", **{EP: 2})
    assert [s for s, _ in ce_losses(save)] == [5, 6, 7, 8]
    _assert_steps_match(save, straight_runs[2])


@pytest.fixture(scope="module")
def plain_four(tmp_path_factory):
    """Plain FSDP (ep=1) over 4 processes, built as straight_runs' runs are."""
    return _train(tmp_path_factory.mktemp("straight"), "straight4", nproc=4)


@pytest.mark.slow
def test_expert_parallel_with_fsdp_over_four_processes(tmp_path, plain_four):
    """4 processes, two EP groups of 2 (each rank holds 1 of the 4 experts of a layer): at every
    step the cross-entropy, balance and z-losses and expert load of plain FSDP over 4 processes
    (not 2: the balance loss is taken per micro-batch, and 2 processes split the batch into
    other micro-batches than 4 do)."""
    save = _train(tmp_path, "ep4", nproc=4, **{EP: 2})
    assert [s for s, _ in ce_losses(save)] == list(range(1, 9))
    _assert_steps_match(save, plain_four)
