"""Weight initialisation that gives the same values on any device and any sharding.

Every random tensor is drawn in full, in fp32, on the CPU from the global CPU generator, and
each rank keeps its own shard of it. So a model built on the meta device, sharded with FSDP2 over
any number of ranks and then initialised holds exactly the weights of a model built whole on one
CPU from the same seed, while no rank ever holds more than one full parameter at a time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["trunc_normal_"]

_DRAW_CHUNK = 1 << 22  # elements per trunc_normal_ call (16 MiB in fp32)


def _copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write ``full`` (the whole logical tensor) into ``param``, plain or sharded."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank already has the same full tensor, so each just keeps
        # its shard, with no communication.
        local = distribute_tensor(
            full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


@torch.no_grad()
def trunc_normal_(param: torch.Tensor, *, std: float, cutoff_factor: float) -> None:
    """Truncated normal N(0, std^2) cut at +-cutoff_factor*std, in place (see module docstring)."""
    cut = cutoff_factor * std
    full = torch.empty(param.shape, dtype=torch.float32, device="cpu")
    # In fixed-size pieces: torch's rejection sampler makes about three temporaries the size of
    # its input, which for a whole expert tensor (0.75 GiB in OLMoE) would dominate peak memory.
    for piece in full.view(-1).split(_DRAW_CHUNK):
        nn.init.trunc_normal_(piece, mean=0.0, std=std, a=-cut, b=cut)
    _copy_full_(param, full)
