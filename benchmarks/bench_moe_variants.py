#!/usr/bin/env python
"""Training-step time of each MoE routing/balancing option against OLMoE's default, on this CPU.

One step = the train module's step (as in bench_cpu_step.py: forward + backward of the objective,
clipping, AdamW, and the expert-bias update where auxiliary-loss-free balancing is on) over a
micro-batch of the config (default configs/tiny.yaml). Every variant changes one thing (or one recipe)
and keeps the total and active parameter counts where the option allows (a shared expert takes
one routed slot; fine-grained experts split each expert in four). Variants are interleaved
round-robin so that load from other processes hits them alike; medians and the ratio to the
default are printed and written to benchmarks/results/moe_variants_cpu.json. One process: the
global-batch balance loss would add one small all-reduce per MoE layer and micro-batch, which
is not measured here. ``--quick`` shrinks the model (``QUICK_OVERRIDES``).

    python -m benchmarks.bench_moe_variants [--config configs/tiny.yaml] [--iters 20] [--key=value ...]
"""

from __future__ import annotations

import dataclasses
import sys

from benchmarks import bench_cpu_step as cpu_step
from benchmarks.bench_common import ratio_to_reference, run_benchmark
from benchmarks.bench_cpu_step import make_setup, measure_steps
from olmo.config import load_config

DEFAULT = "default (OLMoE: softmax, dropless)"


def variants(base) -> dict:
    """Variant name -> ModelConfig, each from the config's own model."""
    e, k, h = base.moe_num_experts, base.moe_top_k, base.mlp_hidden_size
    sigmoid = dict(moe_router_score="sigmoid", moe_renormalize=True, moe_zloss_weight=0.0)
    return {
        DEFAULT: base,
        "sigmoid router, renormalised": base.replace(**sigmoid),
        "aux-free bias (softmax)": base.replace(moe_bias_update_rate=1e-3),
        "sequence-wise balance loss": base.replace(moe_lb_granularity="sequence"),
        "DeepSeek-V3 routing (sigmoid + bias + sequence loss)": base.replace(
            **sigmoid, moe_bias_update_rate=1e-3, moe_lb_granularity="sequence",
            moe_loss_weight=1e-4,
        ),  # fmt: skip
        "capacity factor 1.25": base.replace(moe_capacity_factor=1.25),
        "capacity factor 1.0": base.replace(moe_capacity_factor=1.0),
        f"1 shared + {k - 1} of {e - 1} routed": base.replace(
            moe_shared_experts=1, moe_num_experts=e - 1, moe_top_k=k - 1
        ),
        "first block dense (width K*H)": base.replace(moe_first_dense_layers=1),
        f"fine-grained ({4 * e} experts of H/4, top-{4 * k})": base.replace(
            moe_num_experts=4 * e, moe_top_k=4 * k, mlp_hidden_size=h // 4
        ),
    }


QUICK_OVERRIDES = [
    "--model.n_layers=2",
    "--model.max_sequence_length=32",
    "--model.vocab_size=512",
    "--model.embedding_size=512",
    "--model.activation_backend=fused",
    "--device_train_microbatch_size=2",
]


def measure(run):
    cfg = load_config(run.args.config, run.overrides)
    run.settings["activation"] = f"{cfg.model.activation_type} ({cfg.model.activation_backend})"
    yield from measure_steps(run, cfg, variants(cfg.model))


# bench_cpu_step's benchmark (CPU only, its timing defaults, config overrides) measuring these
# variants against the default.
BENCHMARK = dataclasses.replace(
    cpu_step.BENCHMARK,
    name="moe_variants",
    result_name=None,
    doc=__doc__,
    setup=make_setup(QUICK_OVERRIDES),
    measure=measure,
    finish=lambda run, rows: ratio_to_reference(
        rows, "median_ms", "ratio", lambda r: r["variant"] == DEFAULT
    ),
    columns=[
        ("variant", "variant", ""),
        ("params", "params", ",d"),
        ("active_params", "active", ",d"),
        ("first_s", "first step s", ".1f"),
        ("median_ms", "median ms", ".1f"),
        ("ratio", "vs default", ".2f"),
    ],  # fmt: skip
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
