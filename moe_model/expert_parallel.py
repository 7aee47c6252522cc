"""Expert parallelism: each rank of an EP group holds E/ep experts; rows travel by all-to-all.

Shape suffixes as in ``moe.py``, plus P ranks in the EP group and X = E/P experts per rank.
Rows sent out are in this rank's expert-sorted order; rows received are grouped by the rank
that sent them, then by local expert, and are regrouped by local expert (then sender) for the
grouped matmul.

An EP group is P consecutive ranks (the ``ep`` dim of a (world/P, P) device mesh), so with P
no larger than the GPUs of a node, and dividing them, the all-to-all stays inside a node. Rank j
of a group holds experts [j*X, (j+1)*X): its slice of ``w_in_EDH``/``w_out_EHD`` sharded on
dim 0 (a DTensor ``Shard(0)`` over the ``ep`` dim; FSDP shards that slice again over the other
dim). ``MoELayer.parallelize(ep_mesh)`` cuts the slices and gives the layer an
:class:`AllToAllDispatcher`. Checkpoints (DCP) record the global shapes, so a run saved with one
EP degree loads with any other.

Per forward of one MoE layer: one all-to-all of the X*P counts, one host sync for the split
sizes, one all-to-all of the rows out and one back; backward runs the two row exchanges
reversed. Under forced balance (benchmarks, the planner) the counts follow from T alone and are
known on the host: no count exchange and no sync, only the row exchanges. The row exchanges are
torch's functional collective with autograd (``all_to_all_single_autograd``), not
``torch.distributed.nn.functional.all_to_all_single``:
the latter warns that it is deprecated on every call (torch 2.13) and raises under
torch.compile, which ``--compile=true`` applies to every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moe_model.dispatch import combine, sort_by_expert

__all__ = ["EXPERT_WEIGHTS", "AllToAllDispatcher", "EPDispatched"]

EXPERT_WEIGHTS = ("w_in_EDH", "w_out_EHD")
"""The MoELayer parameters sharded on their expert dim (0) over the EP group."""


@dataclass
class EPDispatched:
    """What :meth:`AllToAllDispatcher.combine` needs to undo its dispatch."""

    inverse_R: torch.Tensor
    """Row (in the expert order this rank sent them) of each flattened (token, k) choice."""
    send_splits: list[int]
    """Rows sent to each rank of the EP group."""
    recv_splits: list[int]
    """Rows received from each rank of the EP group."""
    regroup_R: torch.Tensor
    """Received row of each local-expert-grouped row."""
    padded: bool = False
    """Always False: only kept rows travel, the experts' input has no trailing dropped rows."""
    host_rows_per_expert: list[int] | None = None
    """Rows of each local expert (from every rank of the group) as Python ints, when known
    without a sync (forced balance)."""


class AllToAllDispatcher:
    """Dispatch over an EP group: rows go to the rank holding their expert and come back.

    ``dispatch`` returns the rows of this rank's X experts (from every rank of the group), grouped
    by local expert, with their counts; ``combine`` returns y in this rank's token order.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts do not split over {self.ep_size} EP ranks")
        self.num_local = num_experts // self.ep_size
        self.first = dist.get_rank(group) * self.num_local

    def local_experts(self, num_experts: int) -> range:
        """The experts whose weights this rank holds."""
        return range(self.first, self.first + self.num_local)

    def dispatch(
        self,
        x_TD: torch.Tensor,
        experts_TK: torch.Tensor,
        rows_per_expert_E: torch.Tensor,
        keep_TK: torch.Tensor | None = None,
        host_rows_per_expert: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, EPDispatched]:
        """``rows_per_expert_E``: this rank's (kept) rows of each of the E experts, as the router
        counted them; with ``keep_TK`` the dropped rows stay here (they sort last).
        ``host_rows_per_expert``: the same counts as Python ints, known without reading the
        device (forced balance); every rank of the group then routes the same counts (the same
        T on every rank, the same round-robin), so no count is exchanged and nothing synced."""
        p, x = self.ep_size, self.num_local
        sent_E = rows_per_expert_E
        token_R, inverse_R = sort_by_expert(experts_TK, keep_TK)
        host_rows_X = None
        if host_rows_per_expert is not None:
            local_X = host_rows_per_expert[self.first : self.first + x]
            send_splits = [sum(host_rows_per_expert[j * x : (j + 1) * x]) for j in range(p)]
            recv_splits = [sum(local_X)] * p
            received_PX = torch.tensor([local_X] * p, dtype=sent_E.dtype, device=sent_E.device)
            host_rows_X = [p * rows for rows in local_X]
        else:
            # received_PX[j, e]: rows rank j of the group sends to this rank's local expert e.
            received_PX = torch.empty_like(sent_E)
            dist.all_to_all_single(received_PX, sent_E, group=self.group)
            received_PX = received_PX.view(p, x)
            # The one host sync: all_to_all_single needs the split sizes as Python ints.
            send_splits, recv_splits = torch.stack(
                [sent_E.view(p, x).sum(dim=1), received_PX.sum(dim=1)]
            ).tolist()
        # Dropped rows sort after every kept one: the first sum(send_splits) rows are sent.
        x_sent_RD = x_TD[token_R[: sum(send_splits)]]
        x_recv_RD = all_to_all_single_autograd(x_sent_RD, recv_splits, send_splits, self.group)
        regroup_R = _sender_major_to_expert_major(received_PX, sum(recv_splits))
        rows_per_expert_X = received_PX.sum(dim=0)
        return (
            x_recv_RD[regroup_R],
            rows_per_expert_X,
            EPDispatched(inverse_R, send_splits, recv_splits, regroup_R,
                         host_rows_per_expert=host_rows_X),  # fmt: skip
        )

    def combine(
        self, y_RD: torch.Tensor, weights_TK: torch.Tensor, dispatched: EPDispatched
    ) -> torch.Tensor:
        # Back into the order the rows arrived in, then to the ranks that sent them.
        y_recv_RD = y_RD[dispatched.regroup_R.argsort()]
        y_sent_RD = all_to_all_single_autograd(
            y_recv_RD, dispatched.send_splits, dispatched.recv_splits, self.group
        )
        # Dropped rows (capacity) read zero rows appended after the sent ones.
        num_dropped = dispatched.inverse_R.numel() - y_sent_RD.shape[0]
        if num_dropped:
            y_sent_RD = torch.nn.functional.pad(y_sent_RD, (0, 0, 0, num_dropped))
        return combine(y_sent_RD, weights_TK, dispatched.inverse_R)


def _sender_major_to_expert_major(counts_PX: torch.Tensor, total: int) -> torch.Tensor:
    """Indices that reorder rows laid out in (sender, expert) blocks into (expert, sender) blocks.

    ``counts_PX[j, e]`` rows sit in block (j, e); returns ``index_R`` with
    ``rows[index_R]`` ordered by expert, then sender, each block keeping its row order.
    """
    start_PX = (counts_PX.reshape(-1).cumsum(0) - counts_PX.reshape(-1)).view_as(counts_PX)
    counts_XP = counts_PX.t().reshape(-1)
    start_XP = start_PX.t().reshape(-1)
    # Row i of the output lies in block b at offset i - (first output row of b).
    out_start_XP = counts_XP.cumsum(0) - counts_XP
    block_R = torch.repeat_interleave(
        torch.arange(counts_XP.numel(), device=counts_PX.device), counts_XP, output_size=total
    )
    offset_R = torch.arange(total, device=counts_PX.device) - out_start_XP[block_R]
    return start_XP[block_R] + offset_R
