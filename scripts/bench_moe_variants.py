#!/usr/bin/env python
"""Training-step time of each MoE routing/balancing option against OLMoE's default, on this CPU.

One step = forward + backward (CE + auxiliary losses) + AdamW over a micro-batch of the config
(default configs/tiny.yaml), plus the expert-bias update where auxiliary-loss-free balancing is
on: the work the trainer does per micro-batch. Every variant changes one thing (or one recipe)
and keeps the total and active parameter counts where the option allows (a shared expert takes
one routed slot; fine-grained experts split each expert in four). Variants are interleaved
round-robin so that load from other processes hits them alike; medians and the ratio to the
default are printed and written to benchmarks/results/moe_variants_cpu.json. One process: the
global-batch balance loss would add one small all-reduce per MoE layer and micro-batch, which
is not measured here.

    python scripts/bench_moe_variants.py [--config configs/tiny.yaml] [--iters 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    environment,
    format_table,
    median,
    time_interleaved,
    write_json,
)
from bench_cpu_step import make_step  # noqa: E402

from olmo.config import load_config  # noqa: E402


def variants(base) -> dict:
    """Variant name -> ModelConfig, each from the config's own model."""
    e, k, h = base.moe_num_experts, base.moe_top_k, base.mlp_hidden_size
    sigmoid = dict(moe_router_score="sigmoid", moe_renormalize=True, moe_zloss_weight=0.0)
    return {
        "default (OLMoE: softmax, dropless)": base,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()

    cfg = load_config(args.config)
    models = variants(cfg.model)
    seq = cfg.model.max_sequence_length
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(
        0, cfg.model.vocab_size, (cfg.device_train_microbatch_size, seq + 1), generator=gen
    )
    steps = {name: make_step(model_cfg, batch)[0] for name, model_cfg in models.items()}
    first, times = time_interleaved(steps, warmup=args.warmup, iters=args.iters)

    ref = median(times[next(iter(models))])
    rows = [
        {
            "variant": name,
            "params": m.num_params(),
            "active_params": m.num_active_params(),
            "first_s": first[name],
            "median_ms": median(times[name]),
            "ratio": median(times[name]) / ref,
        }
        for name, m in models.items()
    ]
    print(f"{args.config}: micro-batch {tuple(batch[:, :-1].shape)}, "
          f"{cfg.model.activation_type} ({cfg.model.activation_backend}), "
          f"{torch.get_num_threads()} threads, medians of {args.iters}")
    print(format_table(rows, [("variant", "variant", ""), ("params", "params", ",d"),
                              ("active_params", "active", ",d"), ("first_s", "first step s", ".1f"),
                              ("median_ms", "median ms", ".1f"), ("ratio", "vs default", ".2f")]))
    path = write_json("moe_variants_cpu", {"env": environment(torch.device("cpu")),
                                           "config": args.config, "rows": rows,
                                           "times_ms": times}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
