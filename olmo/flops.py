"""Peak FLOP/s of one device: the denominator of MFU, for the trainer and the benchmarks alike.

GPUs: dense (no 2:4 sparsity) datasheet peaks, looked up by the name CUDA reports. NVIDIA's
datasheets list the 16-bit Tensor Core figures with sparsity; dense is half of that. The fp32
figures are the non-Tensor-Core FP32 peaks, since PyTorch runs fp32 matmuls without TF32 unless
asked. Sources:

- H100 SXM / PCIe / NVL and H200 SXM / NVL: NVIDIA H100 and H200 Tensor Core GPU datasheets,
  https://www.nvidia.com/en-us/data-center/h100/ and https://www.nvidia.com/en-us/data-center/h200/
  (BF16 1,979 / 1,513 / 1,671 TFLOPS with sparsity; FP32 67 / 51 / 60 TFLOPS).
- A100 (SXM and PCIe): https://www.nvidia.com/en-us/data-center/a100/ (BF16 312 TFLOPS dense,
  FP32 19.5 TFLOPS).
- B200 (HGX, 1,000 W): https://www.nvidia.com/en-us/data-center/hgx/ (FP16/BF16 4.5 PFLOPS
  with sparsity, FP32 75 TFLOPS per GPU).

CPUs have no datasheet figure that a run could trust (it depends on the cores and threads the
process gets), so their peak is a measured matmul rate in the training dtype.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

TERA = 1e12

# (substring of torch.cuda.get_device_name, label, dense 16-bit peak, fp32 peak), in FLOP/s.
# Matched in order and case-insensitively: a variant ("H100 NVL") precedes its family ("H100").
GPU_PEAKS: list[tuple[str, str, float, float]] = [
    ("H100 NVL", "H100 NVL", 1671 / 2 * TERA, 60 * TERA),
    ("H100 PCIe", "H100 PCIe", 1513 / 2 * TERA, 51 * TERA),
    ("H100", "H100 SXM", 1979 / 2 * TERA, 67 * TERA),
    ("H200 NVL", "H200 NVL", 1671 / 2 * TERA, 60 * TERA),
    ("H200", "H200 SXM", 1979 / 2 * TERA, 67 * TERA),
    ("A100", "A100", 312 * TERA, 19.5 * TERA),
    ("B200", "B200 (HGX)", 4500 / 2 * TERA, 75 * TERA),
]

HALF_DTYPES = (torch.bfloat16, torch.float16)


def datasheet_peak_flops(device_name: str, dtype: torch.dtype) -> tuple[str, float] | None:
    """``(label, FLOP/s)`` of the first GPU_PEAKS entry found in ``device_name``, else None."""
    if dtype not in (*HALF_DTYPES, torch.float32):
        raise ValueError(f"no peak FLOP/s for dtype {dtype}; expected bfloat16, float16 or float32")
    name = device_name.lower()
    for key, label, half, fp32 in GPU_PEAKS:
        if key.lower() in name:
            return label, half if dtype in HALF_DTYPES else fp32
    return None


def measure_cpu_peak_flops(
    dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5
) -> float:
    """Best-of-``repeats`` square matmul FLOP/s on this CPU in ``dtype``."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # the first call pays for thread-pool start-up and packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(
    device: torch.device, dtype: torch.dtype, override: float | None = None
) -> float | None:
    """Peak FLOP/s of ``device`` computing in ``dtype``; None (MFU not reported) for an unknown GPU.

    ``override`` (the config's ``device_peak_flops``, a benchmark's ``--peak-tflops``) wins over
    everything; a GPU takes its datasheet figure; a CPU its measured matmul rate.
    """
    if override is not None:
        return float(override)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = datasheet_peak_flops(name, dtype)
        if found is None:
            log.warning(
                "no datasheet peak FLOP/s for GPU %r (known: %s): MFU is not reported; "
                "set device_peak_flops to report it",
                name,
                ", ".join(label for _, label, _, _ in GPU_PEAKS),
            )
            return None
        return found[1]
    if device.type == "cpu":
        return measure_cpu_peak_flops(dtype)
    log.warning("no peak FLOP/s for device type %r: MFU is not reported", device.type)
    return None
