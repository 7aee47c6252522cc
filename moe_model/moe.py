"""Mixture-of-Experts layer: softmax top-k router, auxiliary losses, dropless experts.

Shape suffixes on tensor names:
    B batch, S sequence, T tokens (B*S), D d_model, H expert hidden size, E experts, K top-k,
    L layers, R routed rows (T*K). ``w_in_EDH`` is D x H, or D x 2H for a gated activation
    (its fused w1|w3 output: gate half first, up half second). Inside ``experts`` and
    ``activate``, E and R count this rank's experts and the rows they compute: all of them, or
    under expert parallelism (``moe_model/expert_parallel.py``) E/ep experts and the rows the
    EP group sent them.

Routing follows OLMoE: router logits = x @ W_r (no bias), softmax over all E experts in fp32,
top-k of the probabilities used as combine weights, not renormalised (unless configured).
Experts are dropless: every (token, expert) pair is computed, with tokens sorted by expert and
one grouped matmul per projection (``torch.nn.functional.grouped_mm``) or a per-expert loop.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from moe_model.activations import build_activation
from moe_model.init import trunc_normal_

if TYPE_CHECKING:
    from moe_model.config import ModelConfig

__all__ = [
    "Dispatched",
    "local_weight",
    "LocalDispatcher",
    "MoEAux",
    "MoELayer",
    "Routing",
    "combine",
    "grouped_mm",
    "load_balancing_loss",
    "router_z_loss",
    "sort_by_expert",
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
    """Softmax over all E experts (fp32): what the load-balancing loss averages."""
    weights_TK: torch.Tensor
    """Combine weight of each token's k-th expert (fp32)."""
    experts_TK: torch.Tensor
    """Index of each token's k-th expert (long)."""


