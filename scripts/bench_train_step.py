"""Benchmark whole-model training steps on one device: tokens/s and MFU, SwiGLU vs PolyNorm.

OLMoE-1B-7B layer shapes (d 2048, 16 heads, 64 experts, top-8, vocab 50304, sequence 4096,
micro-batch 4) with as many layers as fit (``--layers auto`` tries 16, 12, 8, 6, 4, 2, 1 and
keeps the first that runs a step), at equal expert parameters (SwiGLU h=1024, PolyNorm
h=1536). One step = forward, cross-entropy + load-balancing + z-loss, backward, AdamW step.

MFU = tokens/s * ModelConfig.num_flops_per_token(seq) / peak dense bf16 FLOP/s
(active-parameter FLOPs, 6N + attention; H100/H200 SXM peak 989 TFLOP/s). Precision:
``--precision bf16`` keeps parameters in bf16 (as OLMoE's FSDP did; optimizer state in bf16
too, a speed measurement, not a recipe), ``autocast`` keeps fp32 parameters and runs bf16
autocast.

    python scripts/bench_train_step.py                          # GPU
    python scripts/bench_train_step.py --device cpu --quick     # smoke test on a tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import gc

import torch
import torch.nn.functional as F
from bench_common import (
    environment,
    format_table,
    median,
    pick_device,
    sync,
    time_phases,
    write_json,
)

from moe_model.config import ModelConfig, equal_param_hidden_size

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def make_config(args, act: str, n_layers: int) -> ModelConfig:
    hidden = args.swiglu_hidden if act == "swiglu" else equal_param_hidden_size(args.swiglu_hidden, "swiglu", act)
    return ModelConfig(
        d_model=args.d_model, n_layers=n_layers, n_heads=args.n_heads, activation_type=act,
        mlp_hidden_size=hidden, moe_num_experts=args.experts, moe_top_k=args.top_k,
        activation_backend=args.backend, moe_expert_impl=args.expert_impl,
        vocab_size=args.vocab, embedding_size=args.vocab, max_sequence_length=args.seq,
    )  # fmt: skip


def run(args, cfg: ModelConfig, device: torch.device, warmup: int, iters: int) -> dict:
    model = cfg.build(init_device=str(device))
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(
        model.parameters(), lr=4e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
        fused=device.type == "cuda",
    )  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device, generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "autocast"
        else contextlib.nullcontext()
    )
    state = {}

    def phases():
        def fwd():
            with amp:
                out = model(inputs)
                ce = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten())
                state["loss"] = ce + out.lb_loss + out.z_loss

        def bwd():
            state.pop("loss").backward()

        def step():
            opt.step()
            opt.zero_grad(set_to_none=True)

        return [fwd, bwd, step]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd_ms, bwd_ms, opt_ms = time_phases(phases, device=device, warmup=warmup, iters=iters)
    sync(device)
    step_ms = [a + b + c for a, b, c in zip(fwd_ms, bwd_ms, opt_ms)]
    tokens = args.batch * args.seq
    tps = tokens / (median(step_ms) * 1e-3)
    flops_tok = cfg.num_flops_per_token(args.seq)
    peak = peak_tflops(device, args.peak_tflops)
    row = {
        "activation": cfg.activation_type,
        "hidden": cfg.mlp_hidden_size,
        "layers": cfg.n_layers,
        "params_B": cfg.num_params() / 1e9,
        "active_params_B": cfg.num_active_params() / 1e9,
        "fwd_ms": median(fwd_ms),
        "bwd_ms": median(bwd_ms),
        "opt_ms": median(opt_ms),
        "step_ms": median(step_ms),
        "tokens_per_s": tps,
        "tflops": tps * flops_tok / 1e12,
        "mfu_pct": 100 * tps * flops_tok / (peak * 1e12) if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "step_ms_all": step_ms,
    }
    return row


def free(device: torch.device) -> None:
    """Release the last model's memory (call after run() returned, when its frame is gone)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(args, device, n_layers: int) -> bool:
    """Whether the larger (by activation memory) of the compared models runs 1 step."""
    try:
        for act in args.activations:
            run(args, make_config(args, act, n_layers), device, warmup=1, iters=1)
            free(device)
        return True
    except torch.OutOfMemoryError:
        free(device)
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--layers", default="auto", help="a number, or 'auto': the most of 16,12,8,6,4,2,1 that fit")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--swiglu-hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="micro-batch (OLMoE: 4)")
    p.add_argument("--activations", nargs="+", default=["swiglu", "polynorm"])
    p.add_argument("--backend", default="auto", help="activation_backend for polynorm/polyrelu")
    p.add_argument("--expert-impl", default="auto")
    p.add_argument("--precision", choices=["bf16", "autocast"], default="bf16")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak (MFU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny model (d 64, 2 layers, 8 experts)")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)

    device = pick_device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.d_model, args.n_heads, args.experts, args.top_k = 64, 4, 8, 2
        args.swiglu_hidden, args.vocab, args.seq, args.batch = 32, 512, 64, 2
        args.layers = args.layers if args.layers != "auto" else "2"
    if not gpu and args.precision == "bf16" and not args.quick:
        print("# note: bf16 parameters on CPU are slow; --precision autocast may be fairer there")
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    iters = args.iters or (10 if gpu else 2)

    env = environment(device)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_rev']}")
    if args.layers == "auto":
        candidates = [16, 12, 8, 6, 4, 2, 1]
        n_layers = next((n for n in candidates if fits(args, device, n)), None)
        if n_layers is None:
            raise SystemExit("not even one layer fits; lower --batch or --seq")
    else:
        n_layers = int(args.layers)
    print(f"# {n_layers} layers, batch {args.batch} x {args.seq}, precision {args.precision}")

    results = []
    for act in args.activations:
        row = run(args, make_config(args, act, n_layers), device, warmup, iters)
        free(device)
        results.append(row)
        print(f"  {act:9s} step {row['step_ms']:9.1f} ms  {row['tokens_per_s']:10.0f} tok/s", flush=True)

    base = next((r["step_ms"] for r in results if r["activation"] == "swiglu"), None)
    for r in results:
        r["vs_swiglu"] = r["step_ms"] / base if base else None
    cols = [
        ("activation", "activation", ""), ("hidden", "h", "d"), ("layers", "layers", "d"),
        ("params_B", "params B", ".2f"), ("active_params_B", "active B", ".2f"),
        ("fwd_ms", "fwd ms", ".1f"), ("bwd_ms", "bwd ms", ".1f"), ("opt_ms", "optim ms", ".1f"),
        ("step_ms", "step ms", ".1f"), ("vs_swiglu", "x SwiGLU", ".3f"),
        ("tokens_per_s", "tokens/s", ".0f"), ("tflops", "TFLOP/s", ".1f"), ("mfu_pct", "MFU %", ".1f"),
    ]  # fmt: skip
    if gpu:
        cols.append(("peak_gib", "peak GiB", ".1f"))
    print()
    print(format_table(results, cols))
    name = args.name or ("train_step_" + ("gpu" if gpu else "cpu") + ("_quick" if args.quick else ""))
    settings = {k: v for k, v in vars(args).items() if k != "name"}
    settings.update(n_layers=n_layers, warmup=warmup, iters=iters,
                    peak_tflops=peak_tflops(device, args.peak_tflops))  # fmt: skip
    path = write_json(name, {"benchmark": "train_step", "env": env, "settings": settings, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
