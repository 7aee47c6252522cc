"""OLMoE decoder: RoPE attention with QK-norm, MoE (or dense) FFN blocks, untied LM head.

Shape suffixes: B batch, S sequence, D d_model, N heads, Dh head dim, V embedding rows,
L MoE layers, E experts.

Build on the meta device for large models, then materialise:
    model = config.build("meta"); model.to_empty(device="cuda"); model.init_weights()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_model.attention import DocumentMask, build_document_mask
from moe_model.init import WeightInit
from moe_model.lm_loss import fused_lm_cross_entropy
from moe_model.moe import FeedForward, MoELayer
from moe_model.precision import at_least_fp32, upcast
from moe_model.routing import RouteChoice

__all__ = ["Attention", "Block", "DenseFFN", "ModelOutput", "MoETransformer", "apply_rope"]


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    """(B, S, embedding_size) in the compute dtype; None when the forward was given labels."""
    lb_loss: torch.Tensor
    """Weighted load-balancing loss averaged over MoE layers (0 for dense models)."""
    z_loss: torch.Tensor
    """Weighted router z-loss averaged over MoE layers (0 for dense models)."""
    tokens_per_expert_LE: torch.Tensor
    """Routed rows per expert per MoE layer (long, detached; shape (0, 0) for dense models);
    row l is block ``config.moe_layer_ids[l]``."""
    router_entropy_L: torch.Tensor | None = None
    """Mean router entropy per MoE layer (fp32, detached)."""
    dropped_rows_L: torch.Tensor | None = None
    """Rows dropped by the capacity limit per MoE layer (long); None when dropless."""
    routes: tuple[RouteChoice, ...] = ()
    """Each MoE layer's top-k experts and combine weights over the B*S tokens (detached), in
    layer order: what a routing trace records (olmo/routing_trace.py)."""
    ce_T: torch.Tensor | None = None
    """With labels: each of the B*S tokens' cross-entropy (fp32; 0 at ignored labels), from the
    LM head fused with its loss (moe_model/lm_loss.py); None otherwise."""


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (S, Dh) in ``dtype`` (fp32; float64 for a float64 model) for the
    rotate-half RoPE layout (GPT-NeoX/OLMo).

    Recomputed every forward instead of cached in a buffer: it costs S*Dh/2 trig ops, and a
    buffer made on the meta device would hold garbage after ``to_empty`` until someone
    remembered to rebuild it.
    """
    return rope_cos_sin_at(torch.arange(seq_len, device=device), head_dim, theta, dtype)


def rope_cos_sin_at(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, Dh) in ``dtype`` at the given token positions."""
    device = positions.device
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    )
    freqs = positions.to(dtype).unsqueeze(-1) * inv_freq
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


def apply_rope(x_BNSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    """Rotate q or k (B, N, S, Dh) by position, in fp32 (float64 stays), returning x's dtype."""
    x = upcast(x_BNSDh)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos_SDh + rotated * sin_SDh).to(x_BNSDh.dtype)


