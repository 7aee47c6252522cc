#!/usr/bin/env python
"""Import a Hugging Face directory into a training checkpoint that training continues from.

    python scripts/convert_from_hf.py path/to/OLMoE-1B-7B-0924 imported/ --base_config configs/olmoe-1b-7b-swiglu.yaml
    python scripts/convert_from_hf.py hf/tiny-polynorm imported/ [--base_config configs/tiny.yaml]
    python scripts/train.py imported/config.yaml --save_folder=runs/continued --data.paths=[...]

Reads transformers' native OLMoE directories (``model_type: olmoe``, e.g. a downloaded
allenai/OLMoE-1B-7B-0924: SwiGLU experts, whose per-expert gate/up/down matrices become this
repo's fused ``w_in_EDH`` [gate | up] and ``w_out_EHD``) and this repo's own exports (``polymoe``,
any activation). OLMoE config fields that this model cannot represent (clip_qkv, attention
biases, RoPE scaling, tied embeddings, grouped-query attention) are refused with the field named.
The tokenizer vocabulary is taken from ``tokenizer_vocab_size`` or the directory's
tokenizer.json (50280 for OLMoE), the embedding rows from ``vocab_size`` (50304).

Writes ``imported/model/`` (a torch.distributed.checkpoint holding the model weights only:
olmo-core's model-only checkpoint form) and ``imported/config.yaml``: the base config
(``--base_config``, else the defaults; ``--key=value`` overrides apply) with its ``model`` section
replaced by the imported model and ``load_path`` pointing at ``imported/model``. Weights are
stored in float32 (training's master weights) unless ``--dtype`` says otherwise; bf16 -> fp32 is
exact, so exporting back with ``--dtype bfloat16`` gives the original bytes. Training from it
starts at step 0 with a fresh AdamW state, so keep a warm-up (``scheduler.t_warmup``): the first
updates of a fresh AdamW are sign-like and large, which the warm-up tames. ``--unsharded`` also
writes ``model.safetensors``. Tensors stream one at a time; ``imported/`` appears only when
complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moe_model.hf import hf_import_plan
from moe_model.hf.files import atomic_output_dir
from olmo.checkpoint_io import save_model_dcp, save_unsharded
from olmo.cli import run_cli
from olmo.config import load_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "keep": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", help="native OLMoE directory or one written by convert_to_hf.py")
    parser.add_argument("out_dir", help="output directory (model/ + config.yaml); must not exist yet")
    parser.add_argument("--base_config", default=None,
                        help="training YAML whose non-model settings the written config.yaml keeps")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the written weights (keep = as stored in hf_dir)")
    parser.add_argument("--unsharded", action="store_true", help="also write model.safetensors")
    args, overrides = parser.parse_known_args(argv)
    model_config, plan = hf_import_plan(args.hf_dir, DTYPES[args.dtype])
    cfg = load_config(args.base_config, overrides)
    out = Path(args.out_dir).resolve()
    cfg.model = model_config
    cfg.load_path = str(out / "model")
    with atomic_output_dir(out) as tmp:
        save_model_dcp(plan, cfg.to_yaml(), tmp)
        if args.unsharded:
            save_unsharded(plan, cfg.to_yaml(), tmp)
    print(f"imported {args.hf_dir} ({model_config.activation_type}, "
          f"{model_config.num_params():,d} params) -> {out / 'model'}")
    print(f"continue training: python scripts/train.py {out}/config.yaml --save_folder=NEW_FOLDER "
          "[--data.paths=...] (fresh optimizer; keep scheduler.t_warmup > 0)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
