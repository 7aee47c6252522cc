#!/usr/bin/env python
"""Replay a step's routing: the loss of its tokens with the recorded routing and with fresh.

    python scripts/replay_routing.py RUN --step N [--trace PATH] [--checkpoint DIR] [--rank R]

RUN is a save folder whose run traced step N (``trace.routing_steps``). Weights: --checkpoint
(any checkpoint form; e.g. another run of the same shape), else RUN's step{N-1} checkpoint, the
weights step N's forward ran with, when it exists, else RUN's newest. --trace replays another
run's trace (same model shape and sequence length, else a one-line error before any work).
Prints both losses and the share of routing slots the model's own top-k agrees with; --json
writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from olmo.cli import run_cli

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="save folder of the traced run")
    parser.add_argument("--step", type=int, required=True, help="traced step to replay")
    parser.add_argument("--rank", type=int, default=0, help="whose trace, under data parallelism")
    parser.add_argument("--trace", default=None, help="trace file (default RUN/routing/stepN.pt)")
    parser.add_argument("--checkpoint", default=None, help="weights (default: see above)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per forward (default: the run's micro-batch size)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "float64"], default="fp32")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    return run_cli(lambda: _replay(args))


def _default_trace(run: Path, step: int, rank: int) -> Path:
    from olmo.routing_trace import trace_path

    single = trace_path(run, step)
    return single if single.is_file() else trace_path(run, step, rank, world_size=2)


def _default_checkpoint(run: Path, step: int) -> Path:
    from olmo.checkpoint_io import resolve_checkpoint

    before = run / f"step{step - 1}"
    return resolve_checkpoint(before if before.is_dir() else run)


def _replay(args) -> int:
    import torch

    from moe_model.errors import ConfigError
    from olmo.checkpoint_io import load_checkpoint, load_train_config, resolve_checkpoint
    from olmo.routing_replay import replay
    from olmo.routing_trace import check_replayable, load_trace

    run = Path(args.run)
    if args.step < 1:
        raise ConfigError(f"--step={args.step} must be >= 1")
    trace_file = Path(args.trace) if args.trace else _default_trace(run, args.step, args.rank)
    ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else _default_checkpoint(run, args.step)
    # Everything that can be refused is checked before the weights are read.
    trace = load_trace(trace_file)
    cfg = load_train_config(ckpt)
    check_replayable(trace, cfg.model, f"routing trace {str(trace_file)!r}")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model, cfg = load_checkpoint(ckpt, args.device, dtype=dtype)
    result = replay(model, trace, args.batch_size or cfg.device_train_microbatch_size)
    print(f"trace {trace_file} (step {trace.step}, rank {trace.rank}), weights {ckpt}")
    print(f"{result.tokens} tokens: loss with fresh routing {result.loss_fresh:.6f}, with the "
          f"recorded routing {result.loss_recorded:.6f} (difference "
          f"{result.loss_recorded - result.loss_fresh:+.6f}); the model's own top-k holds "
          f"{result.expert_agreement:.1%} of the recorded experts")  # fmt: skip
    if args.json:
        payload = {**result.to_dict(), "trace": str(trace_file), "checkpoint": str(ckpt)}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
