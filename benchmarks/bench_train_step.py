"""Benchmark whole-model training steps on one device: tokens/s and MFU, SwiGLU vs PolyNorm.

OLMoE-1B-7B layer shapes (d 2048, 16 heads, 64 experts, top-8, vocab 50304, sequence 4096,
micro-batch 4) with as many layers as fit (``--layers auto`` tries 16, 12, 8, 6, 4, 2, 1 and
keeps the first that runs a step), at equal expert parameters (SwiGLU h=1024, PolyNorm
h=1536). One step = the train module's step (benchmarks/train_steps.py): ``train_batch`` (forward
and backward of cross-entropy + load-balancing + z-loss, olmo.objective) on one micro-batch,
then ``optim_step`` (clipping, schedule, AdamW), the module built as training builds it, in a
one-process group as torchrun starts it.

MFU = tokens/s * ModelConfig.num_flops_per_token(seq) / the device's peak FLOP/s in bf16
(active-parameter FLOPs, 6N + attention; the peak from olmo/flops.py, as the trainer's MFU:
the dense datasheet figure on GPU, a measured matmul rate on CPU; ``--peak-tflops`` overrides
it). ``--precision`` is the training config's: bf16 (``auto`` on GPU) runs the model as the
trainer does on one GPU (FSDP2 with bf16 parameters and fp32 gradient reduction; on CPU, where
one process is not sharded, bf16 autocast), fp32 (``auto`` on CPU) runs fp32 throughout.

``--config FILE`` takes the shapes from a training config instead (the small GPU configs: d 512,
12 layers, 32 experts top-4, micro-batch 16 x 2048); ``--compile`` compiles each block as the
trainer's ``compile: true`` does; ``--profile`` adds where the step's time goes.

    python -m benchmarks.bench_train_step                          # GPU
    python -m benchmarks.bench_train_step --config configs/small-gpu-swiglu.yaml --compile
    python -m benchmarks.bench_train_step --device cpu --quick     # smoke test on a tiny model
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist

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
from benchmarks.train_steps import build_train_module, step_phases
from moe_model.config import ModelConfig, equal_param_hidden_size
from olmo.config import TrainConfig, load_config
from olmo.flops import device_peak_flops


def make_config(args, act: str, n_layers: int) -> ModelConfig:
    hidden = (
        args.swiglu_hidden
        if act == "swiglu"
        else equal_param_hidden_size(args.swiglu_hidden, "swiglu", act)
    )
    return ModelConfig(
        d_model=args.d_model, n_layers=n_layers, n_heads=args.n_heads, activation_type=act,
        mlp_hidden_size=hidden, moe_num_experts=args.experts, moe_top_k=args.top_k,
        activation_backend=args.backend, moe_expert_impl=args.expert_impl,
        vocab_size=args.vocab, embedding_size=args.vocab, max_sequence_length=args.seq,
    )  # fmt: skip


def train_config(args, model: ModelConfig, device: torch.device) -> TrainConfig:
    """The training config of a step on one micro-batch of ``args.batch`` sequences; the
    weights drawn on the GPU there (seconds per model instead of a serial CPU draw)."""
    return TrainConfig(
        model=model, precision=args.precision, compile=args.compile,
        global_train_batch_size=args.batch, device_train_microbatch_size=args.batch,
        init_on_device=device.type == "cuda",
    )  # fmt: skip


def one_process_group(device: torch.device) -> None:
    """A process group of this one process, as torchrun gives training (so one GPU runs FSDP2,
    as the trainer does there)."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def run_steps(
    args, cfg: ModelConfig, device: torch.device, warmup: int, iters: int, peak: float | None,
    profile: bool = False,
) -> dict:  # fmt: skip
    module = build_train_module(train_config(args, cfg, device), device)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), device=device,
                                        generator=gen)}  # fmt: skip
    phases = step_phases(module, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd_ms, opt_ms = time_phases(phases, device=device, warmup=warmup, iters=iters)
    sync(device)
    step_ms = [a + b for a, b in zip(fwd_bwd_ms, opt_ms)]
    tokens = args.batch * args.seq
    tps = tokens / (median(step_ms) * 1e-3)
    flops_tok = cfg.num_flops_per_token(args.seq)
    row = {
        "activation": cfg.activation_type,
        "hidden": cfg.mlp_hidden_size,
        "layers": cfg.n_layers,
        "params_B": cfg.num_params() / 1e9,
        "active_params_B": cfg.num_active_params() / 1e9,
        "fwd_bwd_ms": median(fwd_bwd_ms),
        "opt_ms": median(opt_ms),
        "step_ms": median(step_ms),
        "tokens_per_s": tps,
        "tflops": tps * flops_tok / 1e12,
        "mfu_pct": 100 * tps * flops_tok / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "step_ms_all": step_ms,
    }
    if profile:
        row["profile"] = profile_step(phases, device)
        print(format_profile(f"{cfg.activation_type}, {cfg.n_layers} layers", row["profile"]))
    return row


def free(device: torch.device) -> None:
    """Release the last model's memory (call after run_steps() returned, when its frame is gone)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(args, device, n_layers: int) -> bool:
    """Whether the larger (by activation memory) of the compared models runs 1 step."""
    try:
        for act in args.activations:
            run_steps(args, make_config(args, act, n_layers), device, warmup=1, iters=1, peak=None)
            free(device)
        return True
    except torch.OutOfMemoryError:
        pass
    # Out of the except block: until it ends, the exception's traceback holds the failed step's
    # frames, and with them the model and its activations.
    free(device)
    return False


def add_arguments(p) -> None:
    p.add_argument(
        "--layers", default="auto", help="a number, or 'auto': the most of 16,12,8,6,4,2,1 that fit"
    )
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
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="the training config's precision (auto: bf16 on GPU, fp32 on CPU)")  # fmt: skip
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="override the device's peak (MFU)"
    )
    p.add_argument("--config", help="a training YAML whose model shapes and micro-batch replace "
                   "the shape flags (its other model options are not used)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile each block (dynamic=False)")
    add_profile_flag(p)


def setup(run: Run) -> None:
    args, device = run.args, run.device
    if args.config:
        cfg = load_config(args.config, [])
        m = cfg.model
        args.d_model, args.n_heads, args.experts, args.top_k = (
            m.d_model, m.n_heads, m.moe_num_experts, m.moe_top_k)  # fmt: skip
        args.swiglu_hidden = equal_param_hidden_size(m.mlp_hidden_size, m.activation_type, "swiglu")
        args.vocab, args.seq, args.batch = (
            m.embedding_size, m.max_sequence_length, cfg.device_train_microbatch_size)  # fmt: skip
        args.layers = str(m.n_layers) if args.layers == "auto" else args.layers
    if run.quick:  # tiny model: d 64, 2 layers, 8 experts
        args.d_model, args.n_heads, args.experts, args.top_k = 64, 4, 8, 2
        args.swiglu_hidden, args.vocab, args.seq, args.batch = 32, 512, 64, 2
        args.layers = args.layers if args.layers != "auto" else "2"
    one_process_group(device)
    if args.layers == "auto":
        candidates = [16, 12, 8, 6, 4, 2, 1]
        args.layers = next((n for n in candidates if fits(args, device, n)), None)
        if args.layers is None:
            raise SystemExit("not even one layer fits; lower --batch or --seq")
    args.layers = int(args.layers)
    # MFU against the bf16 peak whatever the precision, as the trainer's.
    override = args.peak_tflops * 1e12 if args.peak_tflops is not None else None
    peak = device_peak_flops(device, torch.bfloat16, override)
    keys = ("config", "d_model", "n_heads", "experts", "top_k", "swiglu_hidden", "vocab", "seq",
            "batch", "activations", "backend", "expert_impl", "precision", "compile")  # fmt: skip
    run.settings.update({k: getattr(args, k) for k in keys}, n_layers=args.layers,
                        peak_tflops=peak / 1e12 if peak else None)  # fmt: skip
    peak_text = f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown (no MFU)"
    print(
        f"# {args.layers} layers, batch {args.batch} x {args.seq}, precision {args.precision}, "
        f"{'compiled blocks, ' if args.compile else ''}peak {peak_text}"
    )


def measure(run: Run):
    args, peak = run.args, run.settings["peak_tflops"]
    for act in args.activations:
        row = run_steps(args, make_config(args, act, args.layers), run.device, run.warmup, run.iters,
                        peak * 1e12 if peak else None, profile=args.profile)  # fmt: skip
        free(run.device)
        yield row


def columns(run: Run) -> list:
    cols = [
        ("activation", "activation", ""), ("hidden", "h", "d"), ("layers", "layers", "d"),
        ("params_B", "params B", ".2f"), ("active_params_B", "active B", ".2f"),
        ("fwd_bwd_ms", "fwd+bwd ms", ".1f"), ("opt_ms", "optim ms", ".1f"),
        ("step_ms", "step ms", ".1f"), ("vs_swiglu", "x SwiGLU", ".3f"),
        ("tokens_per_s", "tokens/s", ".0f"), ("tflops", "TFLOP/s", ".1f"), ("mfu_pct", "MFU %", ".1f"),
    ]  # fmt: skip
    return cols + [("peak_gib", "peak GiB", ".1f")] if run.gpu else cols


BENCHMARK = Benchmark(
    name="train_step",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    finish=lambda run, rows: ratio_to_reference(
        rows, "step_ms", "vs_swiglu", lambda r: r["activation"] == "swiglu"
    ),
    columns=columns,
    progress=lambda r: (
        f"{r['activation']:9s} step {r['step_ms']:9.1f} ms  {r['tokens_per_s']:10.0f} tok/s"
    ),
    timing={"cuda": (3, 10), "cpu": (1, 2), "quick": (1, 2)},
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
