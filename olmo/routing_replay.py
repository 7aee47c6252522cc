"""Replay a routing trace: the same tokens through a model with the trace's experts and weights.

Separates routing changes from everything else: with the recorded routing, two models (or two
checkpoints of one run) differ only in what their attention, experts and activations compute;
with their own routing, also in which experts they pick. The routers still run (their
auxiliary losses need the logits); only their top-k choice and weights are replaced
(``MoETransformer.forward(routes=...)``). Evaluation mode throughout: dropless, as a replay of
a capacity-limited training step keeps every routed row.

    python scripts/replay_routing.py RUN --step N [--trace PATH] [--checkpoint DIR]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from olmo_core.data.utils import get_labels

from moe_model.transformer import MoETransformer
from olmo.routing_trace import RoutingTrace
from olmo.train_module import LABEL_IGNORE_INDEX

__all__ = ["ReplayResult", "replay"]


@dataclass
class ReplayResult:
    """Cross-entropy of the trace's tokens under both routings, and how often they agree."""

    loss_fresh: float
    """Mean next-token CE with the model's own routing."""
    loss_recorded: float
    """Mean next-token CE with the trace's routing."""
    expert_agreement: float
    """Share of (token, k) slots whose recorded expert the model's own top-k also picks."""
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def replay(model: MoETransformer, trace: RoutingTrace, batch_size: int) -> ReplayResult:
    """Run the trace's sequences ``batch_size`` at a time, with fresh and recorded routing.

    ``model`` must match the trace (:func:`olmo.routing_trace.check_replayable`)."""
    model.eval()
    device = next(model.parameters()).device
    ce_sum = {"fresh": 0.0, "recorded": 0.0}
    agree = slots = loss_tokens = 0
    for start in range(0, trace.input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        ids_BS = trace.input_ids[rows].long().to(device)
        doc_ids = None if trace.doc_ids is None else trace.doc_ids[rows].long().to(device)
        labels_T = get_labels({"input_ids": ids_BS}, label_ignore_index=LABEL_IGNORE_INDEX)
        labels_T = labels_T.reshape(-1)
        routes = trace.routes(rows)
        fresh = model(ids_BS, doc_ids)
        recorded = model(ids_BS, doc_ids, routes)
        for name, out in (("fresh", fresh), ("recorded", recorded)):
            logits_TV = out.logits.reshape(-1, out.logits.shape[-1]).double()
            ce_sum[name] += F.cross_entropy(logits_TV, labels_T, ignore_index=LABEL_IGNORE_INDEX,
                                            reduction="sum").item()  # fmt: skip
        loss_tokens += int((labels_T != LABEL_IGNORE_INDEX).sum())
        for own, rec in zip(fresh.routes, routes, strict=True):
            # A recorded slot agrees when the model's own top-k holds that expert (any k).
            hit_TK = (rec.experts_TK.to(device).unsqueeze(-1) == own.experts_TK.unsqueeze(-2)).any(-1)
            agree += int(hit_TK.sum())
            slots += hit_TK.numel()
    return ReplayResult(
        loss_fresh=ce_sum["fresh"] / max(loss_tokens, 1),
        loss_recorded=ce_sum["recorded"] / max(loss_tokens, 1),
        expert_agreement=agree / max(slots, 1),
        tokens=int(trace.input_ids.numel()),
    )
