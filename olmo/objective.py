"""The training objective, one definition for the train module and the benchmarks:

    loss = cross_entropy + load_balancing + router_z_loss

The two auxiliary losses arrive already weighted by the model (megablocks' formulas, as OLMoE
trained) and are divided by the number of micro-batches in a step, so that a step adds each
once however its batch is split. The cross-entropy arrives normalised by the caller (the train
module divides each micro-batch's summed CE by the loss tokens of the whole rank batch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Objective(NamedTuple):
    """One micro-batch's terms of the loss, each as it enters the step's sum."""

    ce: torch.Tensor
    """Cross-entropy (or, for a layer alone, the benchmark's stand-in for it)."""
    lb: torch.Tensor
    """Load-balancing loss over the number of micro-batches."""
    z: torch.Tensor
    """Router z-loss over the number of micro-batches."""

    @property
    def total(self) -> torch.Tensor:
        """What backward runs on."""
        return self.ce + self.lb + self.z


def objective(
    ce: torch.Tensor, lb_loss: torch.Tensor, z_loss: torch.Tensor, num_micro_batches: int = 1
) -> Objective:
    """The loss of one micro-batch of a step of ``num_micro_batches``; the auxiliary losses in
    fp32 whatever the compute dtype (bf16 would round a 1e-3-weighted term)."""
    return Objective(ce, lb_loss.float() / num_micro_batches, z_loss.float() / num_micro_batches)
