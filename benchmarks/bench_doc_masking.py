#!/usr/bin/env python
"""Cost of document masking (model.document_masking): training step and attention, CPU or CUDA.

Two measurements, each without masking (OLMoE: attention across documents) and with it, on the
same tokens with EOS placed so documents average the given length. With masking: on CPU the
sdpa backend (a dense same-document causal mask); on CUDA also the flex backend (FlexAttention
with a block mask that skips the tiles outside every document), whose first call compiles.

- step: document ids from EOS + forward + CE and auxiliary losses + backward + AdamW of the
  config's model, the trainer's work per micro-batch (the config's tokens per micro-batch at
  each sequence length);
- attention: the attention kernel alone (forward + backward, the config's heads), where the
  mask's cost is not diluted by the MoE layers.

On CPU the variants are interleaved round-robin so that load from other processes hits them
alike; on CUDA each is timed with CUDA events after its warm-up, in bf16 parameters (as the
trainer's GPU default), with its peak memory. Medians and the ratio to the unmasked run are
printed and written to benchmarks/results/doc_masking_<cpu|gpu>.json. Defaults: CPU,
configs/tiny.yaml at seq 128 and 1024 with documents of 32 and 256 tokens; CUDA,
configs/small-gpu-swiglu.yaml (d_model 512, 8 heads of 64, 12 layers) at seq 4096 with
documents of 256 and 2048 tokens, the config's tokens per micro-batch (16 x 2048) in each.
``--quick`` shrinks the model (``QUICK_OVERRIDES``, before the command line's) and the
sequences.

    python -m benchmarks.bench_doc_masking [--device auto|cpu|cuda] [--config FILE] [--seq 4096]
        [--doc-len 256 2048] [--iters 20] [--key=value ...]
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_common import (
    REPO,
    Benchmark,
    Run,
    median,
    repo_relative,
    run_benchmark,
    sync,
    time_interleaved,
    time_phases,
)
from moe_model.attention import build_document_mask, document_ids
from moe_model.init import draw_on
from olmo.config import load_config
from olmo.objective import objective

OFF = "off"
BACKENDS = {"cpu": ("sdpa",), "cuda": ("sdpa", "flex")}
"""Document masking backends measured per device type (torch trains flex on CUDA only)."""


def masking_name(backend: str | None) -> str:
    return OFF if backend is None else f"on ({backend})"


def make_step(model_cfg, batch_BS: torch.Tensor, eos: int | None):
    """One training step of the model on the batch; eos=None runs without document masking.

    On CUDA in bf16 parameters (the trainer's GPU default), with its fused AdamW.
    """
    device = batch_BS.device
    torch.manual_seed(0)
    with draw_on(device):  # on the GPU: seconds per model instead of a serial CPU draw
        model = model_cfg.build(init_device=str(device))
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    optim = torch.optim.AdamW(
        model.parameters(), lr=1e-3, foreach=device.type != "cuda", fused=device.type == "cuda"
    )
    inputs, targets = batch_BS[:, :-1], batch_BS[:, 1:]

    def step():
        out = model(inputs) if eos is None else model(inputs, document_ids(inputs, eos))
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        objective(ce, out.lb_loss, out.z_loss).total.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def make_attention(model_cfg, batch_BS: torch.Tensor, eos: int | None):
    """Attention alone, forward + backward, on random q, k, v of the config's heads (bf16 on
    CUDA); the mask is built from the tokens in every call, as each forward of the model does."""
    b, s = batch_BS.shape[0], batch_BS.shape[1] - 1
    device = batch_BS.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(s)
    q, k, v = (torch.randn(b, model_cfg.n_heads, s, model_cfg.head_dim, generator=gen, device=device,
                           dtype=dtype, requires_grad=True) for _ in range(3))  # fmt: skip
    inputs = batch_BS[:, :-1]
    backend = model_cfg.document_masking_backend

    def step():
        if eos is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = build_document_mask(document_ids(inputs, eos), backend).attend(q, k, v)
        out.sum().backward()
        for t in (q, k, v):
            t.grad = None

    return step


def token_batch(batch: int, seq: int, eos: int, doc_len: int, device: torch.device) -> torch.Tensor:
    """Random tokens below EOS with an EOS every doc_len tokens on average (geometric gaps)."""
    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, eos, (batch, seq + 1), generator=gen)
    ids[torch.rand(batch, seq + 1, generator=gen) < 1 / doc_len] = eos
    return ids.to(device)


def time_on_cuda(makers: dict, device: torch.device, *, warmup: int, iters: int):
    """Each variant alone, built just before and freed after (so the peak is its own): its
    first call (s, compilation included), warm-up, then `iters` calls timed with CUDA events
    (ms), and its peak memory (MiB, model and optimizer state included). Keyed like ``makers``."""
    first, times, peak = {}, {}, {}
    for key, make in makers.items():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step = make()
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        first[key] = time.perf_counter() - start
        (times[key],) = time_phases(lambda step=step: [step], device=device,
                                    warmup=max(warmup - 1, 0), iters=iters)  # fmt: skip
        peak[key] = torch.cuda.max_memory_allocated(device) / 2**20
        del step
    return first, times, peak


QUICK_OVERRIDES = [
    "--model.n_layers=1",
    "--model.activation_backend=eager",
    "--model.vocab_size=512",
    "--model.embedding_size=512",
    "--data.eos_token_id=511",
    "--device_train_microbatch_size=2",
]


# Per device type: (config, sequence lengths, mean document lengths) when not given.
DEFAULTS = {
    "cpu": ("configs/tiny.yaml", [128, 1024], [32, 256]),
    "cuda": ("configs/small-gpu-swiglu.yaml", [4096], [256, 2048]),
}


def add_arguments(p) -> None:
    p.add_argument("--config", default=None,
                   help="training config whose model is measured (default: CPU configs/tiny.yaml, "
                        "CUDA configs/small-gpu-swiglu.yaml)")
    p.add_argument("--seq", type=int, nargs="+", default=None,
                   help="sequence lengths (default: CPU 128 1024, CUDA 4096; --quick: 32)")
    p.add_argument("--doc-len", type=int, nargs="+", default=None,
                   help="mean document lengths, each below the sequence length (default: CPU "
                        "32 256, CUDA 256 2048; --quick: 8)")  # fmt: skip


def setup(run: Run) -> None:
    if run.quick:
        run.overrides = QUICK_OVERRIDES + run.overrides
    config, seq, doc_len = DEFAULTS[run.device.type]
    if run.quick:
        seq, doc_len = [32], [8]
    config = run.args.config or str(REPO / config)
    run.settings.update(config=repo_relative(config), overrides=run.overrides,
                        seq=run.args.seq or seq, doc_len=run.args.doc_len or doc_len,
                        backends=list(BACKENDS[run.device.type]),
                        dtype="bfloat16" if run.gpu else "float32",
                        threads=torch.get_num_threads())  # fmt: skip


def measure(run: Run):
    cfg = load_config(REPO / run.settings["config"], run.overrides)
    base, eos = cfg.model, cfg.data.eos_token_id
    tokens = cfg.device_train_microbatch_size * base.max_sequence_length
    makers = {}  # built lazily: on CUDA one variant's model at a time
    for seq in run.settings["seq"]:
        batch = max(1, tokens // seq)
        plain = dataclasses.replace(base, max_sequence_length=seq)
        for doc_len in [d for d in run.settings["doc_len"] if d < seq]:
            ids = token_batch(batch, seq, eos, doc_len, run.device)
            for what, make in (("attention", make_attention), ("step", make_step)):
                makers[(what, seq, batch, doc_len, masking_name(None))] = functools.partial(
                    make, plain, ids, None
                )
                for backend in run.settings["backends"]:
                    masked = dataclasses.replace(
                        plain, document_masking=True, document_masking_backend=backend
                    )
                    makers[(what, seq, batch, doc_len, masking_name(backend))] = functools.partial(
                        make, masked, ids, eos
                    )
    peak = {}
    if run.gpu:
        first, times, peak = time_on_cuda(makers, run.device, warmup=run.warmup, iters=run.iters)
    else:
        steps = {key: make() for key, make in makers.items()}
        first, times = time_interleaved(steps, warmup=run.warmup, iters=run.iters)
    for key in sorted(makers):
        what, seq, batch, doc_len, masking = key
        row = {"what": what, "seq": seq, "batch": batch, "doc_len": doc_len, "masking": masking,
               "first_s": first[key], "median_ms": median(times[key]), "ms_all": times[key]}  # fmt: skip
        if key in peak:
            row["peak_mib"] = peak[key]
        yield row


def ratios_to_unmasked(run: Run, rows: list[dict]) -> None:
    def case(r):
        return r["what"], r["seq"], r["doc_len"]

    off = {case(r): r["median_ms"] for r in rows if r["masking"] == OFF}
    for r in rows:
        r["ratio"] = r["median_ms"] / off[case(r)]


def columns(run: Run) -> list:
    cols = [
        ("what", "timed", ""),
        ("seq", "seq", "d"),
        ("batch", "batch", "d"),
        ("doc_len", "mean doc", "d"),
        ("masking", "masking", ""),
        ("median_ms", "median ms", ".1f" if not run.gpu else ".2f"),
        ("ratio", "vs off", ".3f"),
    ]
    if run.gpu:
        cols += [("first_s", "first call s", ".1f"), ("peak_mib", "peak MiB", ".0f")]
    return cols


BENCHMARK = Benchmark(
    name="doc_masking",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    finish=ratios_to_unmasked,
    columns=columns,
    devices=("auto", "cpu", "cuda"),
    # The first warm-up call is timed on its own (first_s): for flex it is the compilation.
    timing={"cpu": (3, 20), "cuda": (3, 20), "quick": (1, 2)},
    config_overrides=True,
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
