#!/usr/bin/env python
"""Export a checkpoint to a Hugging Face transformers directory.

    python scripts/convert_to_hf.py runs/tiny-swiglu hf/tiny-swiglu [--dtype bfloat16] [--verify]
    python scripts/convert_to_hf.py runs/tiny-polynorm hf/tiny-polynorm --format polymoe

The checkpoint is a save folder (latest stepN), a stepN directory or an unsharded directory
(scripts/unshard.py). ``--format auto`` (the default) writes SwiGLU MoE models -- OLMoE's
architecture -- as transformers' own ``OlmoeForCausalLM`` (no remote code: vLLM and other
OLMoE-aware tools load it as they load allenai/OLMoE-1B-7B-0924), and every other model
(PolyNorm, PolyReLU and their gated forms, ReLU, ReLU², GELU, dense blocks) with its own modeling code:

    AutoModelForCausalLM.from_pretrained(OUT)                           # olmoe
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)   # polymoe
    AutoTokenizer.from_pretrained(OUT[, trust_remote_code=True])

Every parameter is kept, including each layer's PolyNorm/PolyReLU coefficients. Tensors are
read and written one at a time, so exporting needs about one layer's expert tensor of memory,
not a copy of the model. ``--verify`` reloads the export through transformers (the whole model,
twice: ours and theirs) and compares logits before the directory is moved into place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moe_model.errors import ConversionError  # noqa: E402
from moe_model.hf import FORMATS, choose_format, export_hf  # noqa: E402
from olmo.checkpoint_io import load_model, load_model_config, open_checkpoint  # noqa: E402
from olmo.cli import run_cli  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def verify(checkpoint: str | Path, hf_dir: Path, atol: float = 1e-4) -> float:
    """Max |logit difference| between the training model and the export (fp32, random ids)."""
    from transformers import AutoModelForCausalLM

    ours = load_model(checkpoint, dtype=torch.float32)
    theirs, info = AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise ConversionError(f"transformers did not load the export cleanly: {bad}")
    gen = torch.Generator().manual_seed(0)
    seq = min(16, ours.config.max_sequence_length)
    ids = torch.randint(0, ours.config.vocab_size, (2, seq), generator=gen)
    with torch.no_grad():
        diff = (ours(ids).logits - theirs.eval()(ids).logits).abs().max().item()
    if not diff <= atol:
        raise ConversionError(f"exported logits differ from the training model's by {diff:.3g} > {atol}")
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="save folder, stepN, model_and_optim or unsharded directory")
    parser.add_argument("out_dir", help="output Hugging Face directory (must not exist yet)")
    parser.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                        help="olmoe: transformers' OlmoeForCausalLM (SwiGLU MoE only); polymoe: "
                             "trust_remote_code (any activation); auto: olmoe when possible")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating tensors (default: keep the saved dtype, fp32 for training)")
    parser.add_argument("--tokenizer", default="default",
                        help="tokenizer.json to ship; 'default' = the OLMo tokenizer from ai2-olmo-eval; "
                             "'none' = no tokenizer files")
    parser.add_argument("--max_shard_size", default="5GB", help="split weights into files of this size")
    parser.add_argument("--verify", action="store_true",
                        help="reload through transformers and compare logits (loads the model twice)")
    args = parser.parse_args(argv)
    source = open_checkpoint(args.checkpoint)
    config = load_model_config(args.checkpoint)
    layout = choose_format(config, args.format)  # a PolyNorm model asked for olmoe fails here
    diffs = []
    out = export_hf(
        source, config, args.out_dir, format=layout.name,
        tokenizer_json=None if args.tokenizer == "none" else args.tokenizer,
        dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
        check=(lambda tmp: diffs.append(verify(args.checkpoint, tmp))) if args.verify else None,
    )
    print(f"exported {args.checkpoint} ({config.activation_type}, {config.num_params():,d} params) "
          f"-> {out} [{layout.name}: {layout.description}]")
    if diffs:
        print(f"verified: max |logit difference| {diffs[0]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
