#!/usr/bin/env python
"""Training-step cost of document masking (model.document_masking) on this CPU.

Two measurements, each without masking (OLMoE: attention across documents) and with it (sdpa
backend: a dense same-document causal mask), on the same tokens with EOS placed so documents
average the given length:

- step: document ids from EOS + forward + CE and auxiliary losses + backward + AdamW of the
  config's model, the trainer's work per micro-batch;
- attention: the attention kernel alone (forward + backward, the config's heads), where the
  mask's cost is not diluted by the MoE layers.

Variants are interleaved round-robin so load from other processes hits them alike; medians and
the ratio to the unmasked run are printed and written to benchmarks/results/doc_masking_cpu.json.

    python scripts/bench_doc_masking.py [--config configs/tiny.yaml] [--iters 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import environment, format_table, median, write_json  # noqa: E402

from moe_model.attention import build_document_mask, document_ids  # noqa: E402
from olmo.config import load_config  # noqa: E402


def make_step(model_cfg, batch_BS: torch.Tensor, eos: int | None):
    """A step closure; eos=None runs without document masking."""
    torch.manual_seed(0)
    model = model_cfg.build(init_device="cpu")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    inputs, targets = batch_BS[:, :-1], batch_BS[:, 1:]

    def step():
        doc = None if eos is None else document_ids(inputs, eos)
        out = model(inputs) if doc is None else model(inputs, doc)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        (ce + out.lb_loss + out.z_loss).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def make_attention(model_cfg, batch_BS: torch.Tensor, eos: int | None):
    """Attention alone, forward + backward, on q, k, v of the config's heads."""
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


def token_batch(batch: int, seq: int, vocab: int, eos: int, doc_len: int) -> torch.Tensor:
    """Random tokens with an EOS every doc_len tokens on average (geometric gaps)."""
    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, eos, (batch, seq + 1), generator=gen)
    ids[torch.rand(batch, seq + 1, generator=gen) < 1 / doc_len] = eos
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 1024],
                        help="sequence lengths; the micro-batch keeps seq x batch tokens of the config")
    parser.add_argument("--doc-len", type=int, nargs="+", default=[32, 256],
                        help="mean document lengths (shorter than the sequence)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()

    cfg = load_config(args.config)
    base, eos = cfg.model, cfg.data.eos_token_id
    tokens = cfg.device_train_microbatch_size * base.max_sequence_length
    variants = {}
    for seq in args.seq:
        batch = max(1, tokens // seq)
        plain = dataclasses.replace(base, max_sequence_length=seq)
        masked = dataclasses.replace(plain, document_masking=True, document_masking_backend="sdpa")
        for doc_len in [d for d in args.doc_len if d < seq]:
            ids = token_batch(batch, seq, base.vocab_size, eos, doc_len)
            for what, make in (("step", make_step), ("attention", make_attention)):
                variants[(what, seq, batch, doc_len, "off")] = make(plain, ids, None)
                variants[(what, seq, batch, doc_len, "on (sdpa)")] = make(masked, ids, eos)
    first = {}
    for key, step in variants.items():
        start = time.perf_counter()
        step()
        first[key] = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            step()
    times = {key: [] for key in variants}
    for _ in range(args.iters):
        for key, step in variants.items():
            start = time.perf_counter()
            step()
            times[key].append((time.perf_counter() - start) * 1e3)

    rows = []
    for (what, seq, batch, doc_len, masking), ms in sorted(times.items()):
        ref = median(times[(what, seq, batch, doc_len, "off")])
        rows.append({"what": what, "seq": seq, "batch": batch, "doc_len": doc_len,
                     "masking": masking, "first_s": first[(what, seq, batch, doc_len, masking)],
                     "median_ms": median(ms), "ratio": median(ms) / ref})  # fmt: skip
    print(f"{args.config}, document masking off vs on, {torch.get_num_threads()} threads")
    print(format_table(rows, [("what", "timed", ""), ("seq", "seq", "d"), ("batch", "batch", "d"),
                              ("doc_len", "mean doc", "d"), ("masking", "masking", ""),
                              ("median_ms", "median ms", ".1f"), ("ratio", "vs off", ".3f")]))
    path = write_json("doc_masking_cpu", {
        "env": environment(torch.device("cpu")), "rows": rows,
        "times_ms": {"/".join(map(str, k)): v for k, v in times.items()},
    }, args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
