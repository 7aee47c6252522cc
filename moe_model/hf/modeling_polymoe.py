"""Hugging Face modeling code of an exported moe-polycom model (OLMoE architecture, any expert
activation: relu, gelu, relu2, swiglu, polyrelu, polynorm, and the gated polyrelu_glu, polynorm_glu).

Self-contained: copied into every exported directory and loaded with ``trust_remote_code=True``,
so it imports nothing from this repository. The math is a copy of ``moe_model/`` (activations.py,
moe.py, transformer.py) with the same op order and fp32 upcasts, so in fp32 its logits match the
training model's to rounding; ``tests/scripts/test_export.py`` checks that for every activation.

Written for transformers 5 (setup.py pins the version tested). Reused from it: PreTrainedConfig,
PreTrainedModel (``save_pretrained``/``from_pretrained``), GenerationMixin (``generate`` with its
default input preparation: the prompt once, then only new tokens against the DynamicCache),
CausalLMOutputWithPast and ACT2FN (relu, gelu, relu2, silu). Norms use
``torch.nn.RMSNorm`` like the training model (transformers' LlamaRMSNorm casts to the input dtype
before the gain, which differs in bf16).

Weight layout (safetensors keys):
    model.embed_tokens.weight                         (V, D)
    model.layers.{i}.input_layernorm.weight           (D,)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  (D, D)
    model.layers.{i}.self_attn.{q,k}_norm.weight      (D,)      QK-norm over the full D width
    model.layers.{i}.post_attention_layernorm.weight  (D,)
    model.layers.{i}.mlp.gate.weight                  (E, D)    router
    model.layers.{i}.mlp.experts.w_in                 (E, D, H) or (E, D, 2H) gated [gate | up]
    model.layers.{i}.mlp.experts.w_out                (E, H, D)
    model.layers.{i}.mlp.act_fn.{weight,bias}         (r,), (1,)  polyrelu/polynorm(_glu) only, one
                                                                 set per layer shared by experts
    model.layers.{i}.mlp.act_fn.{e}.{weight,bias}     (r,), (1,)  instead, one set per expert e
                                                                 (moe_activation_per_expert)
    model.layers.{i}.mlp.gate.e_score_correction_bias (E,) fp32   auxiliary-loss-free selection
                                                                 bias (moe_bias_update_rate)
    model.layers.{i}.mlp.shared_experts.{s}.{w_in,w_out}.weight, .act_fn.{weight,bias}
                                                                 shared expert s (dense layout)
    model.norm.weight, lm_head.weight                 (D,), (V, D)
Dense models (``block_type="dense"``) and the first ``moe_first_dense_layers`` blocks have
``mlp.w_in.weight`` (H or 2H, D) and ``mlp.w_out.weight`` (D, H) instead of the router and
experts.

Routing as in training (moe_model/routing.py): softmax or sigmoid scores in fp32, the top-k chosen
on scores + bias (when stored), weighted by the unbiased scores, renormalised
(``norm_topk_prob``), times ``moe_route_scale``; the shared experts' outputs added. Inference
never drops tokens (a capacity factor acts in training only).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_polymoe import PolyMoEConfig

# ---------------------------------------------------------------------------------------------
# Activations. Coefficient order as in training: weight[i] multiplies power (r - i), so
# weight[0] multiplies the highest power. Powers and norms in fp32, cast back.
# ---------------------------------------------------------------------------------------------


class PolyNorm(nn.Module):
    """sum_i weight[i] * rmsnorm(x ** (r - i)) + bias, per-row RMS norm without gain."""

    def __init__(self, order: int = 3, eps: float = 1e-6):
        super().__init__()
        self.order = order
        self.eps = eps
        self.weight = nn.Parameter(torch.full((order,), 1.0 / order))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        w_f = self.weight.float()
        y = self.bias.float().expand_as(x_f)
        for i in range(self.order):
            p = x_f.pow(self.order - i)
            y = y + w_f[i] * (p * torch.rsqrt(p.pow(2).mean(dim=-1, keepdim=True) + self.eps))
        return y.to(x.dtype)


class PolyReLU(nn.Module):
    """sum_i weight[i] * relu(x) ** (r - i) + bias."""

    def __init__(self, order: int = 3):
        super().__init__()
        self.order = order
        self.weight = nn.Parameter(torch.full((order,), 1.0 / order))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r_f = F.relu(x.float())
        w_f = self.weight.float()
        y = self.bias.float().expand_as(r_f)
        for i in range(self.order):
            y = y + w_f[i] * r_f.pow(self.order - i)
        return y.to(x.dtype)


class _GatedPoly(nn.Module):
    """act(a) * b on the fused input [a | b] (a the gate half of w_in, b the up half); the
    polynomial and the product in fp32, one cast back (Motif's gated PolyNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.float().chunk(2, dim=-1)
        return (self.poly_f32(a) * b).to(x.dtype)


class PolyNormGLU(_GatedPoly, PolyNorm):
    """PolyNorm(a) * b, the norm over the gate's H columns."""

    def poly_f32(self, a: torch.Tensor) -> torch.Tensor:
        return PolyNorm.forward(self, a)


class PolyReLUGLU(_GatedPoly, PolyReLU):
    """PolyReLU(a) * b."""

    def poly_f32(self, a: torch.Tensor) -> torch.Tensor:
        return PolyReLU.forward(self, a)


class SwiGLU(nn.Module):
    """silu(a) * b on the fused input [a | b] (a from the gate half of w_in, b the up half)."""

    def __init__(self):
        super().__init__()
        self.silu = ACT2FN["silu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return self.silu(a) * b


GATED = ("swiglu", "polyrelu_glu", "polynorm_glu")
WITH_COEFFICIENTS = ("polyrelu", "polynorm", "polyrelu_glu", "polynorm_glu")


def build_activation(config: PolyMoEConfig) -> nn.Module:
    name = config.hidden_act
    if name == "polynorm_glu":
        return PolyNormGLU(config.activation_order, config.activation_eps)
    if name == "polyrelu_glu":
        return PolyReLUGLU(config.activation_order)
    if name == "polynorm":
        return PolyNorm(config.activation_order, config.activation_eps)
    if name == "polyrelu":
        return PolyReLU(config.activation_order)
    if name == "swiglu":
        return SwiGLU()
    if name in ("relu", "gelu", "relu2"):
        return ACT2FN[name]  # gelu = exact erf form, relu2 = relu(x)^2, as in training
    raise ValueError(f"unknown hidden_act {name!r}")


def mlp_in_size(config: PolyMoEConfig) -> int:
    return 2 * config.intermediate_size if config.hidden_act in GATED else config.intermediate_size


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def rope_cos_sin(position_ids_BS: torch.Tensor, head_dim: int, theta: float):
    """cos, sin (B, S, Dh) in fp32, rotate-half layout (GPT-NeoX/OLMo), as in training."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=position_ids_BS.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids_BS.float()[..., None] * inv_freq
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


def apply_rope(x_BNSDh: torch.Tensor, cos_BSDh: torch.Tensor, sin_BSDh: torch.Tensor) -> torch.Tensor:
    x = x_BNSDh.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos_BSDh.unsqueeze(1), sin_BSDh.unsqueeze(1)
    return (x * cos + rotated * sin).to(x_BNSDh.dtype)


class PolyMoEAttention(nn.Module):
    def __init__(self, config: PolyMoEConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.head_dim = d // self.n_heads
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BSD, position_ids_BS, mask_B1SK, past_key_values):
        b, s, d = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)

        def heads(t):
            return t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)

        cos, sin = rope_cos_sin(position_ids_BS, self.head_dim, self.rope_theta)
        q, k = apply_rope(heads(q), cos, sin), apply_rope(heads(k), cos, sin)
        v = heads(v).to(q.dtype)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if mask_B1SK is None:
            # No padding and no cached prefix (or a single new token): the training kernel.
            o = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SK)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, d))


# ---------------------------------------------------------------------------------------------
# Feed-forward: MoE (softmax top-k router, dropless experts) or dense
# ---------------------------------------------------------------------------------------------


class PolyMoEExperts(nn.Module):
    """E expert FFNs ``act(x @ w_in[e]) @ w_out[e]`` stored stacked, as in training."""

    def __init__(self, config: PolyMoEConfig):
        super().__init__()
        e, d, h = config.num_experts, config.hidden_size, config.intermediate_size
        self.w_in = nn.Parameter(torch.empty(e, d, mlp_in_size(config)))
        self.w_out = nn.Parameter(torch.empty(e, h, d))


class PolyMoESparseMoeBlock(nn.Module):
    def __init__(self, config: PolyMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.score = config.moe_router_score
        self.route_scale = config.moe_route_scale
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.has_bias = config.moe_bias_update_rate is not None
        if self.has_bias:
            self.gate.register_buffer(
                "e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32)
            )
        self.experts = PolyMoEExperts(config)
        self.shared_experts = nn.ModuleList(
            PolyMoEDenseMLP(config, config.moe_shared_hidden_size or config.intermediate_size)
            for _ in range(config.moe_shared_experts)
        )
        # One activation (one set of coefficients) per layer shared by all experts, or one per
        # expert (moe_activation_per_expert, the activations with coefficients).
        if config.moe_activation_per_expert and config.hidden_act in WITH_COEFFICIENTS:
            self.act_fn = nn.ModuleList(build_activation(config) for _ in range(self.num_experts))
        else:
            self.act_fn = build_activation(config)

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        logits_TE = F.linear(x_TD, self.gate.weight.to(x_TD.dtype)).float()
        scores_TE = logits_TE.softmax(dim=-1) if self.score == "softmax" else logits_TE.sigmoid()
        if self.has_bias:
            bias_E = self.gate.e_score_correction_bias.float()
            experts_TK = (scores_TE + bias_E).topk(self.top_k, dim=-1).indices
            weights_TK = scores_TE.gather(-1, experts_TK)
        else:
            weights_TK, experts_TK = scores_TE.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.route_scale != 1.0:
            weights_TK = weights_TK * self.route_scale
        w_in, w_out = self.experts.w_in.to(x.dtype), self.experts.w_out.to(x.dtype)
        # Rows sorted by expert, token order inside an expert: the training layer's order.
        experts_R = experts_TK.reshape(-1)
        order_R = experts_R.argsort(stable=True)
        token_R = order_R // self.top_k
        counts = torch.bincount(experts_R, minlength=self.num_experts).tolist()
        x_RD = x_TD[token_R]
        h_RH = torch.cat([x_ND @ w_in[e] for e, x_ND in enumerate(x_RD.split(counts))])
        if isinstance(self.act_fn, nn.ModuleList):
            a_RH = torch.cat([act(h) for act, h in zip(self.act_fn, h_RH.split(counts))])
        else:
            a_RH = self.act_fn(h_RH)
        y_RD = torch.cat([a_NH @ w_out[e] for e, a_NH in enumerate(a_RH.split(counts))])
        # Each token's K rows weighted and summed in fp32, rounded once (moe_model/dispatch.py's combine).
        y_TKD = y_RD[order_R.argsort()].view(-1, self.top_k, shape[-1])
        y_TD = (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1).to(y_RD.dtype)
        for shared in self.shared_experts:
            y_TD = y_TD + shared(x_TD)[0]
        return y_TD.reshape(shape), logits_TE


class PolyMoEDenseMLP(nn.Module):
    def __init__(self, config: PolyMoEConfig, hidden_size: int | None = None):
        super().__init__()
        hidden_size = hidden_size or config.intermediate_size
        in_size = 2 * hidden_size if config.hidden_act in GATED else hidden_size
        self.w_in = nn.Linear(config.hidden_size, in_size, bias=False)
        self.act_fn = build_activation(config)
        self.w_out = nn.Linear(hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor):
        return self.w_out(self.act_fn(self.w_in(x))), None


class PolyMoEDecoderLayer(nn.Module):
    def __init__(self, config: PolyMoEConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.self_attn = PolyMoEAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        if config.block_type == "dense":
            self.mlp = PolyMoEDenseMLP(config)
        elif layer_idx < config.moe_first_dense_layers:
            width = config.moe_first_dense_hidden_size
            self.mlp = PolyMoEDenseMLP(
                config, width or config.num_experts_per_tok * config.intermediate_size
            )
        else:
            self.mlp = PolyMoESparseMoeBlock(config)

    def forward(self, x, position_ids, mask, past_key_values):
        h = x + self.self_attn(self.input_layernorm(x), position_ids, mask, past_key_values)
        y, router_logits = self.mlp(self.post_attention_layernorm(h))
        return h + y, router_logits


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class PolyMoEPreTrainedModel(PreTrainedModel):
    config_class = PolyMoEConfig  # not an annotation: this file has postponed annotations
    base_model_prefix = "model"
    _no_split_modules = ["PolyMoEDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Training init: truncated normal weights, unit norms, default poly coefficients."""
        std = self.config.initializer_range
        cut = self.config.init_cutoff_factor * std

        def trunc(w):
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-cut, b=cut)

        if isinstance(module, (nn.Linear, nn.Embedding)):
            trunc(module.weight)
        elif isinstance(module, PolyMoEExperts):
            trunc(module.w_in)
            trunc(module.w_out)
        elif isinstance(module, (PolyNorm, PolyReLU)):
            module.weight.data.fill_(1.0 / module.order)
            module.bias.data.zero_()
        elif isinstance(module, nn.RMSNorm):
            module.reset_parameters()
        if isinstance(module, nn.Linear) and hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.zero_()


def _attention_mask(attention_mask_BK, past_len: int, s: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, S, K) mask, or None when the plain causal kernel is exact."""
    if (attention_mask_BK is None or bool(attention_mask_BK.all())) and (past_len == 0 or s == 1):
        return None
    k = past_len + s
    q_pos = torch.arange(past_len, k, device=device)
    k_pos = torch.arange(k, device=device)
    allowed_SK = k_pos[None, :] <= q_pos[:, None]
    mask = allowed_SK[None, None]
    if attention_mask_BK is not None:
        mask = mask & attention_mask_BK[:, None, None, -k:].bool()
    # A padding query sees no key at all; let it see itself so SDPA gives no NaN (its output is
    # never used: padding keys are masked for every real query).
    return mask | (k_pos[None, :] == q_pos[:, None])[None, None]


class PolyMoEModel(PolyMoEPreTrainedModel):
    def __init__(self, config: PolyMoEConfig):
        super().__init__(config)
        # No padding_idx: the training embedding has none (its pad row trains like any other).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            PolyMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool = False,
        **kwargs,
    ):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: real tokens count from 0, as in training.
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos[:, -s:]
            else:
                position_ids = torch.arange(past_len, past_len + s, device=x.device)[None].expand(b, s)
        mask = _attention_mask(attention_mask, past_len, s, x.device)
        router_logits = []
        for layer in self.layers:
            x, logits = layer(x, position_ids, mask, past_key_values if use_cache else None)
            router_logits.append(logits)
        return self.norm(x), (past_key_values if use_cache else None), router_logits


class PolyMoEForCausalLM(PolyMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys: list[str] = []

    def __init__(self, config: PolyMoEConfig):
        super().__init__(config)
        self.model = PolyMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden, cache, _ = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Next-token cross-entropy only; the router losses are training-side (moe_model).
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
