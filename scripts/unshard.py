#!/usr/bin/env python
"""Unshard a training checkpoint into one safetensors file plus its config.

    python scripts/unshard.py runs/tiny-polynorm OUT_DIR            # latest stepN of a run
    python scripts/unshard.py runs/tiny-polynorm/step150 OUT_DIR --dtype bfloat16

OUT_DIR gets ``model.safetensors`` (names as in ``MoETransformer.state_dict()``, the model config
also in the file's metadata) and ``config.yaml`` (the run's TrainConfig). Runs on CPU in one
process; no process group and no GPU needed, whatever the number of ranks that saved it. Reads
and writes one tensor at a time; OUT_DIR must not exist yet and appears only when complete.
"""

from __future__ import annotations

import argparse
import sys

import torch

from olmo.checkpoint_io import resolve_checkpoint, unshard
from olmo.cli import run_cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="save folder, stepN directory or model_and_optim directory")
    parser.add_argument("out_dir", help="output directory (model.safetensors + config.yaml)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating tensors (default: keep the saved dtype)")
    args = parser.parse_args(argv)
    source = resolve_checkpoint(args.checkpoint)
    out = unshard(source, args.out_dir, DTYPES.get(args.dtype))
    print(f"unsharded {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
