"""Mixture-of-Experts layer: top-k router, auxiliary losses, experts (dropless by default).

Shape suffixes on tensor names:
    B batch, S sequence, T tokens (B*S), D d_model, H expert hidden size, E experts, K top-k,
    L layers, R routed rows (T*K, or the kept ones), N kept (token, k) pairs.
    No op in the forward reads a device value back to the host (a CUDA sync) except the
    split sizes of expert parallelism, of per-expert activation sets and of the 'loop'
    experts: counts come from fixed-shape scatters (tests/cuda_rules.py checks it).
    ``w_in_EDH`` is D x H, or D x 2H for a gated activation (its fused w1|w3 output: gate half
    first, up half second). Inside ``experts`` and ``activate``, E and R count this rank's
    experts and the rows they compute: all of them, or under expert parallelism
    (``moe_model/expert_parallel.py``) E/ep experts and the rows the EP group sent them.

Routing follows OLMoE by default: router logits = x @ W_r (no bias), softmax over all E experts
in fp32, top-k of the probabilities used as combine weights, not renormalised (unless
configured). Experts are dropless: every (token, expert) pair is computed, with tokens sorted by
expert and one grouped matmul per projection (``torch.nn.functional.grouped_mm``) or a
per-expert loop.

The forward runs four stages: ``route`` (router -> :class:`Routing`), ``dispatcher.dispatch``
(rows grouped by expert), ``experts`` (the FFNs), ``dispatcher.combine`` (weighted sum back into
token order). The dispatcher is the seam where expert parallelism moves rows between ranks;
:class:`LocalDispatcher` keeps them on this rank, ``expert_parallel.AllToAllDispatcher`` sends
them to the ranks that hold their experts. The auxiliary losses and load counts come from the
routing of this rank's tokens, whichever dispatcher runs.

Auxiliary losses (megablocks' formulas, which OLMoE trained with), already weighted:
    lb_loss = w_lb * E / (T*K) * sum_e count_e * mean_prob_e   (= w_lb at perfect balance)
    z_loss  = w_z * sum_t logsumexp(logits_t)^2 / (T*K)
Nothing from the router is kept on the module between calls (the paper's megablocks setup kept
router tensors every step and leaked memory); the losses travel in the returned ``MoEAux``.

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
* ``moe_lb_granularity`` (:data:`LB_GRANULARITIES`): the tokens one load-balancing term counts.
  ``micro_batch``: the formula above over the micro-batch (OLMoE). ``sequence``: the same
  formula per sequence (T = S), averaged over the B sequences: DeepSeek-V3's complementary
  sequence-wise balance loss (eqs. 17-20, with alpha = w_lb). ``global_batch``: count_e and T
  summed over the data-parallel ranks before the loss, mean_prob_e still this rank's; the
  ranks' mean loss and gradient equal the micro-batch loss over all ranks' tokens together.
  The all-reduce runs once per micro-batch: with gradient accumulation each accumulation
  micro-batch has its own term over the ranks' simultaneous micro-batches, and counts are not
  pooled across accumulation steps. Qiu et al. 2025 ("Demons in the detail",
  arXiv:2501.11873) synchronise the selection frequencies f_e over all parallel groups and, to
  reach the whole global batch under gradient accumulation, also accumulate them over the
  accumulation steps in a buffer; this option does the first only.
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
* ``moe_shared_experts``: always-on FFNs (:class:`FeedForward`, the layer's activation, their
  own coefficient sets) whose outputs are added to the routed output: y = sum_s FFN_s(x) +
  sum_k g_k FFN_{e_k}(x) (DeepSeek-V3 eq. 12; torchtitan models/common/moe.py). olmo-core
  instead weights shared and routed outputs 1/(K+1) and K/(K+1).
* ``moe_first_dense_layers`` k: blocks 0..k-1 have one dense FFN y = act(x W_in) W_out of width
  ``moe_first_dense_hidden_size`` (default K * H, the routed experts' active width) instead of
  this layer (``transformer.DenseFFN``). DeepSeek-V3 keeps its first 3 blocks dense:
  ``n_dense_layers`` 3 in inference/configs/config_671B.json of deepseek-ai/DeepSeek-V3
  (``first_k_dense_replace`` 3 in the Hugging Face config.json), their FFN ``inter_dim`` 18432 =
  (8 routed + 1 shared) * ``moe_inter_dim`` 2048, i.e. the MoE layers' active width with the
  shared expert counted; set the width explicitly to match that.
* Fine-grained experts (DeepSeekMoE, arXiv:2401.06066 sec. 3.1): each expert split into m
  smaller ones by dividing its hidden size by m, with m times as many experts and m times the
  top-k (E -> mE, H -> H/m, K -> mK), which keeps the expert parameters (E*H) and the active
  FLOPs (K*H) per token; only the router grows (D x mE). Nothing here is special-cased: set
  ``moe_num_experts``, ``moe_top_k`` and ``mlp_hidden_size``; every option above takes any E
  and K.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moe_model.activations import ACTIVATIONS, build_activation
from moe_model.init import WeightInit
from moe_model.precision import upcast

if TYPE_CHECKING:
    from moe_model.expert_parallel import AllToAllDispatcher

__all__ = [
    "LB_GRANULARITIES",
    "ROUTER_SCORES",
    "ActivationSpec",
    "Dispatched",
    "FeedForward",
    "local_weight",
    "LocalDispatcher",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "Routing",
    "capacity_keep",
    "combine",
    "COMBINE_CHUNK_BYTES",
    "count_per_expert",
    "expert_capacity",
    "global_load_balancing_loss",
    "grouped_mm",
    "load_balancing_loss",
    "router_entropy",
    "router_z_loss",
    "sequence_load_balancing_loss",
    "sort_by_expert",
    "update_expert_bias_",
]

# torch >= 2.10 has the public name; older torches only the private op.
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm

GROUPED_MM_ALIGN = 8
"""grouped_mm needs 16-byte aligned strides: 8 elements in bf16 (4 would do in fp32)."""


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


def count_per_expert(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows routed to each of the E experts (long): ``bincount`` with a fixed output shape.

    ``torch.bincount`` reads the input's min and max back to the host on CUDA (SummaryOps.cu), a
    device->host sync, and torch.compile breaks its graph at it (a data-dependent output size).
    A scatter-add into E zeros gives the same counts with neither.
    """
    experts_R = experts_TK.reshape(-1)
    return experts_R.new_zeros(num_experts).scatter_add_(0, experts_R, torch.ones_like(experts_R))


