#!/usr/bin/env python
"""Import an exported Hugging Face directory back into a training checkpoint.

    python scripts/convert_from_hf.py hf/tiny-polynorm imported/ [--base_config configs/tiny.yaml]
    python scripts/train.py imported/config.yaml --save_folder=runs/continued --data.paths=[...]

Writes ``imported/model/`` (a torch.distributed.checkpoint holding the model weights only:
olmo-core's model-only checkpoint form) and ``imported/config.yaml``: the base config
(``--base_config``, else the defaults) with its ``model`` section replaced by the imported model
and ``load_path`` pointing at ``imported/model``. Training from it starts at step 0 with a fresh AdamW state, so keep a warm-up
(``scheduler.t_warmup``): the first updates of a fresh AdamW are sign-like and large, which the
warm-up tames. Pass ``--unsharded`` to also write ``model.safetensors`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_model.config import ConfigError  # noqa: E402
from moe_model.hf import read_hf_dir  # noqa: E402
from olmo.checkpoint_io import save_model_dcp, save_unsharded  # noqa: E402
from olmo.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", help="directory written by scripts/convert_to_hf.py")
    parser.add_argument("out_dir", help="output directory (model/ + config.yaml)")
    parser.add_argument("--base_config", default=None,
                        help="training YAML whose non-model settings the written config.yaml keeps")
    parser.add_argument("--unsharded", action="store_true", help="also write model.safetensors")
    args, overrides = parser.parse_known_args(argv)
    try:
        state, model_config = read_hf_dir(args.hf_dir)
        cfg = load_config(args.base_config, overrides)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out_dir).resolve()
    cfg.model = model_config
    cfg.load_path = str(out / "model")
    try:
        model_dir = save_model_dcp(state, cfg.to_yaml(), out)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.unsharded:
        save_unsharded(state, cfg.to_yaml(), out)
    print(f"imported {args.hf_dir} ({model_config.activation_type}) -> {model_dir}")
    print(f"continue training: python scripts/train.py {out}/config.yaml --save_folder=NEW_FOLDER "
          "[--data.paths=...] (fresh optimizer; keep scheduler.t_warmup > 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
