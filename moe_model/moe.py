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

Experts are dropless by default: every (token, expert) pair is computed, with tokens sorted by
expert and one grouped matmul per projection (``torch.nn.functional.grouped_mm``) or a
per-expert loop.

The forward runs four stages: ``route`` (router -> :class:`~moe_model.routing.Routing`),
``dispatcher.dispatch`` (rows grouped by expert), ``experts`` (the FFNs), ``dispatcher.combine``
(weighted sum back into token order). The dispatcher is the seam where expert parallelism moves
rows between ranks; ``dispatch.LocalDispatcher`` keeps them on this rank,
``expert_parallel.AllToAllDispatcher`` sends them to the ranks that hold their experts
(:meth:`MoELayer.parallelize`). The auxiliary losses and load counts come from the routing of
this rank's tokens, whichever dispatcher runs, and travel in the returned :class:`MoEAux`.

Its parts: ``routing.py`` (the router's choice and its variants), ``moe_losses.py`` (the
auxiliary losses and their granularities), ``dispatch.py`` (rows to experts and back), this file
(the layer, its experts and shared experts).

Variants of the layer itself, each a ModelConfig option (routing and balancing variants: see
``routing.py`` and ``moe_losses.py``):

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

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moe_model.activations import ACTIVATIONS, build_activation
from moe_model.dispatch import LocalDispatcher
from moe_model.expert_parallel import EXPERT_WEIGHTS, AllToAllDispatcher
from moe_model.init import WeightInit
from moe_model.moe_losses import LB_GRANULARITIES, router_z_loss
from moe_model.precision import upcast
from moe_model.routing import (
    ROUTER_SCORES,
    RouteChoice,
    Routing,
    balanced_experts,
    balanced_rows_per_expert,
    capacity_keep,
    count_per_expert,
    expert_capacity,
    router_entropy,
    update_expert_bias_,
)

__all__ = [
    "GROUPED_MM_ALIGN",
    "ActivationSpec",
    "FeedForward",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "compute_dtype",
    "grouped_mm",
    "local_weight",
]

# torch >= 2.10 has the public name; older torches only the private op.
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm

