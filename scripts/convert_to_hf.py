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

Both ends take object-storage URLs (``s3://``, ``r2://``, ``weka://``; olmo/object_store.py):
the checkpoint is fetched once, and an ``out_dir`` URL gets the export written locally (in the
temp dir), verified, then uploaded with ``config.json`` last -- transformers looks for it
first, so a cut-short upload never looks like a model. The prefix must hold nothing yet.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from moe_model.errors import ConversionError, OutputExistsError
from moe_model.hf import FORMATS, choose_format, export_hf
from olmo import object_store
from olmo.checkpoint_io import load_model, load_model_config, open_checkpoint
from olmo.cli import run_cli

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
    remote_out = object_store.is_remote(args.out_dir)
    if remote_out:  # before the (long) export: the bucket is writable and the prefix unused
        object_store.check_access(args.out_dir, write=True, what="out_dir")
        if object_store.list_objects(object_store.join(args.out_dir, "")):
            raise OutputExistsError(f"output {args.out_dir!r} already holds objects; pick a new one")
    source = open_checkpoint(args.checkpoint)
    config = load_model_config(args.checkpoint)
    layout = choose_format(config, args.format)  # a PolyNorm model asked for olmoe fails here
    diffs = []
    with tempfile.TemporaryDirectory(prefix="hf-export-") as staging:
        out = export_hf(
            source, config, Path(staging) / "export" if remote_out else args.out_dir,
            format=layout.name, tokenizer_json=None if args.tokenizer == "none" else args.tokenizer,
            dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
            check=(lambda tmp: diffs.append(verify(args.checkpoint, tmp))) if args.verify else None,
        )  # fmt: skip
        if remote_out:
            object_store.upload_tree(out, args.out_dir, last=("config.json",))
            out = args.out_dir
    print(f"exported {args.checkpoint} ({config.activation_type}, {config.num_params():,d} params) "
          f"-> {out} [{layout.name}: {layout.description}]")
    if diffs:
        print(f"verified: max |logit difference| {diffs[0]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
