"""The two Hugging Face layouts of this model, picked by name from ``FORMATS``.

* ``olmoe``: transformers' own ``OlmoeForCausalLM`` (``model_type: olmoe``, no remote code), in
  the tensor layout of AI2's hub checkpoints (allenai/OLMoE-1B-7B-0924): one tensor per expert
  and projection, ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` in
  ``nn.Linear`` orientation (out, in). transformers 5 fuses these into
  ``mlp.experts.gate_up_proj`` (E, 2H, D) / ``down_proj`` (E, D, H) when it loads them
  (conversion_mapping.py, "qwen2_moe" rule), older transformers and vLLM read them as they are.
  Only SwiGLU MoE models with QK-norm have this form: OLMoE's architecture.
* ``polymoe``: every model (any activation, dense blocks, per-expert coefficients), loaded with
  ``trust_remote_code=True`` through the code files ``configuration_polymoe.py`` and
  ``modeling_polymoe.py`` copied into the directory. Tensors are renamed only.

Training tensors (``MoETransformer.state_dict()``), per layer i:
    blocks.{i}.ffn.w_in_EDH   (E, D, 2H) for SwiGLU: [:, :, :H] gate (w1), [:, :, H:] up (w3)
    blocks.{i}.ffn.w_out_EHD  (E, H, D)
so, in OLMoE's layout, ``gate_proj[e] = w_in_EDH[e, :, :H].T``, ``up_proj[e] = w_in_EDH[e, :, H:].T``
and ``down_proj[e] = w_out_EHD[e].T``. Transposes are exact: both directions are bitwise.

Config fields: ``CONFIG_RENAMES`` gives OLMoE's name of a ModelConfig field where it has one;
the other fields keep their own name in config.json (transformers keeps unknown keys as
attributes and loaders ignore them), so our own round trip restores the ModelConfig exactly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from moe_model.config import ModelConfig
from moe_model.errors import ConfigError, ConversionError
from moe_model.hf.files import PlannedTensor, TensorSource, plan_rename
from moe_model.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID

__all__ = ["CONFIG_RENAMES", "FORMATS", "Layout", "OlmoeLayout", "PolyMoELayout"]

HERE = Path(__file__).resolve().parent

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
_CONFIG_BACK = {v: k for k, v in CONFIG_RENAMES.items()}

# Training parameter name -> HF parameter name, per layer ``{i}``; checked in order. The first
# block is common to both layouts; the rest only exist in the remote-code layout.
_COMMON_RENAMES = [
    (r"embedding\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"blocks\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)\.weight",
     "model.layers.{}.self_attn.{}.weight"),
    (r"blocks\.(\d+)\.ffn\.router\.weight", "model.layers.{}.mlp.gate.weight"),
]
_POLYMOE_RENAMES = _COMMON_RENAMES + [
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
# The auxiliary-loss-free selection bias stays fp32 whatever export dtype is asked for: it
# decides top-k choices, and bf16 would round it by more than one update step.
_FP32_TENSORS = re.compile(r".*\.(e_score_correction_bias|expert_bias_E)")


class _Renamer:
    """Both directions of a ``(training regex, HF template)`` table."""

    def __init__(self, table: list[tuple[str, str]]):
        self.forward = [(re.compile(pattern), template) for pattern, template in table]
        self.backward = [(re.compile(self._template_regex(t, p)), p) for p, t in table]

    @staticmethod
    def _template_regex(template: str, pattern: str) -> str:
        """The HF template as a regex whose groups are the training pattern's groups."""
        groups = re.findall(r"\(([^)]*)\)", pattern)
        parts = [re.escape(p) for p in template.split("{}")]
        return parts[0] + "".join(f"({g})" + rest for g, rest in zip(groups, parts[1:], strict=True))

    @staticmethod
    def _fill(pattern: str, groups: tuple[str, ...]) -> str:
        return re.sub(r"\([^)]*\)", "{}", pattern).replace("\\.", ".").format(*groups)

    def to_hf(self, key: str) -> str:
        for regex, template in self.forward:
            match = regex.fullmatch(key)
            if match:
                return template.format(*match.groups())
        raise ConversionError(f"parameter {key!r} has no Hugging Face name in this layout")

    def from_hf(self, key: str) -> str:
        for regex, pattern in self.backward:
            match = regex.fullmatch(key)
            if match:
                return self._fill(pattern, match.groups())
        raise ConversionError(f"Hugging Face parameter {key!r} has no training-model name")


def _keep_fp32(plan: list[PlannedTensor]) -> list[PlannedTensor]:
    """``plan`` with its fp32-only tensors (``_FP32_TENSORS``) back in fp32."""
    return [
        dataclasses.replace(p, dtype=torch.float32) if _FP32_TENSORS.fullmatch(p.name) else p
        for p in plan
    ]


