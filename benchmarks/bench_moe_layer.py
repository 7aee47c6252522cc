"""Benchmark one MoE layer, forward + backward, per expert activation at equal parameters.

Default shape is one OLMoE-1B-7B layer: d_model 2048, 64 experts, top-8, 16384 tokens (a
micro-batch of 4 x 4096), i.e. 131072 routed rows. Expert hidden sizes are chosen for equal
parameters: SwiGLU h=1024 (three matrices), non-gated activations h=1536 (two matrices).

Reported per activation: forward and backward time (medians), expert GEMM TFLOP/s (the
expert matmul FLOPs, 6 * R * D * (in + H) forward + backward, over the whole layer's time, so
routing, permutation and the activation count against it), the activation's own forward +
backward time on the routed (R x in) tensor and its share of the layer's time, peak memory.

    python -m benchmarks.bench_moe_layer                        # GPU, OLMoE shape, bf16 params
    python -m benchmarks.bench_moe_layer --device cpu --quick   # smoke test on tiny shapes
    python -m benchmarks.bench_moe_layer --force-balance        # every expert T*K/E rows

``--force-balance`` routes round-robin (model.moe_force_balance, moe_model/routing.py): speed
without routing noise, every expert the same row count.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.bench_common import (
    Benchmark,
    Run,
    median,
    ratio_to_reference,
    run_benchmark,
    sync,
    time_phases,
)
from benchmarks.bench_profile import add_profile_flag, format_profile, profile_step
from moe_model.config import ModelConfig, equal_param_hidden_size
from moe_model.init import draw_on
from moe_model.moe import MoELayer
from olmo.objective import objective

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_acts(specs: list[str], swiglu_hidden: int) -> list[tuple[str, int]]:
    """'polynorm' -> (polynorm, equal-parameter h); 'polynorm:2048' -> explicit h."""
    out = []
    for spec in specs:
        name, _, h = spec.partition(":")
        out.append((name, int(h) if h else equal_param_hidden_size(swiglu_hidden, "swiglu", name)))
    return out


def layer_model_config(args, act: str, hidden: int, backend: str) -> ModelConfig:
    """The one-layer model config whose MoE layer the benchmark times."""
    return ModelConfig(
        d_model=args.d_model, n_layers=1, n_heads=args.n_heads, activation_type=act,
        mlp_hidden_size=hidden, moe_num_experts=args.experts, moe_top_k=args.top_k,
        activation_backend=backend, moe_expert_impl=args.expert_impl,
        moe_force_balance=args.force_balance,
    )  # fmt: skip


def bench_layer(args, act, hidden, device, dtype, backend, warmup, iters, profile=False):
    cfg = layer_model_config(args, act, hidden, backend)
    with draw_on(device):  # seconds, not the CPU's serial draw of 400M values
        layer = MoELayer(cfg.moe_layer_config(), init_device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(
        args.tokens, args.d_model, device=device, dtype=dtype, generator=gen
    ).requires_grad_()
    g = torch.randn_like(x)
    state = {}

    def phases():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        state.clear()

        def fwd():
            y, aux = layer(x)
            # The auxiliary losses join the objective as in training (their backward is tiny);
            # a random projection of the output stands in for the cross-entropy.
            state["loss"] = objective((y * g).sum(), aux.lb_loss, aux.z_loss).total

        def bwd():
            state["loss"].backward()

        return [fwd, bwd]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    fwd_ms, bwd_ms = time_phases(phases, device=device, warmup=warmup, iters=iters)
    peak_mib = (
        (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    )

    # The activation alone, on the routed rows it sees inside the layer.
    rows = args.tokens * args.top_k
    a_in = torch.randn(
        rows, cfg.mlp_in_size, device=device, dtype=dtype, generator=gen
    ).requires_grad_()
    a_g = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
    act_state = {}

    def act_phases():
        layer.act.zero_grad(set_to_none=True)
        a_in.grad = None

        def fwd():
            act_state["y"] = layer.act(a_in)

        def bwd():
            act_state["y"].backward(a_g)

        return [fwd, bwd]

    a_fwd, a_bwd = time_phases(act_phases, device=device, warmup=warmup, iters=iters)
    sync(device)
    layer_profile = None
    if profile:
        layer_profile = profile_step(phases, device)
        print(format_profile(f"{act} h={hidden} ({backend})", layer_profile))

    fwd, bwd = median(fwd_ms), median(bwd_ms)
    total = fwd + bwd
    gemm_flops = 6 * rows * args.d_model * (cfg.mlp_in_size + hidden)
    act_total = median(a_fwd) + median(a_bwd)
    return {
        "activation": act,
        "backend": backend if act in ("polynorm", "polyrelu") else "-",
        "hidden": hidden,
        "expert_params_M": args.experts * args.d_model * (cfg.mlp_in_size + hidden) / 1e6,
        "fwd_ms": fwd,
        "bwd_ms": bwd,
        "total_ms": total,
        "gemm_tflops": gemm_flops / (total * 1e-3) / 1e12,
        "act_ms": act_total,
        "act_share_pct": 100 * act_total / total,
        "peak_mib": peak_mib,
        "fwd_ms_all": fwd_ms,
        "bwd_ms_all": bwd_ms,
        **({"profile": layer_profile} if layer_profile else {}),
    }


def add_arguments(p) -> None:
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--swiglu-hidden", type=int, default=1024)
    p.add_argument("--activations", nargs="+", default=["swiglu", "polynorm", "polyrelu", "relu2"],
                   help="names, or name:hidden; without a hidden size: equal parameters to SwiGLU")  # fmt: skip
    p.add_argument("--poly-backends", nargs="+", default=["auto", "eager"],
                   help="activation_backend values to run for polynorm/polyrelu")  # fmt: skip
    p.add_argument("--expert-impl", default="auto", help="moe_expert_impl: auto, grouped_mm, loop")
    p.add_argument(
        "--dtype", choices=list(DTYPES), help="params and input; default bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--force-balance", action="store_true",
                   help="route round-robin: every expert tokens*top_k/experts rows")  # fmt: skip
    add_profile_flag(p)


def setup(run: Run) -> None:
    args = run.args
    if run.quick:  # tiny shapes: d 64, 8 experts, top-2, 256 tokens
        args.d_model, args.n_heads, args.experts, args.top_k, args.tokens = 64, 4, 8, 2, 256
        args.swiglu_hidden = 32
    args.dtype = args.dtype or ("bf16" if run.gpu else "fp32")
    shape = ("d_model", "n_heads", "experts", "top_k", "tokens", "swiglu_hidden", "activations",
             "poly_backends", "expert_impl", "force_balance")  # fmt: skip
    run.settings.update({k: getattr(args, k) for k in shape}, dtype=str(DTYPES[args.dtype]))
    print(
        f"# d_model {args.d_model}, {args.experts} experts, top-{args.top_k}, "
        f"{args.tokens} tokens, {args.dtype}"
        + (", forced balance" if args.force_balance else "")
    )


def measure(run: Run):
    args = run.args
    for act, hidden in parse_acts(args.activations, args.swiglu_hidden):
        for backend in args.poly_backends if act in ("polynorm", "polyrelu") else ["auto"]:
            yield bench_layer(args, act, hidden, run.device, DTYPES[args.dtype], backend,
                              run.warmup, run.iters, profile=args.profile)  # fmt: skip
            if run.gpu:
                torch.cuda.empty_cache()


def columns(run: Run) -> list:
    cols = [
        ("activation", "activation", ""), ("backend", "backend", ""), ("hidden", "h", "d"),
        ("expert_params_M", "expert params M", ".1f"), ("fwd_ms", "fwd ms", ".3f"),
        ("bwd_ms", "bwd ms", ".3f"), ("total_ms", "fwd+bwd ms", ".3f"),
        ("vs_swiglu", "x SwiGLU", ".3f"), ("gemm_tflops", "expert GEMM TFLOP/s", ".1f"),
        ("act_ms", "act fwd+bwd ms", ".3f"), ("act_share_pct", "act % of layer", ".1f"),
    ]  # fmt: skip
    return cols + [("peak_mib", "peak MiB", ".0f")] if run.gpu else cols


BENCHMARK = Benchmark(
    name="moe_layer",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    finish=lambda run, rows: ratio_to_reference(
        rows, "total_ms", "vs_swiglu", lambda r: r["activation"] == "swiglu"
    ),
    columns=columns,
    progress=lambda r: (
        f"{r['activation']:9s} {r['backend']:6s} h={r['hidden']:5d}  fwd+bwd {r['total_ms']:9.3f} ms"
    ),
    timing={"cuda": (5, 20), "cpu": (1, 3), "quick": (1, 3)},
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