class Attention(nn.Module):
    """Causal multi-head attention, no biases, QK-norm over the full D-wide q and k (OLMoE)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        qk_norm: bool,
        norm_eps: float,
        rope_theta: float,
        init: WeightInit,
        init_device: str | torch.device = "cpu",
    ):
        super().__init__()
        d = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.init = init
        self.q_proj = nn.Linear(d, d, bias=False, device=init_device)
        self.k_proj = nn.Linear(d, d, bias=False, device=init_device)
        self.v_proj = nn.Linear(d, d, bias=False, device=init_device)
        self.o_proj = nn.Linear(d, d, bias=False, device=init_device)
        if qk_norm:
            self.q_norm = nn.RMSNorm(d, eps=norm_eps, device=init_device)
            self.k_norm = nn.RMSNorm(d, eps=norm_eps, device=init_device)
        else:
            self.q_norm = self.k_norm = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            self.init(proj.weight)
        if self.q_norm is not None:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()

    def forward(self, x_BSD: torch.Tensor, doc_mask: DocumentMask | None = None) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q_BSD, k_BSD, v_BSD = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.q_norm is not None:
            q_BSD, k_BSD = self.q_norm(q_BSD), self.k_norm(k_BSD)

        def heads(t_BSD: torch.Tensor) -> torch.Tensor:
            return t_BSD.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)

        rope_dtype = at_least_fp32(x_BSD.dtype)
        if doc_mask is None:
            cos, sin = rope_cos_sin(
                s, self.head_dim, self.rope_theta, x_BSD.device, rope_dtype
            )
        else:
            cos_BSDh, sin_BSDh = rope_cos_sin_at(
                doc_mask.positions_BS, self.head_dim, self.rope_theta, rope_dtype
            )
            cos, sin = cos_BSDh.unsqueeze(1), sin_BSDh.unsqueeze(1)  # broadcast over heads
        q_BNSDh = apply_rope(heads(q_BSD), cos, sin)
        k_BNSDh = apply_rope(heads(k_BSD), cos, sin)
        v_BNSDh = heads(v_BSD).to(q_BNSDh.dtype)
        if doc_mask is None:
            o_BNSDh = F.scaled_dot_product_attention(q_BNSDh, k_BNSDh, v_BNSDh, is_causal=True)
        else:
            o_BNSDh = doc_mask.attend(q_BNSDh, k_BNSDh, v_BNSDh)
        return self.o_proj(o_BNSDh.transpose(1, 2).reshape(b, s, d))


class DenseFFN(FeedForward):
    """One FFN ``y = act(x @ w_in) @ w_out`` with the activation registry: the FFN of every block
    when block_type='dense' (width mlp_hidden_size), of the first moe_first_dense_layers blocks
    otherwise (width moe_first_dense_hidden_size, default moe_top_k * mlp_hidden_size: the
    routed experts' active width, so a dense block costs what an MoE block's experts do per
    token). DeepSeek-V3 keeps its first 3 blocks dense (``n_dense_layers`` in
    inference/configs/config_671B.json of deepseek-ai/DeepSeek-V3); see moe_model/moe.py."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h)); the unit FSDP wraps."""

    def __init__(
        self,
        attn: Attention,
        ffn: MoELayer | DenseFFN,
        d_model: int,
        norm_eps: float,
        init_device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps, device=init_device)
        self.attn = attn
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps, device=init_device)
        self.ffn = ffn

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.attn_norm.reset_parameters()
        self.attn.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.ffn.reset_parameters()

    def forward(
        self,
        x_BSD: torch.Tensor,
        doc_mask: DocumentMask | None = None,
        route: RouteChoice | None = None,
    ):
        """``route``: the MoE layer's top-k choice to use instead of its router's (replay)."""
        h_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), doc_mask)
        ffn_in = self.ffn_norm(h_BSD)
        y_BSD, aux = self.ffn(ffn_in) if route is None else self.ffn(ffn_in, route)
        return h_BSD + y_BSD, aux


