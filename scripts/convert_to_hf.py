#!/usr/bin/env python
"""Export a checkpoint to a Hugging Face transformers directory.

    python scripts/convert_to_hf.py runs/tiny-polynorm hf/tiny-polynorm [--dtype bfloat16] [--verify]

The checkpoint is a save folder (latest stepN), a stepN directory or an unsharded directory
(scripts/unshard.py). The output loads with

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
    AutoTokenizer.from_pretrained(OUT)

and holds every parameter, including each layer's PolyNorm/PolyReLU coefficients. ``--verify``
reloads the export through transformers and compares its logits with the training model's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moe_model.hf import export_hf  # noqa: E402
from olmo.checkpoint_io import (  # noqa: E402
    CheckpointError,
    load_model_config,
    load_state_dict,
    resolve_checkpoint,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def verify(checkpoint: Path, out_dir: Path, atol: float = 1e-4) -> float:
    """Max |logit difference| between the training model and the export (fp32, random ids)."""
    from transformers import AutoModelForCausalLM

    from olmo.checkpoint_io import load_model

    ours = load_model(checkpoint, dtype=torch.float32)
    theirs, info = AutoModelForCausalLM.from_pretrained(
        out_dir, trust_remote_code=True, torch_dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"transformers did not load the export cleanly: {bad}")
    gen = torch.Generator().manual_seed(0)
    seq = min(16, ours.config.max_sequence_length)
    ids = torch.randint(0, ours.config.vocab_size, (2, seq), generator=gen)
    with torch.no_grad():
        diff = (ours(ids).logits - theirs.eval()(ids).logits).abs().max().item()
    if diff > atol:
        raise RuntimeError(f"exported logits differ from the training model's by {diff:.3g} > {atol}")
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="save folder, stepN, model_and_optim or unsharded directory")
    parser.add_argument("out_dir", help="output Hugging Face directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating tensors (default: keep the saved dtype, fp32 for training)")
    parser.add_argument("--tokenizer", default="default",
                        help="tokenizer.json to ship; 'default' = the OLMo tokenizer from ai2-olmo-eval; "
                             "'none' = no tokenizer files")
    parser.add_argument("--max_shard_size", default="5GB", help="split weights into files of this size")
    parser.add_argument("--verify", action="store_true",
                        help="reload through transformers and compare logits (loads the model twice)")
    args = parser.parse_args(argv)
    try:
        source = resolve_checkpoint(args.checkpoint)
        config = load_model_config(source)
        state = load_state_dict(source)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    if (out / "config.json").exists():
        print(f"error: {str(out)!r} already holds a model (config.json)", file=sys.stderr)
        return 2
    tokenizer = None if args.tokenizer == "none" else args.tokenizer
    export_hf(state, config, out, tokenizer_json=tokenizer, dtype=DTYPES.get(args.dtype),
              max_shard_size=args.max_shard_size)
    print(f"exported {source} ({config.activation_type}, {config.num_params():,d} params) -> {out}")
    if args.verify:
        print(f"verified: max |logit difference| {verify(source, out):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
