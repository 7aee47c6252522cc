"""Sparse upcycling: a dense checkpoint -> an MoE checkpoint whose experts start as its FFN.

OLMoE's paper (Muennighoff et al., 2024, sec. 4.1.4) compared training an MoE from scratch with
upcycling a dense model (Komatsuzaki et al., 2023): every expert of layer i is a copy of the
dense model's FFN i, the router is new. Here, per block i:

    blocks.{i}.ffn.w_in.weight  (mlp_in, D)   -> blocks.{i}.ffn.w_in_EDH[e]  = w_in.weight.T
    blocks.{i}.ffn.w_out.weight (D, H)        -> blocks.{i}.ffn.w_out_EHD[e] = w_out.weight.T
    blocks.{i}.ffn.act.{weight,bias}          -> the same (shared), or one copy per expert
                                                 (moe_activation_per_expert)
    blocks.{i}.ffn.router.weight (E, D)       <- fresh: truncated normal (init_std), drawn layer
                                                 by layer from ``seed`` (training's router init)

and every other tensor is copied. Gated (SwiGLU) FFNs keep their [gate | up] column order.

What the upcycled model computes at step 0: every expert computes the dense FFN's f(x), so a
token's MoE output is ``sum_k w_k * f(x) = (sum_k w_k) * f(x)`` over its top-k weights w_k.
With ``moe_renormalize=True`` the weights sum to 1 and the model equals the dense model. With
OLMoE's unnormalised weights (the default) the weights are the top-k softmax probabilities, so
each token's FFN output is scaled by the probability mass of its top-k experts (below 1 whenever
E > K: about K/E for a fresh router), and the model differs from the dense one from layer 0 on.
``tests/scripts/test_upcycle.py`` checks both identities exactly.
"""

from __future__ import annotations

import re

import torch

from moe_model.config import ModelConfig
from moe_model.errors import ConfigError, ConversionError
from moe_model.hf.files import PlannedTensor, TensorSource
from moe_model.init import trunc_normal_

__all__ = ["upcycle_config", "upcycle_plan"]

_PER_EXPERT_ACT = re.compile(r"blocks\.(\d+)\.ffn\.act\.\d+\.(weight|bias)")


def upcycle_config(dense: ModelConfig, num_experts: int, top_k: int, renormalize: bool,
                   activation_per_expert: bool = False) -> ModelConfig:
    """The MoE config of an upcycled ``dense`` model (same sizes, ``num_experts`` experts)."""
    if dense.block_type != "dense":
        raise ConversionError(
            f"upcycling needs a dense checkpoint (model.block_type='dense'); this one has "
            f"model.block_type={dense.block_type!r}"
        )
    try:
        return dense.replace(block_type="moe", moe_num_experts=num_experts, moe_top_k=top_k,
                             moe_renormalize=renormalize,
                             moe_activation_per_expert=activation_per_expert)
    except ConfigError as err:
        raise ConversionError(f"upcycled config: {err}") from None


def _routers(config: ModelConfig, seed: int) -> list[torch.Tensor]:
    """Fresh router weights, one per layer, drawn in layer order from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        routers = []
        for _ in range(config.n_layers):
            w = torch.empty(config.moe_num_experts, config.d_model)
            trunc_normal_(w, std=config.init_std, cutoff_factor=config.init_cutoff_factor)
            routers.append(w)
    return routers


def upcycle_plan(source: TensorSource, moe: ModelConfig, seed: int) -> list[PlannedTensor]:
    """The upcycled model's tensors, in its state-dict order, made one at a time.

    ``source`` holds the dense model (checked against it by the caller); ``moe`` is
    :func:`upcycle_config`'s result.
    """
    e_count = moe.moe_num_experts
    routers = _routers(moe, seed)
    plan: list[PlannedTensor] = []
    for key, meta in moe.build("meta").state_dict().items():
        layer = key.split(".")[1] if key.startswith("blocks.") else None
        if key.endswith(".ffn.router.weight"):
            router = routers[int(layer)]
            plan.append(PlannedTensor(key, tuple(meta.shape), torch.float32, lambda r=router: r))
            continue
        if key.endswith(".ffn.w_in_EDH") or key.endswith(".ffn.w_out_EHD"):
            name = "w_in" if key.endswith("w_in_EDH") else "w_out"
            dense_key = f"blocks.{layer}.ffn.{name}.weight"

            def make(dense_key=dense_key):
                w_T = source.get(dense_key).T
                return w_T.unsqueeze(0).expand(e_count, *w_T.shape)

        elif m := _PER_EXPERT_ACT.fullmatch(key):
            dense_key = f"blocks.{m.group(1)}.ffn.act.{m.group(2)}"

            def make(dense_key=dense_key):
                return source.get(dense_key)

        else:
            dense_key = key

            def make(dense_key=dense_key):
                return source.get(dense_key)

        plan.append(PlannedTensor(key, tuple(meta.shape), source.meta(dense_key).dtype, make))
    return plan
