#!/usr/bin/env python
"""Cost of document masking (model.document_masking) on this CPU: training step and attention.

Two measurements, each without masking (OLMoE: attention across documents) and with it (sdpa
backend: a dense same-document causal mask), on the same tokens with EOS placed so documents
average the given length:

- step: document ids from EOS + forward + CE and auxiliary losses + backward + AdamW of the
  config's model, the trainer's work per micro-batch (the config's tokens per micro-batch at
  each sequence length);
- attention: the attention kernel alone (forward + backward, the config's heads), where the
  mask's cost is not diluted by the MoE layers.

Variants are interleaved round-robin so that load from other processes hits them alike;
medians and the ratio to the unmasked run are printed and written to
benchmarks/results/doc_masking_cpu.json. ``--quick`` shrinks the model (``QUICK_OVERRIDES``,
before the command line's) and the sequences.

    python scripts/bench_doc_masking.py [--config configs/tiny.yaml] [--seq 128 1024]
        [--doc-len 32 256] [--iters 20] [--key=value ...]
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F
from bench_common import (
    REPO,
    Benchmark,
    Run,
    median,
    repo_relative,
    run_benchmark,
    time_interleaved,
)

from moe_model.attention import build_document_mask, document_ids
from olmo.config import load_config

MASKING = ("off", "on (sdpa)")


def make_step(model_cfg, batch_BS: torch.Tensor, eos: int | None):
    """One training step of the model on the batch; eos=None runs without document masking."""
    torch.manual_seed(0)
    model = model_cfg.build(init_device="cpu")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    inputs, targets = batch_BS[:, :-1], batch_BS[:, 1:]

    def step():
        out = model(inputs) if eos is None else model(inputs, document_ids(inputs, eos))
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        (ce + out.lb_loss + out.z_loss).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def make_attention(model_cfg, batch_BS: torch.Tensor, eos: int | None):
    """Attention alone, forward + backward, on random q, k, v of the config's heads."""
    b, s = batch_BS.shape[0], batch_BS.shape[1] - 1
    gen = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(b, model_cfg.n_heads, s, model_cfg.head_dim, generator=gen,
                           requires_grad=True) for _ in range(3))  # fmt: skip
    inputs = batch_BS[:, :-1]

    def step():
        if eos is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = build_document_mask(document_ids(inputs, eos), "sdpa").attend(q, k, v)
        out.sum().backward()
        for t in (q, k, v):
            t.grad = None

    return step


def token_batch(batch: int, seq: int, eos: int, doc_len: int) -> torch.Tensor:
    """Random tokens below EOS with an EOS every doc_len tokens on average (geometric gaps)."""
    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, eos, (batch, seq + 1), generator=gen)
    ids[torch.rand(batch, seq + 1, generator=gen) < 1 / doc_len] = eos
    return ids


QUICK_OVERRIDES = [
    "--model.n_layers=1",
    "--model.activation_backend=eager",
    "--model.vocab_size=512",
    "--model.embedding_size=512",
    "--data.eos_token_id=511",
    "--device_train_microbatch_size=2",
]


def add_arguments(p) -> None:
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--seq", type=int, nargs="+", default=None,
                   help="sequence lengths (default 128 1024; --quick: 32)")
    p.add_argument("--doc-len", type=int, nargs="+", default=None,
                   help="mean document lengths, each below the sequence length (default 32 256; "
                        "--quick: 8)")  # fmt: skip


def setup(run: Run) -> None:
    if run.quick:
        run.overrides = QUICK_OVERRIDES + run.overrides
    seq = run.args.seq or ([32] if run.quick else [128, 1024])
    doc_len = run.args.doc_len or ([8] if run.quick else [32, 256])
    run.settings.update(config=repo_relative(run.args.config), overrides=run.overrides,
                        seq=seq, doc_len=doc_len, threads=torch.get_num_threads())  # fmt: skip


def measure(run: Run):
    cfg = load_config(run.args.config, run.overrides)
    base, eos = cfg.model, cfg.data.eos_token_id
    tokens = cfg.device_train_microbatch_size * base.max_sequence_length
    steps = {}
    for seq in run.settings["seq"]:
        batch = max(1, tokens // seq)
        plain = dataclasses.replace(base, max_sequence_length=seq)
        masked = dataclasses.replace(plain, document_masking=True, document_masking_backend="sdpa")
        for doc_len in [d for d in run.settings["doc_len"] if d < seq]:
            ids = token_batch(batch, seq, eos, doc_len)
            for what, make in (("attention", make_attention), ("step", make_step)):
                steps[(what, seq, batch, doc_len, MASKING[0])] = make(plain, ids, None)
                steps[(what, seq, batch, doc_len, MASKING[1])] = make(masked, ids, eos)
    first, times = time_interleaved(steps, warmup=run.warmup, iters=run.iters)
    for key in sorted(steps):
        what, seq, batch, doc_len, masking = key
        yield {"what": what, "seq": seq, "batch": batch, "doc_len": doc_len, "masking": masking,
               "first_s": first[key], "median_ms": median(times[key]), "ms_all": times[key]}  # fmt: skip


def ratios_to_unmasked(run: Run, rows: list[dict]) -> None:
    def case(r):
        return r["what"], r["seq"], r["doc_len"]

    off = {case(r): r["median_ms"] for r in rows if r["masking"] == MASKING[0]}
    for r in rows:
        r["ratio"] = r["median_ms"] / off[case(r)]


BENCHMARK = Benchmark(
    name="doc_masking",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    finish=ratios_to_unmasked,
    columns=[
        ("what", "timed", ""),
        ("seq", "seq", "d"),
        ("batch", "batch", "d"),
        ("doc_len", "mean doc", "d"),
        ("masking", "masking", ""),
        ("median_ms", "median ms", ".1f"),
        ("ratio", "vs off", ".3f"),
    ],  # fmt: skip
    devices=("cpu",),
    # The first warm-up call is timed on its own (first_s): for compile it is the compilation.
    timing={"cpu": (3, 20), "quick": (1, 2)},
    config_overrides=True,
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