class MoETransformer(nn.Module):
    """Token embedding -> n_layers blocks -> final RMSNorm -> untied LM head."""

    config: Any = None
    """The config this model was built from (set by ``ModelConfig.build``), for the training
    stack, checkpoints and exports; the model itself never reads it."""

    def __init__(
        self,
        blocks: list[Block],
        *,
        embedding_size: int,
        d_model: int,
        norm_eps: float,
        init: WeightInit,
        document_masking: bool = False,
        document_masking_backend: str = "auto",
        init_device: str | torch.device = "cpu",
    ):
        """``blocks`` built on the meta device; the rest is laid out there too and, unless
        ``init_device`` is meta, materialised and initialised once, in init_weights' order: a
        whole build then draws exactly the random numbers of a meta build materialised later
        (sharded or not), instead of also those of each submodule's default init."""
        super().__init__()
        self.init = init
        self.document_masking = document_masking
        self.document_masking_backend = document_masking_backend
        self.embedding = nn.Embedding(embedding_size, d_model, device="meta")
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(d_model, eps=norm_eps, device="meta")
        self.lm_head = nn.Linear(d_model, embedding_size, bias=False, device="meta")
        if torch.device(init_device).type != "meta":
            self.to_empty(device=init_device)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter: truncated normal weights, norms 1, activation
        coefficients to their defaults. Call after ``to_empty`` on a meta-built model."""
        self.init(self.embedding.weight)
        for block in self.blocks:
            block.reset_parameters()
        self.norm.reset_parameters()
        self.init(self.lm_head.weight)

    reset_parameters = init_weights

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in block order (through any checkpoint/FSDP wrappers)."""
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_LE: torch.Tensor) -> None:
        """Auxiliary-loss-free step of every MoE layer from a whole optimizer step's routed rows
        (``ModelOutput.tokens_per_expert_LE`` summed over micro-batches and data-parallel
        ranks); a no-op without moe_bias_update_rate."""
        for layer, counts_E in zip(self.moe_layers(), tokens_per_expert_LE, strict=True):
            layer.update_expert_bias(counts_E)

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        doc_ids_BS: torch.Tensor | None = None,
        routes: list[RouteChoice] | tuple[RouteChoice, ...] | None = None,
        labels_BS: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits and auxiliary losses. ``doc_ids_BS`` (with ``config.document_masking``): the
        document of each token (:func:`moe_model.attention.document_ids`); attention then stays
        inside documents and RoPE positions restart at each one. Without it a row is one
        document. ``routes``: one :class:`RouteChoice` per MoE layer, (B*S, K) each, computed
        with instead of the routers' choices (replaying a trace); the routers still run for the
        auxiliary losses. ``labels_BS``: the next tokens (-100 = no loss); the output then holds
        each token's cross-entropy from the LM head fused with its loss (``ce_T``) instead of the
        logits, which never materialise (in forward: FSDP gathers the head's weight for it)."""
        doc_mask = None
        if doc_ids_BS is not None:
            if not self.document_masking:
                raise ValueError(
                    "doc_ids_BS was given but model.document_masking is off; the model would "
                    "attend across documents"
                )
            doc_mask = build_document_mask(doc_ids_BS, self.document_masking_backend)
        if routes is not None:
            self._check_routes(routes, input_ids_BS.numel())
            routes_left = iter(routes)
        x_BSD = self.embedding(input_ids_BS)
        auxes = []
        for block in self.blocks:
            route = None
            if routes is not None and isinstance(block.ffn, MoELayer):
                route = next(routes_left)
            x_BSD, aux = block(x_BSD, doc_mask, route)
            if aux is not None:
                auxes.append(aux)
        logits_BSV = ce_T = None
        if labels_BS is None:
            logits_BSV = self.lm_head(self.norm(x_BSD))
        else:
            h_TD = self.norm(x_BSD).flatten(0, 1)
            ce_T = fused_lm_cross_entropy(h_TD, self.lm_head.weight, labels_BS.flatten())
        if auxes:
            lb_loss = torch.stack([a.lb_loss for a in auxes]).mean()
            z_loss = torch.stack([a.z_loss for a in auxes]).mean()
            tokens_per_expert_LE = torch.stack([a.tokens_per_expert_E for a in auxes])
            router_entropy_L = torch.stack([a.router_entropy for a in auxes])
            dropped = [a.dropped_rows for a in auxes]
            dropped_rows_L = None if dropped[0] is None else torch.stack(dropped)
        else:
            lb_loss = x_BSD.new_zeros((), dtype=torch.float32)
            z_loss = x_BSD.new_zeros((), dtype=torch.float32)
            tokens_per_expert_LE = torch.zeros(0, 0, dtype=torch.long, device=x_BSD.device)
            router_entropy_L = dropped_rows_L = None
        return ModelOutput(
            logits=logits_BSV,
            lb_loss=lb_loss,
            z_loss=z_loss,
            tokens_per_expert_LE=tokens_per_expert_LE,
            router_entropy_L=router_entropy_L,
            dropped_rows_L=dropped_rows_L,
            routes=tuple(a.route for a in auxes),
            ce_T=ce_T,
        )

    def _check_routes(self, routes, num_tokens: int) -> None:
        """One RouteChoice per MoE layer, each (tokens, K): shapes only, no device value read."""
        layers = self.moe_layers()
        if len(routes) != len(layers):
            raise ValueError(
                f"routes has {len(routes)} layers; the model has {len(layers)} MoE layers"
            )
        cfg = layers[0].config if layers else None
        for index, route in enumerate(routes):
            want = (num_tokens, cfg.top_k)
            for name in ("experts_TK", "weights_TK"):
                got = tuple(getattr(route, name).shape)
                if got != want:
                    raise ValueError(
                        f"routes[{index}].{name} has shape {got}; expected (tokens, top_k) = {want}"
                    )
