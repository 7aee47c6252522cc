"""The planner (olmo/plan*.py, scripts/plan.py): its memory peak against the same step measured
on real tensors, its roofline arithmetic, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from olmo.config import load_config
from olmo.gpus import GPUS, gpu_spec
from olmo.plan_memory import BREAKDOWN_KEYS, simulate_step
from olmo.plan_speed import all_to_all_bytes, communication_bytes, roofline
from tests.olmo.helpers import run_worker

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
PLAN = str(REPO / "scripts" / "plan.py")

# bf16 on CPU: grouped_mm's fake-tensor rule takes bf16 only (as its CUDA kernel does); the
# fused PolyNorm backend saves what the GPU's Triton kernels save.
COMMON = [
    "--precision=bf16",
    "--model.activation_backend=fused",
    "--global_train_batch_size=8",
    "--device_train_microbatch_size=2",
    "--model.max_sequence_length=64",
]
SHAPES = {
    "tiny": [],
    "medium": [
        "--model.d_model=256", "--model.n_heads=4", "--model.max_sequence_length=128",
        "--model.mlp_hidden_size=512", "--model.moe_num_experts=16", "--model.moe_top_k=4",
    ],
}  # fmt: skip
# The default test command plans the tiny shape; medium (slow) checks the same bar at larger sizes.
SHAPE_PARAMS = ["tiny", pytest.param("medium", marks=pytest.mark.slow)]
TOLERANCE = 0.10
"""The issue's bar: the plan's peak within 10% of the measured one."""


PERSISTENT = ("params_sharded", "optimizer_state", "buffers", "inputs")
"""Categories that live through the whole step: the same tensors in both runs."""


def _assert_same_memory(plan, measured: dict, *, transient_each: bool) -> None:
    """The plan's peak within 10% of the measured one, and its breakdown: every persistent
    category within 10%; the transient ones (activations, temporaries, gradients, communication
    buffers) each within 10% when ``transient_each``, else in sum. (Over gloo the two runs can
    peak at neighbouring ops of the last backward, and a real collective's buffers are not the
    fake backend's: the tracker names a tensor by where it was made.)"""
    peak = measured["peak_bytes"]
    assert abs(plan.peak_bytes - peak) <= TOLERANCE * peak, (plan.peak_bytes, peak)
    transient = [k for k in BREAKDOWN_KEYS if k not in PERSISTENT]
    groups = [[k] for k in PERSISTENT] + (
        [[k] for k in transient] if transient_each else [transient]
    )
    for keys in groups:
        want = sum(measured["breakdown"][k] for k in keys)
        got = sum(plan.breakdown[k] for k in keys)
        # Within 10% of itself (or of 1% of the peak for near-empty ones).
        assert abs(got - want) <= TOLERANCE * max(want, 0.01 * peak), (keys, got, want)
    assert plan.micro_batches == measured["micro_batches"]
    assert plan.sharded == measured["sharded"]


def _plan_against_one_rank(overrides: list[str]):
    """The plan of ``overrides`` on one process against the same step on real tensors (every
    micro-batch of it: the plan runs the first, second and last), checked; returns both."""
    measured = simulate_step(load_config(TINY, overrides), 1, fake=False,
                             planned_device_type="cpu", all_micro_batches=True)  # fmt: skip
    plan = simulate_step(load_config(TINY, overrides), 1, fake=True, planned_device_type="cpu")
    _assert_same_memory(plan, asdict(measured), transient_each=True)
    return plan, measured


def _plan_against_two_gloo_ranks(tmp_path, overrides: list[str]):
    """The plan of ``overrides`` on 2 processes against the same step on 2 gloo ranks
    (tests/olmo/plan_worker.py), checked; returns the plan."""
    out = tmp_path / "measured.json"
    result = run_worker("tests.olmo.plan_worker", 2, str(out), TINY, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = simulate_step(load_config(TINY, overrides), 2, fake=True, planned_device_type="cpu")
    _assert_same_memory(plan, json.loads(out.read_text()), transient_each=False)
    return plan


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_plan_peak_matches_real_step_on_one_rank(shape):
    # The real step runs all 4 micro-batches; the plan 3 (first, second, last): the peak and
    # breakdown must agree all the same.
    plan, measured = _plan_against_one_rank(COMMON + SHAPES[shape])
    assert (measured.simulated_micro_batches, plan.simulated_micro_batches) == (4, 3)
    assert measured.peak_bytes > 0 and not plan.sharded


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_peak_matches_real_step_on_two_gloo_ranks(tmp_path, shape):
    plan = _plan_against_two_gloo_ranks(tmp_path, COMMON + SHAPES[shape])
    assert plan.sharded
    # Once-per-step reduction keeps unsharded fp32 gradient accumulators between micro-batches.
    assert plan.breakdown["grads_unsharded"] > 0 or plan.micro_batches == 1


def test_per_expert_sets_plan_matches_real_step():
    """Per-expert activation sets split rows by host counts: planned, like the real step it is
    checked against, with balanced routing, whose counts follow from the shapes."""
    plan, _ = _plan_against_one_rank(COMMON + ["--model.moe_activation_per_expert=true"])
    assert any(n.startswith("per-expert activation sets planned with") for n in plan.notes)


def test_document_masking_plan_matches_real_step():
    """Document masking: the planned batch marks documents as the loaders do (a boolean mask per
    sequence for sdpa on CPU)."""
    _plan_against_one_rank(COMMON + ["--model.document_masking=true"])


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_expert_parallel_plan_matches_real_step_on_two_gloo_ranks(tmp_path, shape):
    """EP degree 2 over 2 ranks (each holds half the experts; rows travel by all-to-all): the
    plan, whose split sizes follow from balanced routing on fake tensors, against the same
    balanced step on real tensors and real gloo all-to-alls."""
    overrides = COMMON + SHAPES[shape] + ["--parallel.expert_parallel_degree=2"]
    plan = _plan_against_two_gloo_ranks(tmp_path, overrides)
    assert any(n.startswith("expert parallelism planned with balanced routing") for n in plan.notes)
    # Each rank holds half the experts whole, as many bytes as FSDP's half of every expert:
    # nothing is replicated.
    fsdp = simulate_step(load_config(TINY, COMMON + SHAPES[shape]), 2, fake=True,
                         planned_device_type="cpu")  # fmt: skip
    assert plan.breakdown["params_sharded"] == fsdp.breakdown["params_sharded"]


def test_compiled_plan_runs_compiled_blocks():
    """The default tier's compile check (the comparison with a real compiled step is slow): the
    plan of a compile=true step runs its blocks compiled by dynamo, and says how."""
    from torch._dynamo.utils import counters

    counters.clear()
    plan = simulate_step(load_config(TINY, COMMON + ["--compile=true"]), 2)
    assert counters["stats"]["unique_graphs"] >= 1, "the plan did not compile its blocks"
    assert any("aot_eager_decomp_partition" in n for n in plan.notes)


@pytest.mark.slow
def test_compiled_plan_matches_real_compiled_step():
    """compile=true: every block compiled (PLAN_COMPILE_BACKEND: Inductor's graphs, decompositions
    and partitioner), on fake tensors against the same compiled step on real tensors. Long
    sequences and the fused loss put the peak in a block's backward, where what the compiled
    blocks saved decides it."""
    from torch._dynamo.utils import counters

    overrides = COMMON + [
        "--model.max_sequence_length=512", "--device_train_microbatch_size=4",
        "--fused_lm_loss=true", "--compile=true",
    ]  # fmt: skip
    counters.clear()
    plan, _ = _plan_against_one_rank(overrides)
    # torch._dynamo.reset() (a fresh cache per compiled simulation) keeps the counters: both
    # the real step and the plan compiled their blocks.
    assert counters["stats"]["unique_graphs"] >= 2, "the steps did not compile"
    assert plan.moment.phase == "backward" and ".blocks." in plan.moment.module, plan.moment
    assert any("aot_eager_decomp_partition" in n for n in plan.notes)


def test_communication_bytes_count_gathers_and_reductions():
    cfg = load_config(TINY, COMMON)
    params = cfg.model.num_params()
    # 8 sequences over 4 ranks in micro-batches of 2: one micro-batch each.
    once = communication_bytes(cfg, 4, micro=1)
    assert once == pytest.approx((2 * 2 + 4) * params * 3 / 4)
    cfg.reduce_grads_every_microbatch = True
    assert communication_bytes(cfg, 4, micro=3) == pytest.approx(
        (3 * 2 * 2 + 3 * 4) * params * 3 / 4
    )
    assert communication_bytes(cfg, 1, micro=3) == 0


def test_expert_parallel_communication_gathers_only_a_ranks_experts():
    cfg = load_config(TINY, COMMON + ["--parallel.expert_parallel_degree=2"])
    m = cfg.model
    experts = len(m.moe_layer_ids) * m.moe_num_experts * m.d_model * (m.mlp_in_size + m.mlp_hidden_size)
    others = m.num_params() - experts
    # 4 ranks in 2 EP groups: the other parameters gathered over 4 ranks, a rank's half of the
    # experts over the 2 ranks holding the same half; bf16 gathers (2 per micro-batch), one fp32
    # reduction per step.
    assert communication_bytes(cfg, 4, micro=1) == pytest.approx(
        (2 * 2 + 4) * (others * 3 / 4 + experts / 2 * 1 / 2)
    )
    # Row exchanges: out and back in forward, both again in backward; half the rows leave.
    tokens = 1000
    rows_bytes = len(m.moe_layer_ids) * tokens * m.moe_top_k * m.d_model * 2 / 2
    assert all_to_all_bytes(cfg, tokens) == pytest.approx(4 * rows_bytes)
    # The layers wait for their rows: the exchanges add to the compute time, over NVLink.
    gpu = gpu_spec("h100")
    with_ep = roofline(cfg, 4, gpu)
    cfg.activation_checkpointing = "moe"  # the recomputed forward exchanges its rows again
    assert all_to_all_bytes(cfg, tokens) == pytest.approx(6 * rows_bytes)
    cfg.activation_checkpointing = False
    cfg.parallel.expert_parallel_degree = 1
    assert all_to_all_bytes(cfg, tokens) == 0
    exchange = with_ep.work["all_to_all"].bytes / gpu.nvlink_bytes_per_s
    assert with_ep.compute_seconds == pytest.approx(roofline(cfg, 4, gpu).compute_seconds + exchange)


def test_roofline_expert_flops_and_mfu_bound():
    cfg = load_config(TINY, COMMON)
    gpu = gpu_spec("h100")
    speed = roofline(cfg, 2, gpu)
    m = cfg.model
    tokens = 4 * m.max_sequence_length  # 8 sequences over 2 ranks
    # forward 2 flops per multiply-add, backward twice the forward: 6 x rows x D x (H_in + H).
    rows = tokens * m.moe_top_k * len(m.moe_layer_ids)
    expected = 6 * rows * m.d_model * (m.mlp_in_size + m.mlp_hidden_size)
    assert speed.work["expert_gemm"].flops == pytest.approx(expected)
    assert 0 < speed.mfu < 1
    assert speed.step_seconds >= speed.compute_seconds
    assert speed.tokens_per_second == pytest.approx(
        cfg.global_train_batch_size * m.max_sequence_length / speed.step_seconds
    )


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, PLAN, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_unknown_gpu_is_one_line_with_did_you_mean():
    result = _plan_cli(TINY, "--gpus", "2", "--gpu", "h10")
    assert result.returncode == 2
    assert result.stderr == (
        f"error: --gpu 'h10' is unknown; did you mean 'h100'? known GPUs: {', '.join(GPUS)}\n"
    )


@pytest.mark.slow
def test_gpus_not_divisible_by_expert_parallel_degree():
    result = _plan_cli(TINY, "--gpus", "3", "--gpu", "h100", "--parallel.expert_parallel_degree=2")
    assert result.returncode == 2
    assert result.stderr == (
        "error: parallel.expert_parallel_degree=2 must divide the number of processes (3)\n"
    )


@pytest.mark.slow
def test_config_that_cannot_be_built():
    result = _plan_cli(TINY, "--gpus", "2", "--gpu", "h100", "--model.n_heads=3")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "n_heads" in result.stderr


def test_cli_writes_json_with_the_documented_keys(tmp_path):
    out = tmp_path / "plan.json"
    result = _plan_cli(TINY, "--gpus", "2", "--gpu", "a100-80gb", "--json", str(out), *COMMON)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(out.read_text())
    assert plan["gpus"] == 2 and plan["gpu"] == "a100-80gb"
    assert plan["gpu_memory_bytes"] == GPUS["a100-80gb"].memory_bytes
    assert plan["fits"] is True
    assert set(plan["breakdown"]) == set(BREAKDOWN_KEYS)
    assert sum(plan["breakdown"].values()) == plan["peak_bytes_per_rank"]
    assert "fits" in result.stdout and "estimate" in result.stdout


def test_plan_forced_balance_sets_the_flag_training_refuses():
    from olmo.plan_memory import force_balance

    cfg = load_config(TINY, [])
    planned = force_balance(cfg)
    assert planned.model.moe_force_balance and not cfg.model.moe_force_balance
    assert planned.model.moe_layer_config().force_balance


def test_preflight_stops_a_gpu_run_that_does_not_fit_naming_term_and_fix():
    from moe_model.errors import LaunchError
    from olmo.launcher import check_memory_plan

    # 4096 sequences in one micro-batch on one GPU: the fake step costs no memory here, the
    # plan hundreds of GiB (logits alone: 4096 x 64 x 50304 fp32).
    huge = ["--global_train_batch_size=4096", "--device_train_microbatch_size=4096"]
    cfg = load_config(TINY, COMMON + huge)
    with pytest.raises(LaunchError) as err:
        check_memory_plan(cfg, 1, "NVIDIA H100 80GB HBM3")
    message = str(err.value)
    assert "\n" not in message
    assert "1 x h100" in message and "does NOT fit; biggest term" in message
    assert "device_train_microbatch_size" in message and "--plan_preflight=false" in message


def test_launcher_plans_only_gpu_runs(monkeypatch):
    import olmo.launch
    import olmo.launcher

    planned = []
    monkeypatch.setattr(olmo.launcher, "check_memory_plan", lambda *a: planned.append(a) or [])
    monkeypatch.setattr(olmo.launcher, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr("torch.distributed.run.main", lambda argv: None)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    for device, calls in (("cpu", 0), ("cuda", 1)):
        monkeypatch.setattr(olmo.launch, "training_device_type", lambda d=device: d)
        olmo.launcher.main([TINY, "--save_folder=/tmp/plan-launcher-test", *COMMON])
        assert len(planned) == calls
    assert planned[0][1:] == (2, "NVIDIA H100 80GB HBM3")


def test_fused_lm_loss_plan_drops_the_logits():
    """fused_lm_loss: the plan's saved activations lose the micro-batch's logits (bf16, kept by
    the output until backward) and their fp32 log-softmax, and the peak falls."""
    plans = {
        fused: simulate_step(load_config(TINY, [*COMMON, f"--fused_lm_loss={fused}"]), 1,
                             fake=True, planned_device_type="cpu")
        for fused in (False, True)
    }  # fmt: skip
    cfg = load_config(TINY, COMMON)
    tokens = cfg.device_train_microbatch_size * cfg.model.max_sequence_length
    logits_bytes = tokens * cfg.model.embedding_size * (2 + 4)
    dropped = plans[False].breakdown["activations"] - plans[True].breakdown["activations"]
    # Measured: 38,632,960 of 38,633,472 bytes (a few small saved tensors differ).
    assert dropped >= 0.99 * logits_bytes, (dropped, logits_bytes)
    assert plans[True].peak_bytes < plans[False].peak_bytes


def test_auto_gradient_reduction_is_decided_by_the_plan(monkeypatch):
    """reduce_grads_every_microbatch=auto: once per step where that plan fits, else every
    micro-batch; the two real plans differ by the unsharded fp32 accumulators."""
    import olmo.plan as plan_lib
    from olmo.gpus import GpuSpec

    memory = {
        every: simulate_step(load_config(TINY, [*COMMON, f"--reduce_grads_every_microbatch={every}"]),
                             2, fake=True, planned_device_type="cuda")
        for every in (False, True)
    }  # fmt: skip
    assert memory[False].breakdown["grads_unsharded"] > 0 == memory[True].breakdown["grads_unsharded"]
    assert memory[True].peak_bytes < memory[False].peak_bytes
    # The decision is made on these two plans (the simulation is what the test above checks).
    monkeypatch.setattr(
        plan_lib, "simulate_step", lambda cfg, *a, **k: memory[cfg.reduce_grads_every_microbatch]
    )

    def gpu_of(nbytes: int) -> GpuSpec:
        return GpuSpec("test", "H100 SXM", nbytes, 3.35e12, 450e9)

    def need(every: bool) -> int:
        return plan_lib.Plan(2, gpu_of(0), memory[every], None).required_bytes

    cfg = load_config(TINY, [*COMMON, "--reduce_grads_every_microbatch=auto"])
    for gpu_bytes, every, fits in ((need(False), False, True), (need(False) - 1, True, True),
                                   (need(True) - 1, True, False)):  # fmt: skip
        plan = plan_lib.plan_run(cfg, 2, gpu_of(gpu_bytes))
        assert (plan.decided, plan.fits) == ({"reduce_grads_every_microbatch": every}, fits)
        assert plan.memory is memory[every]
    assert plan_lib.plan_run(load_config(TINY, COMMON), 2, gpu_of(0)).decided == {}


def test_launcher_passes_the_plans_decision_to_torchrun(monkeypatch):
    import olmo.launch
    import olmo.launcher

    started = []
    decided = ["--reduce_grads_every_microbatch=true"]
    monkeypatch.setattr(olmo.launcher, "check_memory_plan", lambda *a: decided)
    monkeypatch.setattr(olmo.launcher, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr("torch.distributed.run.main", started.append)
    monkeypatch.setattr(olmo.launch, "training_device_type", lambda: "cuda")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    argv = [TINY, "--save_folder=/tmp/plan-launcher-test", *COMMON,
            "--reduce_grads_every_microbatch=auto"]  # fmt: skip
    olmo.launcher.main(argv)
    assert started[0][-len(argv) - 1 :] == [*argv, *decided]


def test_auto_is_the_only_word_gradient_reduction_takes():
    from moe_model.errors import ConfigError
    from olmo.train_module import train_module_config

    with pytest.raises(ConfigError, match=r"^reduce_grads_every_microbatch='sometimes' is unknown; "
                                          r"expected true, false or auto$"):  # fmt: skip
        load_config(TINY, ["--reduce_grads_every_microbatch=sometimes"])
    # Undecided (a CPU run, no plan): once per step, as before.
    cfg = load_config(TINY, ["--reduce_grads_every_microbatch=auto"])
    assert train_module_config(cfg).reduce_grads_every_microbatch is False


ONE_LONG_MICRO_BATCH = [
    "--precision=bf16", "--model.activation_backend=fused", "--model.n_layers=2",
    "--global_train_batch_size=16", "--device_train_microbatch_size=16",
    "--model.max_sequence_length=1024", "--fused_lm_loss=true",
]  # fmt: skip
"""Activations dominate the peak (fake tensors: the shapes cost no time, the ops do)."""


def test_activation_checkpointing_modes_order_the_planned_activations():
    """The saved activations at the peak: whole blocks < the MoE layers only < none. (Measured
    at tiny's 4 layers: 164, 465, 656 MB; attention only 435 MB.)"""
    activations = {
        mode: simulate_step(
            load_config(TINY, [*ONE_LONG_MICRO_BATCH, f"--activation_checkpointing={mode}"]), 1,
            fake=True, planned_device_type="cpu",
        ).breakdown["activations"]
        for mode in ("none", "moe", "full")
    }  # fmt: skip
    assert activations["full"] < activations["moe"] < activations["none"], activations


def test_roofline_recomputes_the_checkpointed_kinds_only():
    from olmo.plan_speed import step_work

    work = {
        mode: step_work(load_config(TINY, [*COMMON, f"--activation_checkpointing={mode}"]), 2)
        for mode in ("none", "moe", "attention", "full")
    }
    for kind in ("attention_proj", "router", "expert_gemm"):  # matmuls: 3 passes, 4 recomputed
        recomputed = {"full", "moe" if kind != "attention_proj" else "attention"}
        for mode in work:
            ratio = 4 / 3 if mode in recomputed else 1
            assert work[mode][kind].flops == pytest.approx(ratio * work["none"][kind].flops)
    assert work["full"]["lm_head_loss"] == work["none"]["lm_head_loss"]


def test_unknown_activation_checkpointing_mode_is_one_line():
    from moe_model.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^activation_checkpointing='ffn' is unknown; expected "
                                          r"true, false, none or one of full, moe, attention$"):  # fmt: skip
        load_config(TINY, ["--activation_checkpointing=ffn"])
    assert load_config(TINY, ["--activation_checkpointing=true"]).activation_checkpointing is True


def test_suggested_microbatch_is_the_largest_divisor_that_fits(monkeypatch):
    """A binary search over the divisors of the per-rank batch (here 64 / 2 = 32: 1, 2, 4, 8,
    16, 32) on plans whose need grows with the size: the largest fitting one, in at most
    log2(6) + 1 plans; None when even 1 does not fit."""
    import olmo.plan as plan_lib
    from olmo.gpus import GpuSpec

    cfg = load_config(TINY, ["--global_train_batch_size=64", "--device_train_microbatch_size=1"])
    assert plan_lib.microbatch_sizes(cfg, 2) == [1, 2, 4, 8, 16, 32]
    tried = []

    def plan_of(config, gpus, gpu):
        size = config.device_train_microbatch_size
        tried.append(size)
        memory = SimpleNamespace(peak_bytes=size * 2**30)
        return plan_lib.Plan(gpus, gpu, memory, None)

    monkeypatch.setattr(plan_lib, "plan_run", plan_of)
    margin = plan_lib.FIXED_RESERVE_BYTES
    for limit, want in ((5, 4), (8, 8), (32, 32), (1, 1), (0.5, None)):
        tried.clear()
        gpu = GpuSpec("test", "H100 SXM", int(limit * 2**30 * 1.1) + margin + 1, 3.35e12, 450e9)
        size, plans = plan_lib.suggest_microbatch_size(cfg, 2, gpu)
        assert size == want, (limit, size, tried)
        assert len(tried) <= 3 and set(plans) == set(tried)
    assert cfg.device_train_microbatch_size == 1  # the config itself is left alone
