#!/usr/bin/env python
"""Training-step time of the tiny config, PolyNorm vs SwiGLU at equal parameters, on this CPU.

One step = the train module's step (benchmarks/train_steps.py: train_batch, forward + backward of
olmo.objective's loss, then optim_step: clipping, schedule, AdamW) on one micro-batch of random
tokens, the module built as training builds it. Variants are interleaved round-robin so that load from other
processes hits them alike; medians and the ratio to SwiGLU are printed and written to
benchmarks/results/cpu_step.json. ``--quick`` leaves out the compiled variants and shrinks the
model (``QUICK_OVERRIDES``, before the command line's).

    python -m benchmarks.bench_cpu_step [--config configs/tiny.yaml] [--iters 20] [--key=value ...]
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from benchmarks.bench_common import (
    REPO,
    Benchmark,
    Run,
    median,
    ratio_to_reference,
    repo_relative,
    run_benchmark,
    time_interleaved,
)
from benchmarks.train_steps import build_train_module, whole_step
from moe_model.config import equal_param_hidden_size
from olmo.config import load_config


def make_step(cfg, batch: dict):
    """The train module's step for ``cfg``, on a rank batch of one micro-batch."""
    cfg = dataclasses.replace(cfg, global_train_batch_size=cfg.device_train_microbatch_size)
    return whole_step(build_train_module(cfg, torch.device("cpu")), batch)


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


def make_setup(quick_overrides: list[str]):
    """The setup of a benchmark of whole training steps: ``quick_overrides`` before the command
    line's under --quick; the config, overrides and thread count recorded."""

    def setup(run: Run) -> None:
        if run.quick:
            run.overrides = quick_overrides + run.overrides
        run.settings.update(
            config=repo_relative(run.args.config),
            overrides=run.overrides,
            threads=torch.get_num_threads(),
        )

    return setup


def measure_steps(run: Run, cfg, models: dict):
    """One row per model config: the train module's step on the config's micro-batch (random
    tokens), timed interleaved with the others."""
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.device_train_microbatch_size, cfg.model.max_sequence_length)
    batch = {"input_ids": torch.randint(0, cfg.model.vocab_size, shape, generator=gen)}
    run.settings["micro_batch"] = list(shape)
    print(f"# micro-batch {shape}, {torch.get_num_threads()} threads", flush=True)
    steps = {
        name: make_step(dataclasses.replace(cfg, model=model_cfg), batch)
        for name, model_cfg in models.items()
    }
    first, times = time_interleaved(steps, warmup=run.warmup, iters=run.iters)
    for name, model_cfg in models.items():
        yield {
            "variant": name,
            "params": model_cfg.num_params(),
            "active_params": model_cfg.num_active_params(),
            "first_s": first[name],
            "median_ms": median(times[name]),
            "step_ms_all": times[name],
        }


def measure(run: Run):
    cfg = load_config(run.args.config, run.overrides)
    models = variants(cfg.model)
    if run.quick:
        models = {name: m for name, m in models.items() if "compile" not in name}
    yield from measure_steps(run, cfg, models)


BENCHMARK = Benchmark(
    name="cpu_step",
    result_name="cpu_step",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=make_setup(QUICK_OVERRIDES),
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
