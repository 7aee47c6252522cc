#!/usr/bin/env python
"""Muon's cost: Newton-Schulz FLOPs and communication per step at OLMoE-1B-7B (analytical, from
the model's own Muon matrices), and the CPU training-step time of Muon against AdamW.

Analytical (printed first, in the JSON's ``olmoe_1b_7b``): every matrix :func:`olmo.muon.muon_layouts`
gives Muon at ``--olmoe-config`` (built on the meta device), 5 Newton-Schulz iterations each
(:func:`olmo.muon.newton_schulz_flops`), against the model's training FLOPs per step (6 x active
parameters plus attention, x global batch tokens); and the bytes each of N ranks sends per step
for the row-sharded 2-D matrices (fp32): the owner scheme's two all-to-alls,
2 (N-1)/N^2 x elements x 4, against gathering every matrix on every rank, (N-1)/N x elements x 4.
Expert stacks need none: FSDP2 shards them on the expert dim.

Timed (table rows): one training step (forward + backward + optimizer step over one micro-batch)
and the optimizer step alone (on the step's gradients) with AdamW and Muon (fp32 Newton-Schulz,
the CPU default; bf16, the GPU default, runs about 10x slower on CPUs), at configs/tiny.yaml and a medium config
(``MEDIUM``); variants interleaved round-robin; the ratio is to AdamW of the same config.

    python -m benchmarks.bench_muon [--iters 10] [--quick]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.bench_common import REPO, Benchmark, Run, median, run_benchmark, time_interleaved
from olmo.config import OptimizerConfig, load_config
from olmo.muon import muon_layouts, newton_schulz_flops
from olmo.train_module import build_optimizer

EAGER = ["--model.activation_backend=eager"]  # no compile time in the first step
CONFIGS = {
    "tiny": ("configs/tiny.yaml", EAGER),
    "medium": ("configs/tiny.yaml", [*EAGER, "--model.d_model=384", "--model.n_heads=6",
                                     "--model.mlp_hidden_size=768", "--model.n_layers=4",
                                     "--model.moe_num_experts=16", "--model.moe_top_k=2",
                                     "--device_train_microbatch_size=4"]),
}  # fmt: skip
"""Config name -> (YAML, overrides). Medium: d_model 384, 4 layers, 16 experts of 768."""
QUICK = ["--model.n_layers=1", "--model.vocab_size=512", "--model.embedding_size=512",
         "--model.max_sequence_length=32", "--device_train_microbatch_size=2"]  # fmt: skip
OPTIMIZERS = {
    "adamw": {"name": "adamw"},
    "muon": {"name": "muon", "muon_ns_dtype": "fp32"},
}
RANKS = (8, 64, 256)


def olmoe_cost(config_path: str) -> dict:
    cfg = load_config(config_path, ["--optimizer.name=muon"])
    model = cfg.model.build("meta")
    named = dict(model.named_parameters())
    flops, expert_elems, matrix_elems = 0, 0, 0
    for name, layout in muon_layouts(model).items():
        shape = named[name].shape
        fan_out, fan_in = layout.fans(shape)
        count = (shape[0] if layout.experts else 1) * layout.pieces
        flops += count * newton_schulz_flops(fan_out, fan_in)
        if layout.experts:
            expert_elems += named[name].numel()
        else:
            matrix_elems += named[name].numel()
    tokens = cfg.global_train_batch_size * cfg.model.max_sequence_length
    train_flops = cfg.model.num_flops_per_token(cfg.model.max_sequence_length) * tokens
    comm = {
        n: {"owner_all_to_all_MB": 2 * (n - 1) / n**2 * matrix_elems * 4 / 1e6,
            "gather_every_matrix_MB": (n - 1) / n * matrix_elems * 4 / 1e6}
        for n in RANKS
    }  # fmt: skip
    return {
        "config": config_path,
        "muon_2d_matrix_elements": matrix_elems,
        "muon_expert_elements": expert_elems,
        "newton_schulz_tflops_per_step": flops / 1e12,
        "train_tflops_per_step": train_flops / 1e12,
        "newton_schulz_fraction": flops / train_flops,
        "comm_per_rank_per_step": comm,
    }


def print_olmoe(cost: dict) -> None:
    print(f"# OLMoE-1B-7B ({cost['config']}): Newton-Schulz {cost['newton_schulz_tflops_per_step']:.1f}"
          f" TFLOP per step = {100 * cost['newton_schulz_fraction']:.3f}% of the step's "
          f"{cost['train_tflops_per_step']:.0f} TFLOP (global batch 1024 x 4096); Muon elements: "
          f"{cost['muon_2d_matrix_elements'] / 1e6:.0f}M in 2-D matrices (row-sharded), "
          f"{cost['muon_expert_elements'] / 1e6:.0f}M in expert stacks (no communication)")  # fmt: skip
    for n, c in cost["comm_per_rank_per_step"].items():
        print(f"#   {n} ranks: {c['owner_all_to_all_MB']:.1f} MB sent per rank per step "
              f"(owner all-to-alls) vs {c['gather_every_matrix_MB']:.1f} MB (gather every matrix)")  # fmt: skip


def add_arguments(p) -> None:
    p.add_argument("--olmoe-config", default=str(REPO / "configs" / "olmoe-1b-7b-swiglu.yaml"))


def make_steps(cfg, opt_kwargs: dict, batch_BS: torch.Tensor):
    """(training step, optimizer step alone) for one optimizer on a fresh model."""
    torch.manual_seed(0)
    model = cfg.model.build(init_device="cpu")
    optim = build_optimizer(
        model, OptimizerConfig(**opt_kwargs, learning_rate=cfg.optimizer.learning_rate)
    )

    def backward():
        out = model(batch_BS[:, :-1])
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch_BS[:, 1:].flatten())
        (ce + out.lb_loss + out.z_loss).backward()

    def train_step():
        backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    backward()  # gradients for the optimizer-only step, kept
    grads = [p.grad.clone() for p in model.parameters()]

    def optim_step():
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        optim.step()

    return train_step, optim_step


def measure(run: Run):
    run.extra["olmoe_1b_7b"] = cost = olmoe_cost(run.args.olmoe_config)
    print_olmoe(cost)
    run.settings["threads"] = torch.get_num_threads()
    for config_name, (path, overrides) in CONFIGS.items():
        cfg = load_config(REPO / path, [*overrides, *(QUICK if run.quick else [])])
        seq = cfg.model.max_sequence_length
        batch = torch.randint(0, cfg.model.vocab_size, (cfg.device_train_microbatch_size, seq + 1),
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
        run.settings[config_name] = {"config": path, "overrides": overrides,
                                     "micro_batch": list(batch[:, :-1].shape)}  # fmt: skip
        steps = {}
        for opt_name, kwargs in OPTIMIZERS.items():
            train_step, optim_step = make_steps(cfg, kwargs, batch)
            steps[(opt_name, "train")] = train_step
            steps[(opt_name, "optim")] = optim_step
        _, times = time_interleaved(steps, warmup=run.warmup, iters=run.iters)
        for opt_name in OPTIMIZERS:
            yield {
                "config": config_name,
                "params": cfg.model.num_params(),
                "optimizer": opt_name,
                "train_step_ms": median(times[(opt_name, "train")]),
                "optim_step_ms": median(times[(opt_name, "optim")]),
                "train_ms_all": times[(opt_name, "train")],
                "optim_ms_all": times[(opt_name, "optim")],
            }


def finish(run: Run, rows: list[dict]) -> None:
    for row in rows:
        ref = next(r for r in rows if r["config"] == row["config"] and r["optimizer"] == "adamw")
        row["train_ratio"] = row["train_step_ms"] / ref["train_step_ms"]
        row["optim_ratio"] = row["optim_step_ms"] / ref["optim_step_ms"]


BENCHMARK = Benchmark(
    name="muon",
    result_name="muon_cpu",
    doc=__doc__,
    add_arguments=add_arguments,
    measure=measure,
    finish=finish,
    columns=[
        ("config", "config", ""),
        ("params", "params", ",d"),
        ("optimizer", "optimizer", ""),
        ("train_step_ms", "train step ms", ".1f"),
        ("train_ratio", "vs adamw", ".2f"),
        ("optim_step_ms", "optimizer step ms", ".1f"),
        ("optim_ratio", "vs adamw", ".2f"),
    ],  # fmt: skip
    devices=("cpu",),
    timing={"cpu": (1, 3), "quick": (1, 1)},
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
