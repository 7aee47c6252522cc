"""The router's decision: scores, top-k choice, capacity drops, expert-bias balancing.

Shape suffixes as in ``moe.py``. Routing follows OLMoE by default: router logits = x @ W_r (no
bias), softmax over all E experts in fp32, top-k of the probabilities used as combine weights,
not renormalised (unless configured); ``MoELayer.route`` runs these functions and returns a
:class:`Routing`.

Variants, each a ModelConfig option (defaults reproduce OLMoE bit for bit):

* ``moe_router_score`` (:data:`ROUTER_SCORES`): ``softmax`` p_te = softmax(logits_t)_e, or
  ``sigmoid`` s_te = sigmoid(logits_te) (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2, eq. 15). The
  top-k weights are the chosen scores g_tk; ``moe_renormalize`` divides them by their sum over
  the k chosen (DeepSeek-V3 always does for sigmoid, eqs. 13-14), then ``moe_route_scale``
  multiplies them (DeepSeek-V3's ``route_scale``, 2.5 in inference/configs/config_671B.json of
  deepseek-ai/DeepSeek-V3). The load-balancing loss averages the distribution p_te: softmax's
  own, or sigmoid's scores normalised over E, s_te / sum_j s_tj (DeepSeek-V3 eq. 19; olmo-core's
  router does the same).
* ``moe_bias_update_rate`` gamma: auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2, eq. 16;
  Wang et al. 2024, arXiv:2408.15664). A per-expert bias b_e is added to the scores for the
  top-k *choice* only; the combine weights stay the unbiased scores. After every optimizer step
  b_e += gamma * sign(mean_j load_j - load_e), with load_e the rows routed to e in the whole
  step (all micro-batches, summed over data-parallel ranks), so every rank applies the same
  update (:func:`update_expert_bias_`). torchtitan (components/optimizer/optimizer.py) also
  subtracts the mean update; DeepSeek-V3 and olmo-core (nn/moe/router.py) do not, nor do we.
  The bias is a buffer (``expert_bias_E``): saved in checkpoints, never seen by the optimizer.
* ``moe_capacity_factor`` cf: at most C = ceil(cf * T * K / E) rows per expert per micro-batch in
  training, T this rank's micro-batch tokens (before any expert-parallel exchange). Switch
  Transformer (arXiv:2101.03961 sec. 2.2, top-1) sets expert capacity = tokens per batch / E *
  cf; GShard (arXiv:2006.16668, top-2) bounds each expert to O(N/E) of a group's N tokens with
  each token going to at most two; K rows per token gives T * K / E. OLMoE compared dropless
  routing with such token dropping. An expert chosen by more rows keeps the C with the highest
  router score g_tk (before renormalisation; ties: lower token first) and drops the rest
  (:func:`capacity_keep`); a dropped row adds nothing to its token. Evaluation and inference
  stay dropless. The drop is a mask on the routing (``keep_TK``) with the kept rows per expert
  (min(count_e, C)). Shapes stay fixed (no host read of how many rows survive): the local
  dispatcher sorts the dropped rows after every expert's and the experts give them zeros; the
  expert-parallel one, which reads split sizes anyway, sends only the kept rows.
* ``moe_force_balance`` (benchmarks and the planner only; a training config refuses it): token
  t's k-th expert is (t*K + k) mod E (:func:`balanced_experts`), so every expert gets T*K/E rows
  when E divides T*K, whatever the router says; the combine weights stay the router's scores at
  those experts (then renormalised/scaled as configured). This is torchtitan's
  ``_debug_force_load_balance`` (models/moe/moe.py, TokenChoiceTopKRouter): exact, deterministic
  and sync-free, and the router's matmul, softmax and losses still run. Megatron-Core's
  ``moe_router_force_load_balancing`` instead replaces the logits by N(0, 1) noise
  (``apply_random_logits``), balanced only in expectation; we follow torchtitan so a benchmark
  measures exactly equal expert loads.
* A :class:`RouteChoice` passed to the layer's forward replaces the top-k choice and its weights
  (replaying a routing trace, ``olmo/routing_trace.py``); the router still runs for the losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "ROUTER_SCORES",
    "RouteChoice",
    "Routing",
    "balanced_experts",
    "balanced_rows_per_expert",
    "capacity_keep",
    "count_per_expert",
    "expert_capacity",
    "router_entropy",
    "update_expert_bias_",
]


@dataclass
class Routing:
    """The router's decision for T tokens."""

    logits_TE: torch.Tensor
    """Router logits (fp32)."""
    probs_TE: torch.Tensor
    """Distribution over all E experts (fp32): softmax, or sigmoid scores normalised over E;
    what the load-balancing loss averages."""
    weights_TK: torch.Tensor
    """Combine weight of each token's k-th expert (fp32)."""
    experts_TK: torch.Tensor
    """Index of each token's k-th expert (long)."""
    tokens_per_expert_E: torch.Tensor
    """Rows routed to each expert (long, :func:`count_per_expert` of experts_TK): counted once
    and passed along to the losses, the capacity limit and the dispatcher."""
    keep_TK: torch.Tensor | None = None
    """Which (token, k) rows the experts compute (bool); None = all of them (dropless)."""
    kept_per_expert_E: torch.Tensor | None = None
    """Rows each expert computes under the capacity limit, min(count_e, C); None when
    dropless."""
    host_rows_per_expert: list[int] | None = None
    """The rows each expert computes, known on the host without reading the device: set under
    forced balance (:func:`balanced_rows_per_expert`), where they follow from T alone, so the
    expert-parallel dispatcher needs no count exchange and no host sync; None otherwise."""


