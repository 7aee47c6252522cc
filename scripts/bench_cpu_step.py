#!/usr/bin/env python
"""Training-step time of the tiny config, PolyNorm vs SwiGLU at equal parameters, on this CPU.

One step = forward + backward (CE + auxiliary losses) + AdamW over a micro-batch, the same work
the trainer does per micro-batch. Variants are interleaved round-robin so that load from other
processes hits them alike; medians and the ratio to SwiGLU are printed and written to
benchmarks/results/cpu_step.json.

    python scripts/bench_cpu_step.py [--config configs/tiny.yaml] [--iters 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import (  # noqa: E402
    environment,
    format_table,
    median,
    time_interleaved,
    write_json,
)

from moe_model.config import equal_param_hidden_size  # noqa: E402
from olmo.config import load_config  # noqa: E402


def make_step(model_cfg, batch_BS: torch.Tensor):
    torch.manual_seed(0)
    model = model_cfg.build(init_device="cpu")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def step():
        out = model(batch_BS[:, :-1])
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch_BS[:, 1:].flatten())
        (ce + out.lb_loss + out.z_loss).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        model.update_expert_bias(out.tokens_per_expert_LE)  # a no-op unless the option is on

    return step, model_cfg.num_params()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()

    cfg = load_config(args.config)
    base = cfg.model
    h_gated = equal_param_hidden_size(base.mlp_hidden_size, base.activation_type, "swiglu")
    h_plain = equal_param_hidden_size(h_gated, "swiglu", "polynorm")
    variants = {
        "swiglu": dataclasses.replace(base, activation_type="swiglu", mlp_hidden_size=h_gated),
        "polynorm (eager)": dataclasses.replace(
            base, activation_type="polynorm", mlp_hidden_size=h_plain, activation_backend="eager"
        ),
        "polynorm (fused)": dataclasses.replace(
            base, activation_type="polynorm", mlp_hidden_size=h_plain, activation_backend="fused"
        ),
        "polynorm (compile)": dataclasses.replace(
            base, activation_type="polynorm", mlp_hidden_size=h_plain, activation_backend="compile"
        ),
        "polynorm (compile, per expert)": dataclasses.replace(
            base, activation_type="polynorm", mlp_hidden_size=h_plain, activation_backend="compile",
            moe_activation_per_expert=True,
        ),
    }
    seq = base.max_sequence_length
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, base.vocab_size, (cfg.device_train_microbatch_size, seq + 1), generator=gen)
    steps, params = {}, {}
    for name, model_cfg in variants.items():
        steps[name], params[name] = make_step(model_cfg, batch)
    first, times = time_interleaved(steps, warmup=args.warmup, iters=args.iters)

    ref = median(times["swiglu"])
    rows = [
        {
            "variant": name,
            "params": params[name],
            "first_s": first[name],
            "median_ms": median(times[name]),
            "ratio": median(times[name]) / ref,
        }
        for name in variants
    ]
    print(f"tiny config step (micro-batch {tuple(batch[:, :-1].shape)}), {torch.get_num_threads()} threads")
    print(format_table(rows, [("variant", "variant", ""), ("params", "params", ",d"),
                              ("first_s", "first step s", ".1f"), ("median_ms", "median ms", ".1f"),
                              ("ratio", "vs swiglu", ".2f")]))
    path = write_json("cpu_step", {"env": environment(torch.device("cpu")), "rows": rows,
                                   "times_ms": times}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