def _cast(meta: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and meta.is_floating_point() else meta.dtype


def _model_config(values: dict, source: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as err:
        raise ConversionError(f"{source}: {err}") from None


def _hf_fields(config: ModelConfig) -> dict:
    """Every ModelConfig field under its HF name."""
    return {CONFIG_RENAMES.get(k, k): v for k, v in dataclasses.asdict(config).items()}


def _training_fields(hf_config: dict) -> dict:
    """The ModelConfig fields present in a config.json, under their training names."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {}
    for key, value in hf_config.items():
        # An HF name, or a training name that keeps its own name in config.json.
        if key in _CONFIG_BACK or (key in known and key not in CONFIG_RENAMES):
            values[_CONFIG_BACK.get(key, key)] = value
    return values


# What both formats state about the tokenizer's special ids and the head (untied).
_TOKEN_AND_HEAD_FIELDS = {
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": None,
    "eos_token_id": EOS_TOKEN_ID,
    "tie_word_embeddings": False,
    "use_cache": True,
}


def _model_keys(config: ModelConfig) -> list[str]:
    """The training model's tensor names in its state-dict order (plans follow it, so outputs
    do not depend on the order a source lists its tensors in)."""
    return list(config.build("meta").state_dict())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Layout(ABC):
    """How one HF format names, shapes and configures this model's tensors."""

    name: str
    model_type: str
    description: str

    def unsupported(self, config: ModelConfig) -> str | None:
        """Why ``config`` cannot be written in this layout (None: it can)."""
        return None

    @abstractmethod
    def config_json(self, config: ModelConfig, dtype: torch.dtype) -> dict:
        """config.json of ``config`` with weights in ``dtype``."""

    @abstractmethod
    def model_config(self, hf_config: dict, hf_dir: Path) -> ModelConfig:
        """The ModelConfig of a config.json; ConversionError naming what cannot be held."""

    @abstractmethod
    def export_plan(self, config: ModelConfig, source: TensorSource,
                    dtype: torch.dtype | None) -> list[PlannedTensor]:
        """Training tensors (``source``) -> this layout's tensors, made one at a time."""

    @abstractmethod
    def import_plan(self, config: ModelConfig, source: TensorSource,
                    dtype: torch.dtype | None) -> list[PlannedTensor]:
        """This layout's tensors (``source``, names and shapes checked) -> training tensors."""

    def write_code(self, out_dir: Path) -> None:  # noqa: B027 (a default, not an abstract)
        """Copy whatever code the directory needs to load (nothing for native formats)."""


class PolyMoELayout(Layout):
    """Remote code (``trust_remote_code=True``): every activation, renamed tensors."""

    name = "polymoe"
    model_type = "polymoe"
    description = "transformers with trust_remote_code (any activation)"
    code_files = ("configuration_polymoe.py", "modeling_polymoe.py")
    auto_map = {
        "AutoConfig": "configuration_polymoe.PolyMoEConfig",
        "AutoModel": "modeling_polymoe.PolyMoEModel",
        "AutoModelForCausalLM": "modeling_polymoe.PolyMoEForCausalLM",
    }
    renamer = _Renamer(_POLYMOE_RENAMES)

    def config_json(self, config: ModelConfig, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["PolyMoEForCausalLM"],
            "auto_map": self.auto_map,
            "model_type": self.model_type,
            "torch_dtype": _dtype_name(dtype),
            **_hf_fields(config),
            # Plain multi-head attention; stated for tools that read it (memory estimators).
            "num_key_value_heads": config.n_heads,
            **_TOKEN_AND_HEAD_FIELDS,
        }

    def model_config(self, hf_config: dict, hf_dir: Path) -> ModelConfig:
        if hf_config.get("tie_word_embeddings"):
            raise ConversionError(
                f"{hf_dir}/config.json: tie_word_embeddings=true; the training model's LM head is untied"
            )
        return _model_config(_training_fields(hf_config), f"{hf_dir}/config.json")

    def export_plan(self, config, source, dtype):
        names = [self.renamer.to_hf(k) for k in _model_keys(config)]
        return _keep_fp32(plan_rename(source, self.renamer.from_hf, dtype, names))

    def import_plan(self, config, source, dtype):
        return _keep_fp32(plan_rename(source, self.renamer.to_hf, dtype, _model_keys(config)))

    def write_code(self, out_dir: Path) -> None:
        for name in self.code_files:
            shutil.copyfile(HERE / name, out_dir / name)


# OLMoE config.json fields this model cannot represent unless they hold the value given here
# (or are absent: transformers' OlmoeConfig defaults to these values). A field outside this
# table, the renames and _OLMOE_IGNORED is refused.
_OLMOE_REQUIRED = {
    "hidden_act": ("silu", "the experts are SwiGLU: silu(gate) * up"),
    "attention_bias": (False, "the projections have no bias"),
    "attention_dropout": (0.0, "training applies no attention dropout"),
    "clip_qkv": (None, "q, k and v are not clipped"),
    "rope_scaling": (None, "RoPE is unscaled"),
    "tie_word_embeddings": (False, "the LM head is untied"),
}
# Fields that do not change what the model computes, or that are checked separately.
_OLMOE_IGNORED = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "output_router_logits", "pad_token_id", "bos_token_id", "eos_token_id", "_name_or_path",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_parameters",
}  # fmt: skip
# ModelConfig fields implied by the OLMoE format itself.
_OLMOE_IMPLIED = {
    "block_type": "moe", "activation_type": "swiglu", "qk_norm": True,
    # OLMoE's router: softmax, unscaled weights, no selection bias, no shared experts, MoE in
    # every block. (The capacity factor and the balance-loss granularity act in training only;
    # config.json keeps them for the round trip.)
    "moe_router_score": "softmax", "moe_route_scale": 1.0, "moe_bias_update_rate": None,
    "moe_shared_experts": 0, "moe_first_dense_layers": 0,
}  # fmt: skip

