"""The router's auxiliary losses, already weighted (megablocks' formulas, which OLMoE used):

    lb_loss = w_lb * E / (T*K) * sum_e count_e * mean_prob_e   (= w_lb at perfect balance)
    z_loss  = w_z * sum_t logsumexp(logits_t)^2 / (T*K)

Shape suffixes as in ``moe.py``. Nothing from the router is kept on the module between calls
(the paper's megablocks setup kept router tensors every step and leaked memory); the losses
travel in the returned ``MoEAux``.

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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_model.precision import upcast

__all__ = [
    "LB_GRANULARITIES",
    "global_load_balancing_loss",
    "load_balancing_loss",
    "router_z_loss",
    "sequence_load_balancing_loss",
]


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
