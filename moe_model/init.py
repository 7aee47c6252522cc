"""Weight initialisation that gives the same values on any sharding, device and torch version.

Every random tensor is drawn whole, in fp32, from one generator, and each rank keeps its own
shard of it. So a model built on the meta device, sharded with FSDP2 over any number of ranks and
then initialised holds exactly the weights of a model built whole on one CPU from the same seed,
while no rank ever holds more than one full parameter at a time.

The truncated normal is sampled here rather than by ``nn.init.trunc_normal_`` because torch
changed that function's algorithm in 2026 (inverse CDF before, redrawing after:
pytorch/pytorch#174997), and the GPU image and this project's CPU pin are different releases.
The algorithm here is the redrawing one, consuming the generator as torch 2.13 does for cuts
beyond 0.39 std (every config here cuts at 3), so runs made with torch 2.13 keep their weights.

Where the values are drawn:

- on the CPU (the default): from the global CPU generator, the same weights on every machine;
  serial, about 35 M values/s on one core of the CI machine, so OLMoE-1B-7B (6.9B values) takes
  minutes on every rank.
- ``with draw_on(device):`` on an accelerator, from that device's generator (``torch.manual_seed``
  seeds it too): a fraction of a second per layer. The values then differ from the CPU draw and,
  as torch's CUDA sampler lays out its work by the number of SMs, between GPU models; every rank
  of a job on one GPU model still draws the same ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["WeightInit", "draw_on", "trunc_normal_"]

_DRAW_CHUNK = 1 << 22  # elements drawn at a time (16 MiB in fp32)
_draw_device = torch.device("cpu")


@contextlib.contextmanager
def draw_on(device: str | torch.device) -> Iterator[None]:
    """Draw the init values on ``device`` while in the block (see the module docstring)."""
    global _draw_device
    previous, _draw_device = _draw_device, torch.device(device)
    try:
        yield
    finally:
        _draw_device = previous


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


def _trunc_normal_piece_(piece: torch.Tensor, std: float, cut: float) -> None:
    """N(0, std^2) draws, every one outside [-cut, cut] replaced by the same position of a fresh
    draw of the whole piece until none is left: exact for any cut, and cheap for cuts of about
    one std or more (at 3 std, 0.27% of values are redrawn once, almost none twice)."""
    hi = torch.tensor(cut, dtype=piece.dtype).item()  # the cut as the piece's dtype holds it
    lo = -hi
    piece.normal_(0.0, std)
    fresh = torch.empty_like(piece)
    while True:
        outside = (piece < lo) | (piece > hi)
        if not outside.any():
            return
        fresh.normal_(0.0, std)
        piece.copy_(torch.where(outside, fresh, piece))


@torch.no_grad()
def trunc_normal_(param: torch.Tensor, *, std: float, cutoff_factor: float) -> None:
    """Truncated normal N(0, std^2) cut at +-cutoff_factor*std, in place (see module docstring)."""
    full = torch.empty(param.shape, dtype=torch.float32, device=_draw_device)
    # In fixed-size pieces: each redraw needs temporaries the size of its piece, which for a
    # whole expert tensor (0.75 GiB in OLMoE) would dominate peak memory.
    for piece in full.view(-1).split(_DRAW_CHUNK):
        _trunc_normal_piece_(piece, std, cutoff_factor * std)
    _copy_full_(param, full)


@dataclass(frozen=True)
class WeightInit:
    """The truncated-normal init of every linear, embedding and expert weight."""

    std: float
    """Standard deviation of N(0, std^2)."""
    cutoff_factor: float
    """Truncate at +-cutoff_factor * std."""

    def __call__(self, param: torch.Tensor) -> None:
        trunc_normal_(param, std=self.std, cutoff_factor=self.cutoff_factor)
