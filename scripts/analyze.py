#!/usr/bin/env python
"""Analyse a checkpoint as the paper does, writing one figure per analysis.

    python scripts/analyze.py runs/tiny-polynorm [--out DIR] [--data 'glob'] [--sequences 32]

CHECKPOINT is a save folder (latest step), a stepN directory or its model_and_optim/. Writes
to --out (default: CHECKPOINT/analysis): effective_rank.png (expert weights, per layer),
layer_similarity.png (hidden-state cosine similarity between layers on validation text),
routing.png (per-layer expert load and routing entropy), activation_coefficients.png
(PolyNorm/PolyReLU coefficients per layer) and analysis.json with the numbers.
Validation text: --data, else the run config's first data.validation set.

    python scripts/analyze.py --routing-trace runs/tiny-polynorm/routing/step100.pt [--out DIR]

With --routing-trace (repeatable: the rank files of one step) and no checkpoint: the expert load
and overload factor per layer of that traced training step (routing_trace_stepN.png and .json,
default --out: the trace's folder), and a per-layer summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olmo.analysis import analyze, validation_tokens, write_figures
from olmo.checkpoint_io import load_checkpoint, resolve_checkpoint
from olmo.cli import run_cli
from olmo.data import resolve_dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--routing-trace", action="append", default=None,
                        help="a routing trace file (repeatable: one step's ranks)")  # fmt: skip
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", default=None, help="config.yaml (default: the run's)")
    parser.add_argument("--data", action="append", default=None, help="token files/globs (repeatable)")
    parser.add_argument("--sequences", type=int, default=32, help="validation sequences to run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args(argv)
    if args.routing_trace:
        return run_cli(lambda: _analyze_trace(args))
    if args.checkpoint is None:
        parser.error("give a checkpoint, or --routing-trace")
    return run_cli(lambda: _analyze(args))


def _analyze_trace(args) -> int:
    from olmo.analysis import trace_load, write_trace_figure
    from olmo.routing_trace import load_trace, summary

    traces = [load_trace(path) for path in args.routing_trace]
    for trace in traces:
        print(summary(trace))
    out = Path(args.out) if args.out else Path(args.routing_trace[0]).parent
    written = write_trace_figure(trace_load(traces), out)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _analyze(args) -> int:
    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg = load_checkpoint(args.checkpoint, args.device, args.config)
    paths = args.data or (next(iter(cfg.data.validation.values())) if cfg.data.validation
                          else list(cfg.data.paths))
    dtype = resolve_dtype(cfg.data.dtype, cfg.model.vocab_size)
    ids = validation_tokens(paths, cfg.model.max_sequence_length, args.sequences, dtype)
    result = analyze(model, ids, batch_size=args.batch_size)
    result["checkpoint"] = str(ckpt)
    out = Path(args.out) if args.out else ckpt.parent.parent / "analysis"
    written = write_figures(result, out, title=f"{cfg.run_name} {ckpt.parent.name}")
    ranks = {k: [round(sum(r) / len(r), 1) for r in v] for k, v in result["effective_rank"].items()}
    print(f"effective rank (mean over experts, per layer): {ranks}")
    print(f"routing entropy per layer (max {result['max_routing_entropy']:.3f}): "
          f"{[round(e, 3) for e in result['routing_entropy']]}")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
