"""--force-balance of the MoE layer benchmarks: the layer they time gives every expert exactly
T*K/E rows, and the flag is recorded with the results."""

from __future__ import annotations

import json

import torch

from benchmarks import bench_expert_parallel, bench_moe_layer
from benchmarks.bench_common import parse
from moe_model.moe import MoELayer


def _routed_rows(cfg, tokens: int) -> list[int]:
    torch.manual_seed(0)
    layer = MoELayer(cfg.moe_layer_config())
    # Inputs that make the router prefer one expert: balance must come from the flag.
    x_TD = torch.randn(tokens, cfg.d_model) + 3.0
    return layer(x_TD)[1].tokens_per_expert_E.tolist()


def test_moe_layer_benchmark_forced_balance(tmp_path):
    argv = ["--quick", "--device", "cpu", "--force-balance", "--activations", "swiglu",
            "--out", str(tmp_path)]  # fmt: skip
    run = parse(bench_moe_layer.BENCHMARK, argv)
    bench_moe_layer.setup(run)
    args = run.args
    cfg = bench_moe_layer.layer_model_config(args, "swiglu", args.swiglu_hidden, "auto")
    assert _routed_rows(cfg, args.tokens) == [args.tokens * args.top_k // args.experts] * args.experts
    without = parse(bench_moe_layer.BENCHMARK, [a for a in argv if a != "--force-balance"])
    bench_moe_layer.setup(without)
    cfg = bench_moe_layer.layer_model_config(without.args, "swiglu", args.swiglu_hidden, "auto")
    assert len(set(_routed_rows(cfg, args.tokens))) > 1  # the router alone is uneven here

    assert bench_moe_layer.run_benchmark(bench_moe_layer.BENCHMARK, argv) == 0
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert payload["settings"]["force_balance"] is True
    assert [r["activation"] for r in payload["results"]] == ["swiglu"]


def test_expert_parallel_benchmark_forced_balance():
    run = parse(bench_expert_parallel.BENCHMARK, ["--quick", "--device", "cpu", "--force-balance"])
    bench_expert_parallel.setup(run)
    args = run.args
    cfg = bench_expert_parallel.layer_model_config(args)
    assert _routed_rows(cfg, args.tokens) == [args.tokens * args.top_k // args.experts] * args.experts
    assert run.settings["force_balance"] is True
