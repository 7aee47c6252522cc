#!/usr/bin/env python
"""Sparse upcycling (OLMoE paper, sec. 4.1.4): a dense checkpoint -> an MoE checkpoint.

    python scripts/upcycle.py runs/dense OUT --num_experts 64 --top_k 8 [--renormalize] [--seed 0]
    python scripts/train.py OUT/config.yaml --save_folder=runs/upcycled [--key=value ...]

The checkpoint (save folder, stepN or unsharded directory) must have ``model.block_type: dense``.
Every expert of the MoE model is a copy of the dense FFN (with its PolyNorm/PolyReLU
coefficients; ``--activation_per_expert`` gives each expert its own copy), the router is drawn
fresh from ``--seed`` with training's init, everything else is copied (see moe_model/upcycle.py).

At step 0, with ``--renormalize`` the upcycled model computes exactly what the dense model does;
without it (OLMoE's unnormalised top-k weights) each token's FFN output is scaled by the summed
probability of its top-k experts.

Writes ``OUT/model/`` (model-only torch.distributed.checkpoint) and ``OUT/config.yaml``: the dense
run's config (``--key=value`` overrides apply) with the MoE model and ``load_path`` set, so
training continues from it at step 0 with a fresh optimizer (keep a warm-up). Tensors stream one
at a time; OUT appears only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_model.hf import check_against_config
from moe_model.hf.files import atomic_output_dir
from moe_model.upcycle import upcycle_config, upcycle_plan
from olmo.checkpoint_io import find_config, open_checkpoint, save_model_dcp
from olmo.cli import run_cli
from olmo.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="dense save folder, stepN or unsharded directory")
    parser.add_argument("out_dir", help="output directory (model/ + config.yaml); must not exist yet")
    parser.add_argument("--num_experts", type=int, required=True, help="experts per MoE layer E")
    parser.add_argument("--top_k", type=int, required=True, help="experts per token K")
    parser.add_argument("--renormalize", action="store_true",
                        help="renormalise the top-k weights to sum to 1 (then step 0 equals the "
                             "dense model); OLMoE does not")
    parser.add_argument("--activation_per_expert", action="store_true",
                        help="one PolyNorm/PolyReLU coefficient set per expert (copies of the dense one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh router weights")
    args, overrides = parser.parse_known_args(argv)
    source = open_checkpoint(args.checkpoint)
    cfg = load_config(find_config(args.checkpoint), overrides)
    check_against_config(source, cfg.model, "the dense checkpoint")
    moe = upcycle_config(cfg.model, args.num_experts, args.top_k, args.renormalize,
                         args.activation_per_expert)
    out = Path(args.out_dir).resolve()
    cfg.model = moe
    cfg.load_path = str(out / "model")
    with atomic_output_dir(out) as tmp:
        save_model_dcp(upcycle_plan(source, moe, args.seed), cfg.to_yaml(), tmp)
    print(f"upcycled {args.checkpoint} ({cfg.model.activation_type}, {args.num_experts} experts, "
          f"top-{args.top_k}, {moe.num_params():,d} params) -> {out / 'model'}")
    print(f"continue training: python scripts/train.py {out}/config.yaml --save_folder=NEW_FOLDER")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