_EXPERTS_IN = re.compile(r"blocks\.(\d+)\.ffn\.w_in_EDH")
_EXPERTS_OUT = re.compile(r"blocks\.(\d+)\.ffn\.w_out_EHD")


def _tokenizer_vocab(hf_dir: Path) -> int | None:
    """Tokens in ``hf_dir/tokenizer.json`` (largest id + 1), or None without one."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        ids = list(data.get("model", {}).get("vocab", {}).values())
        ids += [t["id"] for t in data.get("added_tokens", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise ConversionError(f"{path} is not a tokenizers JSON file") from None
    return max(ids) + 1 if ids else None


class OlmoeLayout(Layout):
    """transformers' native ``OlmoeForCausalLM``, AI2's per-expert checkpoint layout."""

    name = "olmoe"
    model_type = "olmoe"
    description = "transformers' OlmoeForCausalLM, no remote code (SwiGLU MoE only)"
    renamer = _Renamer(_COMMON_RENAMES)

    def unsupported(self, config: ModelConfig) -> str | None:
        for field, want in _OLMOE_IMPLIED.items():
            if getattr(config, field) != want:
                return (
                    f"OLMoE's format needs model.{field}={want!r}; this model has "
                    f"model.{field}={getattr(config, field)!r}"
                )
        return None

    def config_json(self, config: ModelConfig, dtype: torch.dtype) -> dict:
        extra = {k: v for k, v in _hf_fields(config).items() if k not in {"block_type", "qk_norm"}}
        # The fields AI2's OLMoE-1B-7B-0924 config.json has, in its (transformers 4.x) spelling:
        # rope_theta + rope_scaling rather than 5.x's rope_parameters, which 5.x still reads.
        return {
            "architectures": ["OlmoeForCausalLM"],
            "model_type": self.model_type,
            "torch_dtype": _dtype_name(dtype),
            **extra,
            "hidden_act": "silu",
            "num_key_value_heads": config.n_heads,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "clip_qkv": None,
            "rope_theta": config.rope_theta,
            "rope_scaling": None,
            "output_router_logits": False,
            **_TOKEN_AND_HEAD_FIELDS,
        }

    def model_config(self, hf_config: dict, hf_dir: Path) -> ModelConfig:
        where = f"{hf_dir}/config.json"
        for field, (want, why) in _OLMOE_REQUIRED.items():
            # An absent field takes OlmoeConfig's default, which is the value wanted.
            if field in hf_config and hf_config[field] != want:
                value = hf_config[field]
                raise ConversionError(f"{where}: {field}={value!r} cannot be represented ({why})")
        heads = hf_config.get("num_attention_heads")
        kv_heads = hf_config.get("num_key_value_heads")
        if kv_heads is not None and kv_heads != heads:
            raise ConversionError(
                f"{where}: num_key_value_heads={kv_heads} != num_attention_heads={heads}; "
                "grouped-query attention cannot be represented"
            )
        head_dim = hf_config.get("head_dim")
        if head_dim is not None and heads and head_dim * heads != hf_config.get("hidden_size"):
            raise ConversionError(f"{where}: head_dim={head_dim} is not hidden_size / num_attention_heads")
        rope = hf_config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConversionError(
                f"{where}: rope_parameters.rope_type={rope['rope_type']!r} cannot be represented "
                "(RoPE is unscaled)"
            )
        known = set(_OLMOE_REQUIRED) | _OLMOE_IGNORED | set(_CONFIG_BACK) | {
            f.name for f in dataclasses.fields(ModelConfig)
        }
        unknown = sorted(set(hf_config) - known)
        if unknown:
            raise ConversionError(
                f"{where}: field {unknown[0]!r} is unknown to this converter, which cannot tell "
                "whether the model can represent it"
            )
        values = _training_fields({k: v for k, v in hf_config.items() if k != "hidden_act"})
        values.update(_OLMOE_IMPLIED)
        theta = rope.get("rope_theta", hf_config.get("rope_theta"))
        if theta is not None:
            values["rope_theta"] = theta
        if "tokenizer_vocab_size" not in hf_config:
            # AI2's config has only the embedding rows (50304); the tokenizer shipped beside it
            # says how many ids are real (50280), as our exports record in tokenizer_vocab_size.
            rows = hf_config.get("vocab_size", ModelConfig.embedding_size)
            tokens = _tokenizer_vocab(hf_dir)
            values["vocab_size"] = rows if tokens is None else min(tokens, rows)
        return _model_config(values, where)

    def export_plan(self, config, source, dtype):
        h = config.mlp_hidden_size
        plan: list[PlannedTensor] = []
        for key in _model_keys(config):
            meta = source.meta(key)
            out_dtype = _cast(meta, dtype)
            if m := _EXPERTS_IN.fullmatch(key):
                n_experts, d, _ = meta.shape
                prefix = f"model.layers.{m.group(1)}.mlp.experts"
                for e in range(n_experts):
                    for name, cols in (("gate_proj", slice(0, h)), ("up_proj", slice(h, 2 * h))):
                        plan.append(PlannedTensor(
                            f"{prefix}.{e}.{name}.weight", (h, d), out_dtype,
                            lambda key=key, e=e, cols=cols: source.get(key)[e, :, cols].T,
                        ))  # fmt: skip
            elif m := _EXPERTS_OUT.fullmatch(key):
                n_experts, _, d = meta.shape
                prefix = f"model.layers.{m.group(1)}.mlp.experts"
                for e in range(n_experts):
                    plan.append(PlannedTensor(
                        f"{prefix}.{e}.down_proj.weight", (d, h), out_dtype,
                        lambda key=key, e=e: source.get(key)[e].T,
                    ))  # fmt: skip
            else:
                plan.append(PlannedTensor(self.renamer.to_hf(key), tuple(meta.shape), out_dtype,
                                          lambda key=key: source.get(key)))
        return plan

    def import_plan(self, config, source, dtype):
        plan: list[PlannedTensor] = []
        e_count, d, h = config.moe_num_experts, config.d_model, config.mlp_hidden_size
        for key, meta in config.build("meta").state_dict().items():
            # Expert tensors are filled in place, expert by expert, in the output dtype: the
            # only full-size buffer is the output itself.
            if m := _EXPERTS_IN.fullmatch(key):
                prefix = f"model.layers.{m.group(1)}.mlp.experts"
                out_dtype = _cast(source.meta(f"{prefix}.0.gate_proj.weight"), dtype)

                def make(prefix=prefix, out_dtype=out_dtype):
                    w_in_EDH = torch.empty(e_count, d, 2 * h, dtype=out_dtype)
                    for e in range(e_count):
                        w_in_EDH[e, :, :h] = source.get(f"{prefix}.{e}.gate_proj.weight").T
                        w_in_EDH[e, :, h:] = source.get(f"{prefix}.{e}.up_proj.weight").T
                    return w_in_EDH

                plan.append(PlannedTensor(key, (e_count, d, 2 * h), out_dtype, make))
            elif m := _EXPERTS_OUT.fullmatch(key):
                prefix = f"model.layers.{m.group(1)}.mlp.experts"
                out_dtype = _cast(source.meta(f"{prefix}.0.down_proj.weight"), dtype)

                def make(prefix=prefix, out_dtype=out_dtype):
                    w_out_EHD = torch.empty(e_count, h, d, dtype=out_dtype)
                    for e in range(e_count):
                        w_out_EHD[e] = source.get(f"{prefix}.{e}.down_proj.weight").T
                    return w_out_EHD

                plan.append(PlannedTensor(key, (e_count, h, d), out_dtype, make))
            else:
                hf_key = self.renamer.to_hf(key)
                plan.append(PlannedTensor(key, tuple(meta.shape), _cast(source.meta(hf_key), dtype),
                                          lambda hf_key=hf_key: source.get(hf_key)))
        return plan


FORMATS: dict[str, Layout] = {layout.name: layout for layout in (OlmoeLayout(), PolyMoELayout())}
"""Export formats by name; ``auto`` (convert_to_hf.py) picks the first that fits the model."""