COMBINE_CHUNK_BYTES = 128 * 2**20
"""Size of the fp32 (tokens, K, D) products :func:`combine` forms per chunk of tokens: 2048
tokens of an OLMoE layer (K 8, D 2048), 8 chunks of its 16384, instead of 1 GiB at once."""


def combine(
    y_RD: torch.Tensor,
    weights_TK: torch.Tensor,
    inverse_R: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * (row of token t's k-th choice), in y_RD's dtype.

    ``inverse_R[t*K + k]`` is the position in y_RD (rows sorted by expert) of token t's k-th
    choice. The combine weights are applied after w_out (megablocks). Products and the sum over
    k run in fp32 (the weights are fp32, so the product promotes) and the total is rounded to
    y_RD's dtype once: a bf16 ``index_add_`` rounds every partial sum, in whatever order CUDA's
    atomics land.

    The fp32 products run ``chunk_tokens`` tokens at a time (default: chunks of
    :data:`COMBINE_CHUNK_BYTES`), forward and backward (:class:`_Combine`), so no fp32
    (T, K, D) tensor exists: the one-shot form made 1 GiB of fp32 products forward and two more
    (the gradients of the rows and of the weights) backward at OLMoE shapes. What autograd
    keeps is unchanged: the rows gathered into token order, (T, K, D) in y_RD's dtype (the
    weights' gradient reads them), in place of y_RD, which then can be freed. Each chunk computes
    what the one-shot form computed for its tokens, in the same order, so the values are the
    same, and the bytes moved are the same. Why chunks of plain torch ops rather than a fused
    kernel: they run, and are tested, on every device including CPU, compile without graph
    breaks, need no host sync, and cut the memory; a fused Triton kernel would also cut the
    bytes (rows read once, output written once) but needs a GPU to be tested on.
    """
    num_tokens, top_k = weights_TK.shape
    if chunk_tokens is None:
        chunk_tokens = max(1, COMBINE_CHUNK_BYTES // (4 * top_k * y_RD.shape[-1]))
    return _Combine.apply(y_RD, weights_TK, inverse_R, chunk_tokens)


class _Combine(torch.autograd.Function):
    """:func:`combine` with its fp32 products chunk by chunk of tokens."""

    @staticmethod
    def forward(ctx, y_RD, weights_TK, inverse_R, chunk_tokens):
        num_tokens, top_k = weights_TK.shape
        y_TKD = y_RD.index_select(0, inverse_R).view(num_tokens, top_k, y_RD.shape[-1])
        y_TD = y_RD.new_empty(num_tokens, y_RD.shape[-1])
        for start in range(0, num_tokens, chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            # fp32 products and sum; the copy into y_TD rounds to y_RD's dtype once.
            y_TD[chunk] = (y_TKD[chunk] * weights_TK[chunk].unsqueeze(-1)).sum(dim=1)
        ctx.save_for_backward(y_TKD, weights_TK, inverse_R)
        ctx.chunk_tokens, ctx.num_rows = chunk_tokens, y_RD.shape[0]
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):
        y_TKD, weights_TK, inverse_R = ctx.saved_tensors
        num_tokens, top_k, d = y_TKD.shape
        grad_y_RD = grad_w_TK = None
        if ctx.needs_input_grad[0]:
            grad_y_RD = y_TKD.new_zeros(ctx.num_rows, d)
        if ctx.needs_input_grad[1]:
            grad_w_TK = torch.empty_like(weights_TK)
        inverse_TK = inverse_R.view(num_tokens, top_k)
        for start in range(0, num_tokens, ctx.chunk_tokens):
            chunk = slice(start, start + ctx.chunk_tokens)
            g_C1D = upcast(grad_TD[chunk]).unsqueeze(1)
            if grad_y_RD is not None:
                # A row is one token's k-th choice: one add into zeros, so no sum is rounded.
                # (A dropped choice's row trails the experts' rows; the dispatcher zeroes
                # what flows back into it.)
                grad_CKD = (g_C1D * weights_TK[chunk].unsqueeze(-1)).to(y_TKD.dtype)
                grad_y_RD.index_add_(0, inverse_TK[chunk].reshape(-1), grad_CKD.view(-1, d))
            if grad_w_TK is not None:
                grad_w_TK[chunk] = (g_C1D * y_TKD[chunk]).sum(dim=-1)
        return grad_y_RD, grad_w_TK, None, None


@dataclass
class Dispatched:
    """What :meth:`LocalDispatcher.combine` needs to undo its dispatch."""

    inverse_R: torch.Tensor
    """Row of y_RD (sorted by expert) holding each flattened (token, k) choice."""
    padded: bool = False
    """Whether rows past the last expert's (the dropped ones) trail the expert rows."""


def sort_by_expert(
    experts_TK: torch.Tensor, keep_TK: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_R, inverse_R)`` of the T*K (token, expert) rows sorted by expert, a stable sort
    (equal experts keep token order): the token of each sorted row, and the sorted row of each
    flattened (token, k) choice (what :func:`combine` reads). With ``keep_TK`` the dropped rows
    sort last (as if routed to an expert past the last), so the kept ones keep the positions a
    sort of the kept rows alone gives them, and every shape stays T*K (no host sync for N)."""
    if keep_TK is not None:
        experts_TK = torch.where(keep_TK, experts_TK, torch.iinfo(experts_TK.dtype).max)
    order_R = experts_TK.reshape(-1).argsort(stable=True)
    return order_R // experts_TK.shape[-1], order_R.argsort()


class LocalDispatcher:
    """Sends each (token, expert) row to its expert on this rank: a stable sort by expert.

    ``dispatch`` returns the rows grouped by expert (``rows_per_expert_E`` rows each, in expert
    order, equal experts keeping token order) and ``combine`` sums each token's K expert
    outputs, weighted, back into token order (:func:`combine`: fp32, rounded once, no atomics).
    With ``keep_TK`` (capacity drops) the dropped rows trail the expert rows (``padded``): the
    experts give them zeros, which add nothing to their tokens.
    """

    def local_experts(self, num_experts: int) -> range:
        """The experts whose weights this rank computes with: all of them."""
        return range(num_experts)

    def dispatch(
        self,
        x_TD: torch.Tensor,
        experts_TK: torch.Tensor,
        rows_per_expert_E: torch.Tensor,
        keep_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        """``rows_per_expert_E``: the (kept) rows of each expert, as the router counted them."""
        token_R, inverse_R = sort_by_expert(experts_TK, keep_TK)
        dispatched = Dispatched(inverse_R=inverse_R, padded=keep_TK is not None)
        return x_TD[token_R], rows_per_expert_E, dispatched

    def combine(
        self, y_RD: torch.Tensor, weights_TK: torch.Tensor, dispatched: Dispatched
    ) -> torch.Tensor:
        return combine(y_RD, weights_TK, dispatched.inverse_R)


@dataclass
class MoEAux:
    """What one MoE forward reports besides its output."""

    lb_loss: torch.Tensor
    """Weighted load-balancing loss (scalar, fp32, differentiable w.r.t. the router)."""
    z_loss: torch.Tensor
    """Weighted router z-loss (scalar, fp32, differentiable w.r.t. the router)."""
    tokens_per_expert_E: torch.Tensor
    """Rows this rank's tokens routed to each of the E experts (long, detached): the router's
    choice, before any drop."""
    router_entropy: torch.Tensor | None = None
    """Mean entropy of the router's distribution over experts (fp32 scalar, detached)."""
    dropped_rows: torch.Tensor | None = None
    """Routed rows dropped by the capacity limit (long scalar); None when dropless."""

    def __getitem__(self, key: str) -> torch.Tensor:
        # Lets callers treat it as a mapping too: aux["lb_loss"].
        return getattr(self, key)


def load_balancing_loss(
    probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, top_k: int, weight: float
) -> torch.Tensor:
    """w * E/(T*K) * sum_e count_e * mean_t probs_TE[t, e]; the gradient flows through probs."""
    num_tokens, num_experts = probs_TE.shape
    mean_prob_E = upcast(probs_TE).mean(dim=0)
    scale = weight * num_experts / (num_tokens * top_k)
    return scale * torch.dot(tokens_per_expert_E.to(mean_prob_E.dtype), mean_prob_E)


def router_z_loss(logits_TE: torch.Tensor, top_k: int, weight: float) -> torch.Tensor:
    """w * sum_t logsumexp(logits_t)^2 / (T*K); logsumexp in fp32 (stable: it subtracts the max)."""
    lse_T = torch.logsumexp(upcast(logits_TE), dim=-1)
    return weight * lse_T.square().sum() / (logits_TE.shape[0] * top_k)


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


def sequence_load_balancing_loss(
    probs_BSE: torch.Tensor, experts_BSK: torch.Tensor, top_k: int, weight: float
) -> torch.Tensor:
    """Mean over sequences b of w * E/(S*K) * sum_e count_be * mean_s probs_BSE[b, s, e], count_be
    the rows of sequence b routed to e (DeepSeek-V3's sequence-wise balance loss, eqs. 17-20)."""
    num_seqs, seq_len, num_experts = probs_BSE.shape
    mean_prob_BE = upcast(probs_BSE).mean(dim=1)
    counts_BE = mean_prob_BE.new_zeros(num_seqs, num_experts).scatter_add_(
        1, experts_BSK.reshape(num_seqs, -1), mean_prob_BE.new_ones(num_seqs, seq_len * top_k)
    )
    scale = weight * num_experts / (seq_len * top_k)
    return scale * (counts_BE * mean_prob_BE).sum(dim=-1).mean()


def global_load_balancing_loss(
    probs_TE: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    top_k: int,
    weight: float,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """w * E/(T_all*K) * sum_e count_all_e * mean_t probs_TE[t, e]: the counts and the token count
    summed over the ranks of ``group`` (one all-reduce), the probabilities this rank's.

    Called per micro-batch, so the sums cover the ranks' simultaneous micro-batches, not the
    gradient-accumulation micro-batches of a step (Qiu et al., arXiv:2501.11873, also pool
    over those with a buffer; see the module docstring)."""
    num_tokens, num_experts = probs_TE.shape
    totals = torch.cat([tokens_per_expert_E.detach().long(), tokens_per_expert_E.new_tensor(
        [num_tokens], dtype=torch.long)])
    dist.all_reduce(totals, group=group)
    counts_E, all_tokens = totals[:-1], totals[-1]
    mean_prob_E = upcast(probs_TE).mean(dim=0)
    scale = weight * num_experts / (all_tokens.to(mean_prob_E.dtype) * top_k)
    return scale * torch.dot(counts_E.to(mean_prob_E.dtype), mean_prob_E)


def _lb_micro_batch(routing, tokens_per_expert_E, seq_len, top_k, weight, group):
    del seq_len, group
    return load_balancing_loss(routing.probs_TE, tokens_per_expert_E, top_k, weight)


def _lb_sequence(routing, tokens_per_expert_E, seq_len, top_k, weight, group):
    del tokens_per_expert_E, group
    num_experts = routing.probs_TE.shape[-1]
    return sequence_load_balancing_loss(
        routing.probs_TE.reshape(-1, seq_len, num_experts),
        routing.experts_TK.reshape(-1, seq_len, top_k),
        top_k,
        weight,
    )


def _lb_global_batch(routing, tokens_per_expert_E, seq_len, top_k, weight, group):
    del seq_len
    if group is None:  # not training across ranks: the micro-batch is the whole batch
        return load_balancing_loss(routing.probs_TE, tokens_per_expert_E, top_k, weight)
    return global_load_balancing_loss(routing.probs_TE, tokens_per_expert_E, top_k, weight, group)


LB_GRANULARITIES: dict[str, Callable[..., torch.Tensor]] = {
    "micro_batch": _lb_micro_batch,
    "sequence": _lb_sequence,
    "global_batch": _lb_global_batch,
}
"""Load-balancing granularity by name: (routing, tokens_per_expert_E, seq_len, top_k, weight,
group to reduce counts over or None) -> the weighted loss."""


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


def local_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Expert weights ``w`` in ``dtype``: this rank's experts when expert parallelism made ``w``
    a DTensor sharded over the EP group (its local tensor), else all of them."""
    if isinstance(w, DTensor):
        w = w.to_local()
    return w.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when active, else the input's.

    grouped_mm has no autocast rule, so under autocast its operands are cast by hand.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass(frozen=True)
class ActivationSpec:
    """The activation an FFN builds: a registry name and the constructor settings it takes."""

    name: str
    """Key of moe_model.activations.ACTIVATIONS."""
    kwargs: dict[str, Any]
    """Constructor keywords, only those the class lists in ``options``."""

    def build(self) -> nn.Module:
        return build_activation(self.name, **self.kwargs)

    @property
    def gated(self) -> bool:
        """Whether the activation takes a fused 2H input (w1 and w3)."""
        return ACTIVATIONS[self.name].gated

    def in_size(self, hidden_size: int) -> int:
        """Output width of an FFN input projection of hidden size ``hidden_size`` (2x if gated)."""
        return 2 * hidden_size if self.gated else hidden_size


@dataclass(frozen=True)
class MoEConfig:
    """What one MoE layer is built from (``ModelConfig.moe_layer_config`` fills it from the
    ``moe_*`` keys; see there for each option's meaning)."""

    d_model: int
    """Width D of the tokens in and out."""
    hidden_size: int
    """Expert hidden size H."""
    num_experts: int
    """Routed experts E."""
    top_k: int
    """Experts per token K."""
    activation: ActivationSpec
    """The experts' (and shared experts') activation."""
    activation_per_expert: bool
    """One coefficient set per expert (the activation has coefficients and the option is on)."""
    init: WeightInit
    """Init of the router, expert and shared-expert weights."""
    router_score: str
    """Key of :data:`ROUTER_SCORES`."""
    renormalize: bool
    """Renormalise the top-k weights to sum to 1."""
    route_scale: float
    """Factor on the combine weights."""
    bias_update_rate: float | None
    """Auxiliary-loss-free balancing step; None = off."""
    capacity_factor: float | None
    """Expert capacity factor in training; None = dropless."""
    lb_granularity: str
    """Key of :data:`LB_GRANULARITIES`."""
    lb_weight: float
    """Load-balancing loss weight."""
    z_weight: float
    """Router z-loss weight."""
    expert_impl: str
    """'grouped_mm', 'loop' or 'auto'."""
    shared_experts: int
    """Always-on experts."""
    shared_hidden_size: int
    """Hidden size of each shared expert."""


class FeedForward(nn.Module):
    """One FFN ``act(x @ w_in) @ w_out`` with its own activation module: a shared expert, or
    the FFN of a dense block (transformer.DenseFFN)."""

    def __init__(
        self,
        d_model: int,
        hidden_size: int,
        activation: ActivationSpec,
        init: WeightInit,
        init_device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.init = init
        self.w_in = nn.Linear(d_model, activation.in_size(hidden_size), bias=False,
                              device=init_device)  # fmt: skip
        self.act = activation.build()
        self.act.to(init_device)
        self.w_out = nn.Linear(hidden_size, d_model, bias=False, device=init_device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.w_in.weight, self.w_out.weight):
            self.init(w)
        if hasattr(self.act, "reset_parameters"):
            self.act.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.act(self.w_in(x)))


class MoELayer(nn.Module):
    """Router + E experts, each FFN ``act(x @ w_in[e]) @ w_out[e]``; one activation per layer."""

    def __init__(self, config: MoEConfig, init_device: str | torch.device = "cpu"):
        super().__init__()
        self.config = config
        d, h, e = config.d_model, config.hidden_size, config.num_experts
        # Where rows go (parallelize swaps in the expert-parallel one) and which ranks' counts
        # the 'global_batch' balance loss sums (None: this rank's alone).
        self.dispatcher: LocalDispatcher | AllToAllDispatcher = LocalDispatcher()
        self.lb_group: dist.ProcessGroup | None = None
        self.router = nn.Linear(d, e, bias=False, device=init_device)
        if config.bias_update_rate is not None:
            # A buffer: in the state dict (checkpoints resume it) but not a parameter, so the
            # optimizer never sees it; fp32 whatever the parameter dtype.
            self.register_buffer(
                "expert_bias_E", torch.zeros(e, dtype=torch.float32, device=init_device)
            )
        else:
            self.expert_bias_E = None
        # One activation module (one coefficient set) per layer shared by the experts, as in the
        # paper; or, with moe_activation_per_expert, one module per expert.
        if config.activation_per_expert:
            self.act = nn.ModuleList(config.activation.build() for _ in range(e))
        else:
            self.act = config.activation.build()
        self.act.to(init_device)
        self.w_in_EDH = nn.Parameter(
            torch.empty(e, d, config.activation.in_size(h), device=init_device)
        )
        self.w_out_EHD = nn.Parameter(torch.empty(e, h, d, device=init_device))
        if config.shared_experts:
            self.shared_experts = nn.ModuleList(
                FeedForward(d, config.shared_hidden_size, config.activation, config.init,
                            init_device)
                for _ in range(config.shared_experts)
            )  # fmt: skip
        else:
            self.shared_experts = None
        if torch.device(init_device).type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.router.weight, self.w_in_EDH, self.w_out_EHD):
            self.config.init(w)
        for act in self.act if isinstance(self.act, nn.ModuleList) else [self.act]:
            if hasattr(act, "reset_parameters"):
                act.reset_parameters()
        for ffn in self.shared_experts or ():
            ffn.reset_parameters()
        if self.expert_bias_E is not None:
            self.expert_bias_E.zero_()

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """One auxiliary-loss-free step from a whole optimizer step's routed rows per expert
        (already summed over data-parallel ranks); a no-op without moe_bias_update_rate."""
        if self.expert_bias_E is not None:
            update_expert_bias_(self.expert_bias_E, tokens_per_expert_E,
                                self.config.bias_update_rate)  # fmt: skip

    def parallelize(
        self, ep_mesh: DeviceMesh | None = None, lb_group: dist.ProcessGroup | None = None
    ) -> None:
        """Place the layer in a distributed run; call once, before FSDP wraps it.

        ``ep_mesh`` (1-D, the EP group): each of its ranks keeps E/ep experts (the expert
        weights become DTensors ``Shard(0)`` over it; on the meta device too, nothing is
        communicated) and rows travel by all-to-all (``moe_model/expert_parallel.py``).
        Per-expert activation coefficient sets are not split: like the other non-expert
        parameters they stay FSDP-sharded over all ranks (a few floats per expert); each rank
        runs its experts' sets and gives the others a zero gradient (:meth:`activate`).
        ``lb_group``: the data-parallel ranks whose expert counts the 'global_batch'
        load-balancing loss sums in training (the ranks that see different tokens).
        """
        # expert_parallel builds on this module's dispatch functions.
        from moe_model.expert_parallel import EXPERT_WEIGHTS, AllToAllDispatcher

        if ep_mesh is not None:
            for name in EXPERT_WEIGHTS:
                param = getattr(self, name)
                sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
                self.register_parameter(name, nn.Parameter(sharded, param.requires_grad))
            self.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), self.config.num_experts)
        self.lb_group = lb_group

    # ---- routing -----------------------------------------------------------------------------

    def route(self, x_TD: torch.Tensor) -> Routing:
        """Router logits, probabilities, the top-k choice of every token and, with a capacity
        factor in training, which of its rows are kept."""
        # Scores and top-k in fp32: bf16 probabilities tie often and skew the choice. The router
        # runs as a module: under expert parallelism it is an FSDP unit of its own, gathered by
        # its forward hook.
        logits_TE = upcast(self.router(x_TD))
        cfg = self.config
        scores_TE, probs_TE = ROUTER_SCORES[cfg.router_score](logits_TE)
        if self.expert_bias_E is None:
            weights_TK, experts_TK = scores_TE.topk(cfg.top_k, dim=-1)
        else:
            with torch.no_grad():
                biased_TE = scores_TE + self.expert_bias_E.to(scores_TE.dtype)
                experts_TK = biased_TE.topk(cfg.top_k, dim=-1).indices
            weights_TK = scores_TE.gather(-1, experts_TK)
        # Counted once, here, for the capacity limit, the losses, the load metrics and the
        # dispatcher; before any capacity drop.
        tokens_per_expert_E = count_per_expert(experts_TK, cfg.num_experts)
        keep_TK = kept_per_expert_E = None
        if cfg.capacity_factor is not None and self.training:
            capacity = expert_capacity(x_TD.shape[0], cfg.top_k, cfg.num_experts,
                                       cfg.capacity_factor)  # fmt: skip
            keep_TK = capacity_keep(experts_TK, weights_TK, tokens_per_expert_E, capacity)
            kept_per_expert_E = tokens_per_expert_E.clamp(max=capacity)
        if cfg.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if cfg.route_scale != 1.0:
            weights_TK = weights_TK * cfg.route_scale
        return Routing(
            logits_TE, probs_TE, weights_TK, experts_TK, tokens_per_expert_E, keep_TK,
            kept_per_expert_E,
        )  # fmt: skip

    def _impl(self, x_RD: torch.Tensor) -> str:
        """'grouped_mm' or 'loop' for rows ``x_RD`` (already in the compute dtype)."""
        if x_RD.shape[0] == 0:
            # An expert-parallel rank can receive no rows; grouped_mm's CPU backward rejects an
            # empty input, and the loop still gives its weights a (zero) gradient for FSDP.
            return "loop"
        if self.config.expert_impl != "auto":
            return self.config.expert_impl
        # grouped_mm needs 16-byte aligned strides. Its CUDA kernels (CUTLASS, H100) and its
        # meta/fake-tensor rule (torch.compile) accept only bf16; CPU eager runs fp32 too.
        # On CPU fp32 it measured no slower than the per-expert loop (forward + backward, small
        # and medium shapes), so eager CPU runs take it too.
        aligned = all(
            n % GROUPED_MM_ALIGN == 0 for n in (self.w_in_EDH.shape[1], self.w_out_EHD.shape[1])
        )
        if not aligned:
            return "loop"
        if x_RD.dtype == torch.bfloat16:
            return "grouped_mm"
        # grouped_mm has no float64 kernel: float64 (golden traces, gradient checks) loops.
        cpu_eager = x_RD.device.type == "cpu" and not torch.compiler.is_compiling()
        if cpu_eager and x_RD.dtype != torch.float64:
            return "grouped_mm"
        return "loop"

    # ---- experts -----------------------------------------------------------------------------

    def experts(
        self,
        x_RD: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        impl: str,
        padded: bool = False,
    ) -> torch.Tensor:
        """Expert FFNs over rows sorted by expert (``tokens_per_expert_E`` rows each, for the
        experts this rank holds). ``padded``: rows past the experts' (dropped by the capacity
        limit) follow them; they give zeros, and no gradient reaches them or comes from them."""
        dtype = x_RD.dtype
        w_in_EDH = local_weight(self.w_in_EDH, dtype)
        w_out_EHD = local_weight(self.w_out_EHD, dtype)
        if impl == "grouped_mm":
            # offs[e] = end row of expert e; empty experts repeat the previous offset.
            offs_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
            # grouped_mm leaves output rows past offs[-1] unwritten (torch.empty, on CPU and in
            # CUDA's kernels) and so, in backward, the input gradients of those rows: masking
            # both sides keeps them out of the activation, its coefficients' gradients, the
            # combine and x's gradient. Fixed shapes: no host read of the kept-row count.
            if padded:
                valid_R1 = torch.arange(x_RD.shape[0], device=x_RD.device) < offs_E[-1]
                valid_R1 = valid_R1.unsqueeze(-1)
                x_RD = torch.where(valid_R1, x_RD, 0)
            h_RH = grouped_mm(x_RD, w_in_EDH, offs=offs_E)
            if padded:
                h_RH = torch.where(valid_R1, h_RH, 0)
            a_RH = self.activate(h_RH, tokens_per_expert_E)
            if padded:
                a_RH = torch.where(valid_R1, a_RH, 0)
            y_RD = grouped_mm(a_RH, w_out_EHD, offs=offs_E)
            return torch.where(valid_R1, y_RD, 0) if padded else y_RD
        if impl == "loop":
            # The per-expert reference: one host sync for the split sizes; empty experts get
            # empty slices, trailing dropped rows zeros.
            counts = tokens_per_expert_E.tolist()
            rows = sum(counts)
            x_RD, num_padding = x_RD[:rows], x_RD.shape[0] - rows
            h_RH = torch.cat([x_ND @ w_in_EDH[e] for e, x_ND in enumerate(x_RD.split(counts))])
            a_RH = self.activate(h_RH, tokens_per_expert_E)
            y_RD = torch.cat([a_NH @ w_out_EHD[e] for e, a_NH in enumerate(a_RH.split(counts))])
            return F.pad(y_RD, (0, 0, 0, num_padding)) if num_padding else y_RD
        raise ValueError(f"unknown moe_expert_impl {impl!r}; expected 'grouped_mm' or 'loop'")

    def activate(self, h_RH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """The activation over rows sorted by expert (and any trailing dropped rows).

        A shared activation runs once over all rows (it is row-wise). Per-expert coefficient sets
        run expert by expert (one host sync for the split sizes: the documented cost of
        ``moe_activation_per_expert``), empty experts included, and under expert parallelism the
        other ranks' experts too, on no rows: their coefficients then get a zero gradient rather
        than none, so every FSDP rank reduces the same set of gradients. Trailing dropped rows
        come back as zeros.
        """
        if not isinstance(self.act, nn.ModuleList):
            return self.act(h_RH)
        local = self.dispatcher.local_experts(self.config.num_experts)
        counts = tokens_per_expert_E.tolist()
        rows = sum(counts)
        h_by_expert = dict(zip(local, h_RH[:rows].split(counts), strict=True))
        a_RH = torch.cat([act(h_by_expert.get(e, h_RH[:0])) for e, act in enumerate(self.act)])
        num_padding = h_RH.shape[0] - rows
        return F.pad(a_RH, (0, 0, 0, num_padding)) if num_padding else a_RH

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """``x`` (..., D) -> (y shaped like x, MoEAux): route, dispatch, experts, combine, plus
        the shared experts. A 3-d ``x`` is (B, S, D) for the per-sequence balance loss; anything
        else counts as one sequence."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        routing = self.route(x_TD)
        # The auxiliary loss and the load metrics count this rank's tokens per expert (all E),
        # as the router chose them (before any capacity drop); the experts count the rows they
        # compute, which under expert parallelism are other ranks' tokens for this rank's experts.
        tokens_per_expert_E = routing.tokens_per_expert_E
        dropped_rows = None
        rows_per_expert_E = tokens_per_expert_E
        if routing.keep_TK is not None:
            rows_per_expert_E = routing.kept_per_expert_E
            dropped_rows = (~routing.keep_TK).sum()
        x_RD, rows_per_expert, dispatched = self.dispatcher.dispatch(
            x_TD.to(compute_dtype(x)), routing.experts_TK, rows_per_expert_E, routing.keep_TK
        )
        y_RD = self.experts(x_RD, rows_per_expert, self._impl(x_RD), dispatched.padded)
        y_TD = self.dispatcher.combine(y_RD, routing.weights_TK, dispatched)
        for ffn in self.shared_experts or ():
            y_TD = y_TD + ffn(x_TD)
        # Outside training the loss is only reported: this rank's tokens, no collective.
        group = self.lb_group if self.training and torch.is_grad_enabled() else None
        seq_len = shape[-2] if x.dim() >= 3 else x_TD.shape[0]
        cfg = self.config
        aux = MoEAux(
            lb_loss=LB_GRANULARITIES[cfg.lb_granularity](
                routing, tokens_per_expert_E, seq_len, cfg.top_k, cfg.lb_weight, group
            ),
            z_loss=router_z_loss(routing.logits_TE, cfg.top_k, cfg.z_weight),
            tokens_per_expert_E=tokens_per_expert_E.detach(),
            router_entropy=router_entropy(routing.probs_TE),
            dropped_rows=dropped_rows,
        )
        return y_TD.reshape(shape), aux