@dataclass
class RouteChoice:
    """One MoE layer's top-k decision for T tokens: what a routing trace records and a replay
    imposes."""

    experts_TK: torch.Tensor
    """Index of each token's k-th expert (any integer dtype)."""
    weights_TK: torch.Tensor
    """Combine weight of each token's k-th expert, final (after renormalisation and scale)."""


def balanced_experts(
    num_tokens: int, top_k: int, num_experts: int, device: torch.device
) -> torch.Tensor:
    """experts_TK with token t's k-th expert (t*K + k) mod E: K distinct experts per token
    (K <= E), every expert floor or ceil of T*K/E rows (torchtitan's forced balance)."""
    rows_R = torch.arange(num_tokens * top_k, device=device)
    return (rows_R % num_experts).view(num_tokens, top_k)


def balanced_rows_per_expert(
    num_tokens: int, top_k: int, num_experts: int, capacity: int | None = None
) -> list[int]:
    """The rows :func:`balanced_experts` gives each expert, as Python ints: row r = t*K + k goes
    to expert r mod E, so expert e gets floor(T*K/E) rows plus one when e < (T*K mod E); at
    most ``capacity`` each when a capacity limit drops the rest."""
    rows, num_experts_with_extra = divmod(num_tokens * top_k, num_experts)
    counts = [rows + (e < num_experts_with_extra) for e in range(num_experts)]
    return counts if capacity is None else [min(c, capacity) for c in counts]


def count_per_expert(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows routed to each of the E experts (long): ``bincount`` with a fixed output shape.

    ``torch.bincount`` reads the input's min and max back to the host on CUDA (SummaryOps.cu), a
    device->host sync, and torch.compile breaks its graph at it (a data-dependent output size).
    A scatter-add into E zeros gives the same counts with neither.
    """
    experts_R = experts_TK.reshape(-1)
    return experts_R.new_zeros(num_experts).scatter_add_(0, experts_R, torch.ones_like(experts_R))


def _softmax_scores(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs_TE = logits_TE.softmax(dim=-1)
    return probs_TE, probs_TE


def _sigmoid_scores(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores_TE = logits_TE.sigmoid()
    return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)


ROUTER_SCORES: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "softmax": _softmax_scores,
    "sigmoid": _sigmoid_scores,
}
"""Router gate by name: fp32 logits -> (scores the top-k picks and weights with, the
distribution over E the load-balancing loss averages)."""


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Rows one expert may take: ceil(factor * T * K / E), T the tokens of this micro-batch on
    this rank (Switch Transformer sec. 2.2's expert capacity, tokens / E * factor, with K rows
    per token)."""
    return math.ceil(factor * num_tokens * top_k / num_experts)


def capacity_keep(
    experts_TK: torch.Tensor,
    priority_TK: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    capacity: int,
) -> torch.Tensor:
    """keep_TK: for every expert, its ``capacity`` rows of highest priority (ties: the earlier
    token, then the earlier k) are True, the rest False. ``tokens_per_expert_E``: the rows
    routed to each expert (:func:`count_per_expert` of ``experts_TK``)."""
    experts_R = experts_TK.reshape(-1)
    by_priority_R = priority_TK.detach().reshape(-1).argsort(descending=True, stable=True)
    # Stable sort by expert of the priority order: rows grouped by expert, best first.
    grouped_R = by_priority_R[experts_R[by_priority_R].argsort(stable=True)]
    counts_E = tokens_per_expert_E
    first_row_E = counts_E.cumsum(0) - counts_E
    rank_R = torch.arange(experts_R.numel(), device=experts_R.device) - first_row_E[
        experts_R[grouped_R]
    ]
    keep_R = torch.empty_like(experts_R, dtype=torch.bool)
    keep_R[grouped_R] = rank_R < capacity
    return keep_R.view_as(experts_TK)


@torch.no_grad()
def update_expert_bias_(
    bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float
) -> None:
    """b_e += rate * sign(mean_j load_j - load_e), in place (DeepSeek-V3 sec. 2.1.2)."""
    load_E = tokens_per_expert_E.to(device=bias_E.device, dtype=torch.float32)
    bias_E.add_((rate * torch.sign(load_E.mean() - load_E)).to(bias_E.dtype))


@torch.no_grad()
def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_e p_te log p_te in nats (log E = uniform); fp32, detached."""
    return torch.special.entr(probs_TE.detach().float()).sum(dim=-1).mean()
