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

CPUs: the process's threads x the nominal clock x the FLOPs per cycle of the widest FMA units
its instruction set reports (the datasheet figure of a CPU), raised to the best matmul rate
measured on this machine (cached in ``~/.cache/moe-polycom/cpu_peak.json``, since a virtual
machine's cores may boost above the nominal clock its /proc/cpuinfo shows). The figure is the
same on every run of a machine, so MFU moves only with the step's speed; and since no code beats
the machine's own best matmul, it stays below 100%. A peak re-measured at every start from one
short matmul (this file before) varied 4x between runs on one machine (43-164 GFLOP/s) and put
MFU above 100% when the measurement caught a busy moment.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

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


# FLOPs per cycle per core of the FMA units an x86 CPU flag announces, widest first: 2 FMA pipes x
# lanes x 2 (multiply and add). AMX and AVX512-BF16 only raise the 16-bit rate; fp32 stays on the
# vector units. Zen 4's AVX-512 is double-pumped 256-bit hardware, so "avx512f" can overstate an
# AMD core by 2x; the overstatement lowers MFU, it can never push it above 100%.
X86_FLOPS_PER_CYCLE: list[tuple[str, str, int]] = [
    ("amx_bf16", "half", 2048),  # Intel: 1024 bf16 FMA per cycle per core (AMX tile unit)
    ("avx512_bf16", "half", 128),
    ("avx512f", "any", 64),
    ("avx2", "any", 32),  # with fma: every AVX2 CPU since Haswell / Zen has two 256-bit FMA pipes
    ("avx", "any", 16),
    ("sse2", "any", 8),
]

CPU_PEAK_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe-polycom" / "cpu_peak.json"
)


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_nominal_clock_hz(cpuinfo: dict[str, str] | None = None) -> float | None:
    """The highest clock the OS reports: cpufreq's maximum, else /proc/cpuinfo's "cpu MHz"."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3
    except (OSError, ValueError):
        pass
    mhz = (cpuinfo if cpuinfo is not None else _cpuinfo()).get("cpu MHz")
    try:
        return float(mhz) * 1e6 if mhz else None
    except ValueError:
        return None


def cpu_flops_per_cycle(flags: set[str], dtype: torch.dtype) -> int | None:
    """FLOPs per cycle per core in ``dtype`` from x86 CPU ``flags``; None for other CPUs."""
    for flag, kind, flops in X86_FLOPS_PER_CYCLE:
        if flag in flags and (kind == "any" or dtype in HALF_DTYPES):
            if flag == "avx2" and "fma" not in flags:
                continue
            return flops
    return None


def cpu_datasheet_peak_flops(
    dtype: torch.dtype, threads: int, cpuinfo: dict[str, str] | None = None
) -> float | None:
    """``threads`` x nominal clock x FLOPs per cycle, or None where the CPU's features are unknown."""
    info = cpuinfo if cpuinfo is not None else _cpuinfo()
    per_cycle = cpu_flops_per_cycle(set(info.get("flags", "").split()), dtype)
    clock = cpu_nominal_clock_hz(info)
    if per_cycle is None or clock is None:
        return None
    return threads * clock * per_cycle


def cached_cpu_matmul_flops(dtype: torch.dtype, threads: int, cache: Path | None = None) -> float:
    """The best-of-8 1024^3 matmul rate of this machine for ``dtype`` and ``threads``, measured
    once and then read from ``cache``, so that every run of the machine uses the same figure."""
    cache = cache or CPU_PEAK_CACHE
    key = f"{_cpuinfo().get('model name', 'cpu')}|{threads} threads|{dtype}|torch {torch.__version__}"
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if key in table:
        return float(table[key])
    rate = measure_cpu_peak_flops(dtype, size=1024, repeats=8)
    table[key] = rate
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, cache)
    except OSError as e:  # a read-only home only costs the measurement next time
        log.debug("cannot cache the CPU peak in %s: %s", cache, e)
    return rate


def cpu_peak_flops(dtype: torch.dtype, threads: int | None = None) -> float:
    """The CPU's peak FLOP/s for this process (see the module docstring)."""
    threads = threads or torch.get_num_threads()
    datasheet = cpu_datasheet_peak_flops(dtype, threads)
    measured = cached_cpu_matmul_flops(dtype, threads)
    return max(datasheet or 0.0, measured)


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
    everything; a GPU takes its datasheet figure; a CPU :func:`cpu_peak_flops`.
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
        return cpu_peak_flops(dtype)
    log.warning("no peak FLOP/s for device type %r: MFU is not reported", device.type)
    return None
