"""One optimizer step's statistics: summed over its micro-batches, recorded once.

The model is stateless (it returns each micro-batch's losses and routing counts in its output);
the train module keeps these sums for the step, records them as metrics after the last
micro-batch, and hands the routed rows to the post-optimizer-step hook (the expert-bias update).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from olmo_core.train.common import ReduceType

from olmo.metric_names import (
    CE_LOSS,
    LB_LOSS,
    SOURCE_SUM_KINDS,
    TOTAL_LOSS,
    Z_LOSS,
    dropped_count,
    expert_count,
    layer_router_entropy,
    source_sum,
)


@dataclass
class StepStatistics:
    """Running sums of one step, all device tensors (nothing here reads a value on the host)."""

    ce: torch.Tensor
    """Cross-entropy, each micro-batch's divided by the rank batch's predicted tokens."""
    lb: torch.Tensor
    """Load-balancing loss, each micro-batch's divided by the number of micro-batches."""
    z: torch.Tensor
    """Router z-loss, likewise divided."""
    load_LE: torch.Tensor | None = None
    """Rows routed to each expert of each MoE layer."""
    entropy_L: torch.Tensor | None = None
    """Router entropy per MoE layer, the mean over micro-batches."""
    dropped_L: torch.Tensor | None = None
    """Rows dropped per MoE layer (capacity factor)."""
    source_sums_N3: torch.Tensor | None = None
    """Per mixture source: CE sum, predicted tokens, tokens (olmo.metric_names.SOURCE_SUM_KINDS)."""

    @classmethod
    def zeros(cls, device: torch.device) -> StepStatistics:
        return cls(*(torch.zeros((), device=device) for _ in range(3)))

    @property
    def total(self) -> torch.Tensor:
        """The step's objective: CE + load balancing + z-loss."""
        return self.ce + self.lb + self.z

    def add(
        self, out: Any, *, ce: torch.Tensor, lb: torch.Tensor, z: torch.Tensor, num_micro: int,
        source_sums_N3: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """Add one micro-batch: its weighted losses and the model output's routing counts."""
        self.ce += ce.detach()
        self.lb += lb.detach()
        self.z += z.detach()
        self.load_LE = _plus(self.load_LE, out.tokens_per_expert_LE)
        if out.router_entropy_L is not None:
            self.entropy_L = _plus(self.entropy_L, out.router_entropy_L / num_micro)
        self.dropped_L = _plus(self.dropped_L, out.dropped_rows_L)
        self.source_sums_N3 = _plus(self.source_sums_N3, source_sums_N3)

    def record(
        self, record_metric: Callable[..., None], *, moe_layer_ids: Sequence[int],
        source_names: Sequence[str],
    ) -> None:  # fmt: skip
        """Record every statistic of the step once (device tensors: olmo-core reduces them on
        the device at its collect interval, so the step waits for no host copy)."""
        record_metric(CE_LOSS, self.ce, ReduceType.mean)
        record_metric(LB_LOSS, self.lb, ReduceType.mean)
        record_metric(Z_LOSS, self.z, ReduceType.mean)
        record_metric(TOTAL_LOSS, self.total.detach(), ReduceType.mean)
        if self.source_sums_N3 is not None:
            for name, row in zip(source_names, self.source_sums_N3):
                for kind, value in zip(SOURCE_SUM_KINDS, row):
                    record_metric(source_sum(name, kind), value, ReduceType.sum)
        if self.load_LE is not None:
            # Raw counts, summed over ranks; MetricsCallback turns them into fractions.
            for layer, counts_E in zip(moe_layer_ids, self.load_LE.float(), strict=True):
                for expert, count in enumerate(counts_E):
                    record_metric(expert_count(layer, expert), count, ReduceType.sum)
        if self.entropy_L is not None:
            for layer, value in zip(moe_layer_ids, self.entropy_L, strict=True):
                record_metric(layer_router_entropy(layer), value, ReduceType.mean)
        if self.dropped_L is not None:
            # Summed over ranks; MetricsCallback divides by the routed rows.
            for layer, value in zip(moe_layer_ids, self.dropped_L.float(), strict=True):
                record_metric(dropped_count(layer), value, ReduceType.sum)


def _plus(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    """total + part, where None is nothing (a model without MoE layers or without the count)."""
    if part is None or part.numel() == 0:
        return total
    return part if total is None else total + part