GROUPED_MM_ALIGN = 8
"""grouped_mm needs 16-byte aligned strides: 8 elements in bf16 (4 would do in fp32)."""


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
    route: RouteChoice | None = None
    """The top-k experts and final combine weights of this rank's tokens (detached), for
    routing traces (``olmo/routing_trace.py``)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        # Lets callers treat it as a mapping too: aux["lb_loss"].
        return getattr(self, key)


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
    force_balance: bool = False
    """Round-robin top-k choice (:func:`balanced_experts`); benchmarks and the planner only."""


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
        if ep_mesh is not None:
            for name in EXPERT_WEIGHTS:
                param = getattr(self, name)
                sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
                self.register_parameter(name, nn.Parameter(sharded, param.requires_grad))
            self.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), self.config.num_experts)
        self.lb_group = lb_group

    # ---- routing -----------------------------------------------------------------------------

    def route(self, x_TD: torch.Tensor, choice: RouteChoice | None = None) -> Routing:
        """Router logits, probabilities, the top-k choice of every token and, with a capacity
        factor in training, which of its rows are kept. ``choice``: experts and final weights
        to use instead of the router's (a replayed trace); the logits still come from x."""
        # Scores and top-k in fp32: bf16 probabilities tie often and skew the choice. The router
        # runs as a module: under expert parallelism it is an FSDP unit of its own, gathered by
        # its forward hook.
        logits_TE = upcast(self.router(x_TD))
        cfg = self.config
        scores_TE, probs_TE = ROUTER_SCORES[cfg.router_score](logits_TE)
        if choice is not None:
            experts_TK = choice.experts_TK.to(device=x_TD.device, dtype=torch.long)
            weights_TK = choice.weights_TK.to(device=x_TD.device, dtype=scores_TE.dtype)
        elif cfg.force_balance:
            experts_TK = balanced_experts(x_TD.shape[0], cfg.top_k, cfg.num_experts, x_TD.device)
            weights_TK = scores_TE.gather(-1, experts_TK)
        elif self.expert_bias_E is None:
            weights_TK, experts_TK = scores_TE.topk(cfg.top_k, dim=-1)
        else:
            with torch.no_grad():
                biased_TE = scores_TE + self.expert_bias_E.to(scores_TE.dtype)
                experts_TK = biased_TE.topk(cfg.top_k, dim=-1).indices
            weights_TK = scores_TE.gather(-1, experts_TK)
        # Counted once, here, for the capacity limit, the losses, the load metrics and the
        # dispatcher; before any capacity drop.
        tokens_per_expert_E = count_per_expert(experts_TK, cfg.num_experts)
        keep_TK = kept_per_expert_E = capacity = None
        if cfg.capacity_factor is not None and self.training:
            capacity = expert_capacity(x_TD.shape[0], cfg.top_k, cfg.num_experts,
                                       cfg.capacity_factor)  # fmt: skip
            keep_TK = capacity_keep(experts_TK, weights_TK, tokens_per_expert_E, capacity)
            kept_per_expert_E = tokens_per_expert_E.clamp(max=capacity)
        host_rows = None
        if cfg.force_balance and choice is None:
            host_rows = balanced_rows_per_expert(x_TD.shape[0], cfg.top_k, cfg.num_experts,
                                                 capacity)  # fmt: skip
        if cfg.renormalize and choice is None:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if cfg.route_scale != 1.0 and choice is None:
            weights_TK = weights_TK * cfg.route_scale
        return Routing(
            logits_TE, probs_TE, weights_TK, experts_TK, tokens_per_expert_E, keep_TK,
            kept_per_expert_E, host_rows,
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
        host_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """Expert FFNs over rows sorted by expert (``tokens_per_expert_E`` rows each, for the
        experts this rank holds). ``padded``: rows past the experts' (dropped by the capacity
        limit) follow them; they give zeros, and no gradient reaches them or comes from them.
        ``host_counts``: the same counts as Python ints when known without a sync (forced
        balance), for the paths that split rows by expert on the host."""
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
            a_RH = self.activate(h_RH, tokens_per_expert_E, host_counts)
            if padded:
                a_RH = torch.where(valid_R1, a_RH, 0)
            y_RD = grouped_mm(a_RH, w_out_EHD, offs=offs_E)
            return torch.where(valid_R1, y_RD, 0) if padded else y_RD
        if impl == "loop":
            # The per-expert reference: one host sync for the split sizes; empty experts get
            # empty slices, trailing dropped rows zeros.
            counts = tokens_per_expert_E.tolist() if host_counts is None else host_counts
            rows = sum(counts)
            x_RD, num_padding = x_RD[:rows], x_RD.shape[0] - rows
            h_RH = torch.cat([x_ND @ w_in_EDH[e] for e, x_ND in enumerate(x_RD.split(counts))])
            a_RH = self.activate(h_RH, tokens_per_expert_E, counts)
            y_RD = torch.cat([a_NH @ w_out_EHD[e] for e, a_NH in enumerate(a_RH.split(counts))])
            return F.pad(y_RD, (0, 0, 0, num_padding)) if num_padding else y_RD
        raise ValueError(f"unknown moe_expert_impl {impl!r}; expected 'grouped_mm' or 'loop'")

    def activate(
        self,
        h_RH: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        host_counts: list[int] | None = None,
    ) -> torch.Tensor:
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
        counts = tokens_per_expert_E.tolist() if host_counts is None else host_counts
        rows = sum(counts)
        h_by_expert = dict(zip(local, h_RH[:rows].split(counts), strict=True))
        a_RH = torch.cat([act(h_by_expert.get(e, h_RH[:0])) for e, act in enumerate(self.act)])
        num_padding = h_RH.shape[0] - rows
        return F.pad(a_RH, (0, 0, 0, num_padding)) if num_padding else a_RH

    def forward(
        self, x: torch.Tensor, route: RouteChoice | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        """``x`` (..., D) -> (y shaped like x, MoEAux): route, dispatch, experts, combine, plus
        the shared experts. A 3-d ``x`` is (B, S, D) for the per-sequence balance loss; anything
        else counts as one sequence. ``route``: a recorded top-k choice (T = x's tokens) to
        compute with instead of the router's."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        routing = self.route(x_TD, route)
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
            x_TD.to(compute_dtype(x)), routing.experts_TK, rows_per_expert_E, routing.keep_TK,
            routing.host_rows_per_expert,
        )
        y_RD = self.experts(x_RD, rows_per_expert, self._impl(x_RD), dispatched.padded,
                            dispatched.host_rows_per_expert)  # fmt: skip
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
            route=RouteChoice(routing.experts_TK.detach(), routing.weights_TK.detach()),
        )
        return y_TD.reshape(shape), aux