def combine(y_RD: torch.Tensor, weights_TK: torch.Tensor, inverse_R: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * (row of token t's k-th choice), in y_RD's dtype.

    ``inverse_R[t*K + k]`` is the position in y_RD (rows sorted by expert) of token t's k-th
    choice. The combine weights are applied after w_out (megablocks). Products and the sum over
    k run in fp32 (the weights are fp32, so the product promotes) and the total is rounded to
    y_RD's dtype once: a bf16 ``index_add_`` rounds every partial sum, in whatever order CUDA's
    atomics land. Autograd keeps the rows in y_RD's dtype and the weights; the fp32 products
    are a temporary.
    """
    num_tokens, top_k = weights_TK.shape
    y_TKD = y_RD.index_select(0, inverse_R).view(num_tokens, top_k, y_RD.shape[-1])
    return (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1).to(y_RD.dtype)


@dataclass
class Dispatched:
    """What :meth:`LocalDispatcher.combine` needs to undo its dispatch."""

    inverse_R: torch.Tensor
    """Row of y_RD (sorted by expert) holding each flattened (token, k) choice."""


def sort_by_expert(experts_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_R, inverse_R)`` of the T*K (token, expert) rows sorted by expert, a stable sort
    (equal experts keep token order): the token of each sorted row, and the sorted row of each
    flattened (token, k) choice (what :func:`combine` reads)."""
    order_R = experts_TK.reshape(-1).argsort(stable=True)
    return order_R // experts_TK.shape[-1], order_R.argsort()


class LocalDispatcher:
    """Sends each (token, expert) row to its expert on this rank: a stable sort by expert.

    ``dispatch`` returns the rows grouped by expert (``tokens_per_expert_E`` rows each, in
    expert order, equal experts keeping token order) and ``combine`` sums each token's K expert
    outputs, weighted, back into token order (:func:`combine`: fp32, rounded once, no atomics).
    """

    def local_experts(self, num_experts: int) -> range:
        """The experts whose weights this rank computes with: all of them."""
        return range(num_experts)

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        token_R, inverse_R = sort_by_expert(experts_TK)
        tokens_per_expert_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts)
        return x_TD[token_R], tokens_per_expert_E, Dispatched(inverse_R=inverse_R)

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
    """Rows this rank's tokens routed to each of the E experts (long, detached)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        # Lets callers treat it as a mapping too: aux["lb_loss"].
        return getattr(self, key)


def load_balancing_loss(
    probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, top_k: int, weight: float
) -> torch.Tensor:
    """w * E/(T*K) * sum_e count_e * mean_t probs_TE[t, e]; the gradient flows through probs."""
    num_tokens, num_experts = probs_TE.shape
    mean_prob_E = probs_TE.float().mean(dim=0)
    scale = weight * num_experts / (num_tokens * top_k)
    return scale * torch.dot(tokens_per_expert_E.to(mean_prob_E.dtype), mean_prob_E)


def router_z_loss(logits_TE: torch.Tensor, top_k: int, weight: float) -> torch.Tensor:
    """w * sum_t logsumexp(logits_t)^2 / (T*K); logsumexp in fp32 (stable: it subtracts the max)."""
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return weight * lse_T.square().sum() / (logits_TE.shape[0] * top_k)


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


class MoELayer(nn.Module):
    """Router + E experts, each FFN ``act(x @ w_in[e]) @ w_out[e]``; one activation per layer."""

    def __init__(self, config: ModelConfig, init_device: str | torch.device = "cpu"):
        super().__init__()
        self.config = config
        d, h, e = config.d_model, config.mlp_hidden_size, config.moe_num_experts
        self.num_experts = e
        self.top_k = config.moe_top_k
        self.renormalize = config.moe_renormalize
        self.lb_weight = config.moe_loss_weight
        self.z_weight = config.moe_zloss_weight
        self.expert_impl = config.moe_expert_impl
        self.dispatcher = LocalDispatcher()
        self.router = nn.Linear(d, e, bias=False, device=init_device)
        # One activation module (one coefficient set) per layer shared by the experts, as in the
        # paper; or, with moe_activation_per_expert, one module per expert.
        if config.activation_sets_per_layer > 1:
            self.act = nn.ModuleList(
                build_activation(config.activation_type, **config.activation_kwargs())
                for _ in range(e)
            )
        else:
            self.act = build_activation(config.activation_type, **config.activation_kwargs())
        self.act.to(init_device)
        self.w_in_EDH = nn.Parameter(torch.empty(e, d, config.mlp_in_size, device=init_device))
        self.w_out_EHD = nn.Parameter(torch.empty(e, h, d, device=init_device))
        if torch.device(init_device).type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.router.weight, self.w_in_EDH, self.w_out_EHD):
            trunc_normal_(w, std=self.config.init_std, cutoff_factor=self.config.init_cutoff_factor)
        for act in self.act if isinstance(self.act, nn.ModuleList) else [self.act]:
            if hasattr(act, "reset_parameters"):
                act.reset_parameters()

    # ---- routing -----------------------------------------------------------------------------

    def route(self, x_TD: torch.Tensor) -> Routing:
        """Router logits, probabilities and the top-k choice of every token."""
        # Softmax and top-k in fp32: bf16 probabilities tie often and skew the choice. The router
        # runs as a module: under expert parallelism it is an FSDP unit of its own, gathered by
        # its forward hook.
        logits_TE = self.router(x_TD).float()
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, weights_TK, experts_TK)

    def _impl(self, x_RD: torch.Tensor) -> str:
        """'grouped_mm' or 'loop' for rows ``x_RD`` (already in the compute dtype)."""
        if x_RD.shape[0] == 0:
            # An expert-parallel rank can receive no rows; grouped_mm's CPU backward rejects an
            # empty input, and the loop still gives its weights a (zero) gradient for FSDP.
            return "loop"
        if self.expert_impl != "auto":
            return self.expert_impl
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
        if x_RD.device.type == "cpu" and not torch.compiler.is_compiling():
            return "grouped_mm"
        return "loop"

    # ---- experts -----------------------------------------------------------------------------

    def experts(
        self, x_RD: torch.Tensor, tokens_per_expert_E: torch.Tensor, impl: str
    ) -> torch.Tensor:
        """Expert FFNs over rows sorted by expert (``tokens_per_expert_E`` rows each, for the
        experts this rank holds)."""
        dtype = x_RD.dtype
        w_in_EDH = local_weight(self.w_in_EDH, dtype)
        w_out_EHD = local_weight(self.w_out_EHD, dtype)
        if impl == "grouped_mm":
            # offs[e] = end row of expert e; empty experts repeat the previous offset.
            offs_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
            h_RH = grouped_mm(x_RD, w_in_EDH, offs=offs_E)
            return grouped_mm(self.activate(h_RH, tokens_per_expert_E), w_out_EHD, offs=offs_E)
        if impl == "loop":
            # One host sync for the split sizes; empty experts get empty slices.
            counts = tokens_per_expert_E.tolist()
            h_RH = torch.cat([x_ND @ w_in_EDH[e] for e, x_ND in enumerate(x_RD.split(counts))])
            a_RH = self.activate(h_RH, tokens_per_expert_E)
            return torch.cat([a_NH @ w_out_EHD[e] for e, a_NH in enumerate(a_RH.split(counts))])
        raise ValueError(f"unknown moe_expert_impl {impl!r}; expected 'grouped_mm' or 'loop'")

    def activate(self, h_RH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """The activation over rows sorted by expert.

        A shared activation runs once over all rows (it is row-wise). Per-expert coefficient sets
        run expert by expert (one host sync for the split sizes), empty experts included, and
        under expert parallelism the other ranks' experts too, on no rows: their coefficients
        then get a zero gradient rather than none, so every FSDP rank reduces the same set of
        gradients.
        """
        if not isinstance(self.act, nn.ModuleList):
            return self.act(h_RH)
        local = self.dispatcher.local_experts(self.num_experts)
        h_by_expert = dict(zip(local, h_RH.split(tokens_per_expert_E.tolist()), strict=True))
        return torch.cat(
            [act(h_by_expert.get(e, h_RH[:0])) for e, act in enumerate(self.act)]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """``x`` (..., D) -> (y shaped like x, MoEAux): route, dispatch, experts, combine."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        routing = self.route(x_TD)
        # The auxiliary loss and the load metrics count this rank's tokens per expert (all E);
        # the experts count the rows they compute, which under expert parallelism are other
        # ranks' tokens for this rank's experts.
        tokens_per_expert_E = torch.bincount(
            routing.experts_TK.reshape(-1), minlength=self.num_experts
        )
        x_RD, rows_per_expert, dispatched = self.dispatcher.dispatch(
            x_TD.to(compute_dtype(x)), routing.experts_TK, self.num_experts
        )
        y_RD = self.experts(x_RD, rows_per_expert, self._impl(x_RD))
        y_TD = self.dispatcher.combine(y_RD, routing.weights_TK, dispatched)
        aux = MoEAux(
            lb_loss=load_balancing_loss(
                routing.probs_TE, tokens_per_expert_E, self.top_k, self.lb_weight
            ),
            z_loss=router_z_loss(routing.logits_TE, self.top_k, self.z_weight),
            tokens_per_expert_E=tokens_per_expert_E.detach(),
        )
        return y_TD.reshape(shape), aux
