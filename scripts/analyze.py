#!/usr/bin/env python
"""Analyse a checkpoint as the paper does, writing one figure per analysis.

    python scripts/analyze.py runs/tiny-polynorm [--out DIR] [--data 'glob'] [--sequences 32]

CHECKPOINT is a save folder (latest step), a stepN directory or its model_and_optim/. Writes
to --out (default: CHECKPOINT/analysis): effective_rank.png (expert weights, per layer),
layer_similarity.png (hidden-state cosine similarity between layers on validation text),
routing.png (per-layer expert load and routing entropy), activation_coefficients.png
(PolyNorm/PolyReLU coefficients per layer) and analysis.json with the numbers.
Validation text: --data, else the run config's first data.validation set.
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
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", default=None, help="config.yaml (default: the run's)")
    parser.add_argument("--data", action="append", default=None, help="token files/globs (repeatable)")
    parser.add_argument("--sequences", type=int, default=32, help="validation sequences to run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args(argv)
    return run_cli(lambda: _analyze(args))


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
