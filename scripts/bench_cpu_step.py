#!/usr/bin/env python
"""Training-step time of the tiny config, PolyNorm vs SwiGLU at equal parameters, on this CPU.

One step = forward + backward (CE + auxiliary losses) + AdamW over a micro-batch, the same work
the trainer does per micro-batch. Variants are interleaved round-robin so that load from other
processes hits them alike; medians and the ratio to SwiGLU are printed and written to
benchmarks/results/cpu_step.json. ``--quick`` leaves out the compiled variants and shrinks the
model (``QUICK_OVERRIDES``, before the command line's).

    python scripts/bench_cpu_step.py [--config configs/tiny.yaml] [--iters 20] [--key=value ...]
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F
from bench_common import (
    REPO,
    Benchmark,
    Run,
    median,
    ratio_to_reference,
    repo_relative,
    run_benchmark,
)

from moe_model.config import equal_param_hidden_size
from olmo.config import load_config


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

    return step, model_cfg.num_params()


def variants(base) -> dict:
    """Variant name -> ModelConfig: SwiGLU and PolyNorm backends at equal parameters."""
    h_gated = equal_param_hidden_size(base.mlp_hidden_size, base.activation_type, "swiglu")
    h_plain = equal_param_hidden_size(h_gated, "swiglu", "polynorm")

    def polynorm(**kw):
        return dataclasses.replace(base, activation_type="polynorm", mlp_hidden_size=h_plain, **kw)

    return {
        "swiglu": dataclasses.replace(base, activation_type="swiglu", mlp_hidden_size=h_gated),
        "polynorm (eager)": polynorm(activation_backend="eager"),
        "polynorm (fused)": polynorm(activation_backend="fused"),
        "polynorm (compile)": polynorm(activation_backend="compile"),
        "polynorm (compile, per expert)": polynorm(
            activation_backend="compile", moe_activation_per_expert=True
        ),
    }


QUICK_OVERRIDES = [
    "--model.n_layers=1",
    "--model.max_sequence_length=32",
    "--model.vocab_size=512",
    "--model.embedding_size=512",
    "--device_train_microbatch_size=2",
]


def add_arguments(p) -> None:
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))


def setup(run: Run) -> None:
    if run.quick:
        run.overrides = QUICK_OVERRIDES + run.overrides
    run.settings.update(
        config=repo_relative(run.args.config),
        overrides=run.overrides,
        threads=torch.get_num_threads(),
    )


def measure(run: Run):
    cfg = load_config(run.args.config, run.overrides)
    models = variants(cfg.model)
    if run.quick:
        models = {name: m for name, m in models.items() if "compile" not in name}
    seq = cfg.model.max_sequence_length
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(
        0, cfg.model.vocab_size, (cfg.device_train_microbatch_size, seq + 1), generator=gen
    )
    run.settings["micro_batch"] = list(batch[:, :-1].shape)
    print(
        f"# micro-batch {tuple(batch[:, :-1].shape)}, {torch.get_num_threads()} threads", flush=True
    )
    steps, params, first = {}, {}, {}
    for name, model_cfg in models.items():
        steps[name], params[name] = make_step(model_cfg, batch)
        start = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - start
        for _ in range(run.warmup - 1):
            steps[name]()
    times = {name: [] for name in models}
    for _ in range(run.iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    for name in models:
        yield {
            "variant": name,
            "params": params[name],
            "first_s": first[name],
            "median_ms": median(times[name]),
            "step_ms_all": times[name],
        }


BENCHMARK = Benchmark(
    name="cpu_step",
    result_name="cpu_step",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    finish=lambda run, rows: ratio_to_reference(
        rows, "median_ms", "ratio", lambda r: r["variant"] == "swiglu"
    ),
    columns=[
        ("variant", "variant", ""),
        ("params", "params", ",d"),
        ("first_s", "first step s", ".1f"),
        ("median_ms", "median ms", ".1f"),
        ("ratio", "vs swiglu", ".2f"),
    ],  # fmt: skip
    devices=("cpu",),
    # The first warm-up step is timed on its own (first_s): for compile it is the compilation.
    timing={"cpu": (3, 20), "quick": (1, 2)},
    config_overrides=True,
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
