"""The GPUs a run can be planned for (scripts/plan.py): memory, dense bf16 peak, HBM bandwidth.

One table, looked up by a short name; an unknown name is a one-line ConfigError listing the
known ones. Peaks come from olmo/flops.py's GPU_PEAKS (one copy of the datasheet numbers).
Sources (NVIDIA datasheets):

- H100 SXM5 80 GB: https://www.nvidia.com/en-us/data-center/h100/ -- HBM3 80 GB, 3.35 TB/s,
  NVLink 900 GB/s (both directions together; 450 GB/s each way).
- H200 SXM 141 GB: https://www.nvidia.com/en-us/data-center/h200/ -- HBM3e 141 GB, 4.8 TB/s,
  NVLink 900 GB/s.
- B200 (HGX B200): https://www.nvidia.com/en-us/data-center/hgx/ -- HBM3e 180 GB per GPU,
  8 TB/s, NVLink 5 1.8 TB/s.
- A100 SXM4 80 GB: https://www.nvidia.com/en-us/data-center/a100/ -- HBM2e 80 GB, 2,039 GB/s,
  NVLink 600 GB/s.

Memory is what ``nvidia-smi`` reports as the total of each card (the datasheet's "80 GB" is
81,559 MiB on an H100 SXM), not the decimal datasheet figure. Between nodes every GPU is
assumed to have one 400 Gb/s InfiniBand NDR link (50 GB/s), the usual DGX/HGX layout.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from moe_model.errors import ConfigError
from olmo.flops import datasheet_peak_flops

MIB = 2**20
GPUS_PER_NODE = 8
"""GPUs sharing one NVLink domain (HGX/DGX boards); more GPUs talk over InfiniBand."""
INTER_NODE_BYTES_PER_S = 50e9
"""One 400 Gb/s InfiniBand NDR link per GPU, one direction."""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model's datasheet figures the plan needs."""

    name: str
    """Short name used on the command line (``--gpu h100``)."""
    label: str
    """GPU_PEAKS label in olmo/flops.py (and what the report prints)."""
    memory_bytes: int
    """Total device memory as nvidia-smi reports it."""
    hbm_bytes_per_s: float
    """Datasheet HBM bandwidth."""
    nvlink_bytes_per_s: float
    """NVLink bandwidth per GPU, one direction."""

    @property
    def bf16_flops(self) -> float:
        """Dense (no 2:4 sparsity) bf16 Tensor Core peak, FLOP/s."""
        return datasheet_peak_flops(self.label, torch.bfloat16)[1]

    def link_bytes_per_s(self, gpus: int) -> float:
        """Per-GPU collective bandwidth: NVLink within a node, InfiniBand across nodes."""
        return self.nvlink_bytes_per_s if gpus <= GPUS_PER_NODE else INTER_NODE_BYTES_PER_S


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", "H100 SXM", 81559 * MIB, 3.35e12, 450e9),
    "h200": GpuSpec("h200", "H200 SXM", 143771 * MIB, 4.8e12, 450e9),
    "b200": GpuSpec("b200", "B200 (HGX)", 183359 * MIB, 8.0e12, 900e9),
    "a100-80gb": GpuSpec("a100-80gb", "A100", 81920 * MIB, 2.039e12, 300e9),
}


def gpu_spec(name: str) -> GpuSpec:
    """The table's entry for ``name`` (case-insensitive); ConfigError naming the known ones."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    close = difflib.get_close_matches(key, list(GPUS), n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"--gpu {name!r} is unknown; {hint}known GPUs: {', '.join(GPUS)}")


def gpu_from_device_name(device_name: str) -> GpuSpec | None:
    """The table's entry for a name as CUDA reports it (``NVIDIA H100 80GB HBM3``), or None."""
    lowered = device_name.lower()
    for spec in GPUS.values():
        if spec.name.split("-")[0] in lowered:
            return spec
    return None
