"""benchmarks/bench_expert_parallel.py --estimate: the OLMoE-1B-7B communication arithmetic against
the same quantities counted by hand from the model's published shapes."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_expert_parallel
from olmo.config import load_config
from tests.olmo.helpers import REPO

# OLMoE-1B-7B with SwiGLU experts (configs/olmoe-1b-7b-swiglu.yaml), written out so that the
# counts below do not go through ModelConfig.
D, LAYERS, EXPERTS, TOP_K, H, VOCAB, SEQ = 2048, 16, 64, 8, 1024, 50304, 4096
GPUS, GPUS_PER_NODE, EP, GLOBAL_BATCH, MICRO_BATCH = 64, 8, 8, 1024, 4

EXPERT_PARAMS = LAYERS * EXPERTS * 3 * D * H  # SwiGLU: gate and up D x H, down H x D
# Untied embedding and output head, per layer q/k/v/o, two block norms, q and k norms, router;
# the final norm.
OTHER_PARAMS = 2 * VOCAB * D + LAYERS * (4 * D * D + 2 * D + 2 * D + D * EXPERTS) + D


def test_the_hand_count_describes_the_config():
    model = load_config(REPO / "configs" / "olmoe-1b-7b-swiglu.yaml").model
    shapes = (model.d_model, model.n_layers, model.moe_num_experts, model.moe_top_k,
              model.mlp_hidden_size, model.embedding_size, model.max_sequence_length)  # fmt: skip
    assert shapes == (D, LAYERS, EXPERTS, TOP_K, H, VOCAB, SEQ)
    assert model.activation_type == "swiglu" and model.qk_norm


@pytest.fixture(scope="module")
def estimate(tmp_path_factory):
    out = tmp_path_factory.mktemp("estimate")
    bench = bench_expert_parallel
    assert bench.run_benchmark(bench.BENCHMARK, ["--estimate", "--device", "cpu",
                                                 "--out", str(out)]) == 0  # fmt: skip
    payload = json.loads((out / "expert_parallel_estimate.json").read_text())
    assert payload["kind"] == "arithmetic estimate, not a measurement"
    fsdp, ep = payload["results"]
    return fsdp, ep


def test_parameter_split(estimate):
    for row in estimate:
        assert row["expert_params"] == EXPERT_PARAMS == 6_442_450_944
        assert row["other_params"] == OTHER_PARAMS == 476_710_912


def test_all_to_all_bytes(estimate):
    fsdp, ep = estimate
    tokens_per_gpu = GLOBAL_BATCH * SEQ // GPUS
    routed_rows = tokens_per_gpu * TOP_K
    assert routed_rows == 524_288
    # Dispatch and combine, forward and backward, in every layer; 7 of 8 rows leave the rank.
    expected = 4 * LAYERS * routed_rows * (EP - 1) / EP * D * 2
    assert ep["all_to_all_gb"] == pytest.approx(expected / 1e9, rel=1e-12)
    assert ep["all_to_all_gb"] == pytest.approx(120.259084288, rel=1e-12)
    assert fsdp["all_to_all_gb"] == 0


def test_parameter_all_gather_and_gradient_reduce_scatter(estimate):
    fsdp, ep = estimate
    gathers = 2 * (GLOBAL_BATCH // GPUS // MICRO_BATCH)  # forward and backward per micro-batch
    total = EXPERT_PARAMS + OTHER_PARAMS
    # FSDP alone: every parameter in bf16 over all 64 ranks, each receiving 63/64 of it.
    fsdp_gather = gathers * total * 2 * (GPUS - 1) / GPUS
    assert fsdp["param_allgather_gb"] == pytest.approx(fsdp_gather / 1e9, rel=1e-12)
    assert fsdp["param_allgather_gb"] == pytest.approx(108.976799232, rel=1e-12)
    assert fsdp["grad_reduce_scatter_gb"] == pytest.approx(
        total * 4 * (GPUS - 1) / GPUS / 1e9, rel=1e-12
    )
    # EP: a rank's E/ep experts sharded over the 8 ranks (one per node) of its column, the
    # rest over all 64.
    column = GPUS // EP
    ep_gather = (
        gathers
        * 2
        * (EXPERT_PARAMS / EP * (column - 1) / column + OTHER_PARAMS * (GPUS - 1) / GPUS)
    )
    assert ep["param_allgather_gb"] == pytest.approx(ep_gather / 1e9, rel=1e-12)


def test_inter_node_share_and_link_time(estimate):
    fsdp, ep = estimate
    total = EXPERT_PARAMS + OTHER_PARAMS
    gathers = 2 * (GLOBAL_BATCH // GPUS // MICRO_BATCH)
    # FSDP alone: of a 64-rank collective, 56 of the 64 shards come from other nodes.
    inter = (gathers * 2 + 4) * total * (GPUS - GPUS_PER_NODE) / GPUS
    assert fsdp["inter_node_gb"] == pytest.approx(inter / 1e9, rel=1e-12)
    intra = fsdp["received_gb"] * 1e9 - inter
    assert fsdp["link_s"] == pytest.approx(intra / 450e9 + inter / 50e9, rel=1e-12)
    assert ep["inter_node_gb"] < fsdp["inter_node_gb"] / 5


def test_compute_uses_the_h100_datasheet_peak(estimate):
    model = load_config(REPO / "configs" / "olmoe-1b-7b-swiglu.yaml").model
    tokens_per_gpu = GLOBAL_BATCH * SEQ // GPUS
    flops = model.num_flops_per_token(SEQ) * tokens_per_gpu
    # H100 SXM: 1,979 TFLOP/s bf16 with sparsity on the datasheet, half of it dense.
    for row in estimate:
        assert row["compute_s_at_peak"] == pytest.approx(flops / 989.5e12, rel=1e-12)
