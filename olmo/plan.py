"""Plan a run before it spends GPU hours: memory per rank and a roofline speed for N GPUs.

    python scripts/plan.py CONFIG [--key=value ...] --gpus N --gpu h100 [--json PATH]

Memory comes from running one real training step of the config on fake tensors
(olmo/plan_memory.py); FLOPs, bytes and the step-time bound from olmo/plan_speed.py; the GPUs
from olmo/gpus.py. The fit check keeps a margin for what a tensor-level simulation cannot see:

- the CUDA caching allocator's rounding and fragmentation (blocks rounded to 512 B / 2 MiB,
  freed blocks of one size not reusable for another): FRAGMENTATION_MARGIN of the peak;
- the CUDA context, NCCL's communication buffers (NCCL_BUFFSIZE 4 MiB per channel and peer),
  cuBLAS / CUTLASS workspaces and the PyTorch runtime: FIXED_RESERVE_BYTES.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from olmo.config import AUTO, TrainConfig
from olmo.gpus import GpuSpec
from olmo.plan_memory import MemoryPlan, simulate_step
from olmo.plan_speed import SpeedPlan, roofline

GIB = 2**30
FRAGMENTATION_MARGIN = 0.10
"""Share of the tensor peak kept for allocator rounding and fragmentation."""
FIXED_RESERVE_BYTES = 3 * GIB
"""CUDA context (~0.5 GiB), NCCL buffers (~1-2 GiB at 8-64 ranks), cuBLAS workspaces."""

CATEGORY_LABELS = {
    "params_sharded": "parameters, sharded (fp32 FSDP shards)",
    "params_unsharded": "parameters, unsharded (bf16, gathered blocks)",
    "buffers": "buffers",
    "grads_sharded": "gradients, sharded",
    "grads_unsharded": "gradients, unsharded accumulators",
    "optimizer_state": "optimizer state",
    "activations": "activations (saved for backward)",
    "temporaries": "temporaries (backward)",
    "comm_buffers": "communication buffers",
    "inputs": "inputs",
}

FIXES = {
    "grads_unsharded": "--reduce_grads_every_microbatch=true or auto (gradients stay sharded)",
    "activations": "--activation_checkpointing=moe (the MoE layers) or true (whole blocks), or a "
    "smaller --device_train_microbatch_size",
    "temporaries": "a smaller --device_train_microbatch_size",
    "params_sharded": "more GPUs (--gpus)",
    "optimizer_state": "more GPUs (--gpus)",
    "grads_sharded": "more GPUs (--gpus)",
    "params_unsharded": "more GPUs or smaller blocks",
    "comm_buffers": "more GPUs",
    "buffers": "more GPUs",
    "inputs": "a smaller --device_train_microbatch_size",
}
"""The setting that shrinks each category, for the one-line verdict."""


@dataclass
class Plan:
    """The plan of one config on ``gpus`` x ``gpu``."""

    gpus: int
    gpu: GpuSpec
    memory: MemoryPlan
    speed: SpeedPlan
    decided: dict[str, bool | str] = field(default_factory=dict)
    """The ``auto`` settings the plan chose (key -> value), for the launcher to pass on."""

    @property
    def required_bytes(self) -> int:
        """The tensor peak plus the margins (module docstring)."""
        return math.ceil(self.memory.peak_bytes * (1 + FRAGMENTATION_MARGIN)) + FIXED_RESERVE_BYTES

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.gpu.memory_bytes

    def biggest_term(self) -> tuple[str, int]:
        """The category holding the most bytes at the peak."""
        return max(self.memory.breakdown.items(), key=lambda kv: kv[1])

    def verdict(self) -> str:
        """One line: fits or not, and for a plan that does not fit, what to change."""
        need, have = self.required_bytes / GIB, self.gpu.memory_bytes / GIB
        head = (
            f"{self.gpus} x {self.gpu.name}: peak {self.memory.peak_bytes / GIB:.1f} GiB per rank, "
            f"{need:.1f} GiB with margins, of {have:.1f} GiB"
        )
        if self.fits:
            return f"{head}: fits"
        kind, nbytes = self.biggest_term()
        return (
            f"{head}: does NOT fit; biggest term {CATEGORY_LABELS[kind]} {nbytes / GIB:.1f} GiB "
            f"({self.memory.moment.phase} of micro-batch {self.memory.moment.micro_batch}, "
            f"{self.memory.moment.module}); try {FIXES[kind]}"
        )

    def to_json(self) -> dict:
        m, s = self.memory, self.speed
        return {
            "gpus": self.gpus,
            "gpu": self.gpu.name,
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "peak_bytes_per_rank": m.peak_bytes,
            "required_bytes_per_rank": self.required_bytes,
            "fits": self.fits,
            "margins": {
                "fragmentation_fraction": FRAGMENTATION_MARGIN,
                "fixed_reserve_bytes": FIXED_RESERVE_BYTES,
            },
            "breakdown": m.breakdown,
            "peak_at": asdict(m.moment),
            "micro_batches": m.micro_batches,
            "simulated_micro_batches": m.simulated_micro_batches,
            "sharded": m.sharded,
            "param_dtype": m.param_dtype,
            "estimate": {
                "note": "roofline lower bounds from datasheet peaks; real kernels reach less",
                "work": {k: asdict(w) for k, w in s.work.items()},
                "step_seconds": s.step_seconds,
                "compute_seconds": s.compute_seconds,
                "communication_seconds": s.communication_seconds,
                "tokens_per_second": s.tokens_per_second,
                "mfu": s.mfu,
                "bf16_peak_flops": self.gpu.bf16_flops,
                "hbm_bytes_per_s": self.gpu.hbm_bytes_per_s,
            },
            "decided": self.decided,
            "notes": m.notes,
        }

    def report(self) -> str:
        """The human-readable plan."""
        m, s = self.memory, self.speed
        lines = [
            f"plan: {self.gpus} x {self.gpu.label} ({self.gpu.memory_bytes / GIB:.1f} GiB each), "
            f"{m.micro_batches} micro-batch(es) per step per rank (simulated "
            f"{m.simulated_micro_batches}: the first, second and last; the others repeat the "
            f"second), {m.param_dtype} "
            f"{'FSDP' if m.sharded else 'unsharded'}",
            f"memory per rank at the peak ({m.moment.phase}, micro-batch {m.moment.micro_batch}, "
            f"{m.moment.module}):",
        ]
        for kind, nbytes in sorted(m.breakdown.items(), key=lambda kv: -kv[1]):
            if nbytes:
                lines.append(f"  {CATEGORY_LABELS[kind]:<48} {nbytes / GIB:8.2f} GiB")
        lines.append(f"  {'total (tensors)':<48} {m.peak_bytes / GIB:8.2f} GiB")
        lines.append(
            f"  + {FRAGMENTATION_MARGIN:.0%} allocator margin + {FIXED_RESERVE_BYTES / GIB:.0f} GiB "
            f"(CUDA context, NCCL, cuBLAS) = {self.required_bytes / GIB:.2f} GiB"
        )
        lines.append(self.verdict())
        lines.extend(f"note: {note}" for note in m.notes)
        for key, value in self.decided.items():
            lines.append(f"auto: {key}={str(value).lower()} (decided by this plan)")
        lines.append("estimate (roofline lower bound from datasheet peaks), per rank per step:")
        lines.append(f"  {'kind':<16} {'TFLOP':>10} {'GB moved':>10}")
        for kind, w in s.work.items():
            lines.append(f"  {kind:<16} {w.flops / 1e12:10.2f} {w.bytes / 1e9:10.2f}")
        lines.append(
            f"  step >= {s.step_seconds:.3f} s (compute {s.compute_seconds:.3f} s, communication "
            f"{s.communication_seconds:.3f} s overlapped); <= {s.tokens_per_second:,.0f} tokens/s "
            f"over {self.gpus} GPU(s); MFU <= {s.mfu:.1%} of {self.gpu.bf16_flops / 1e12:.0f} "
            "TFLOP/s bf16"
        )
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def plan_run(cfg: TrainConfig, gpus: int, gpu: GpuSpec, all_micro_batches: bool = False) -> Plan:
    """Plan ``cfg`` on ``gpus`` GPUs of kind ``gpu`` (one simulated step: seconds to minutes).

    ``reduce_grads_every_microbatch: auto`` is decided here: once per step (one reduce-scatter
    per step) when that plan fits, else every micro-batch (no unsharded fp32 accumulators); the
    plan returned is the chosen setting's (a second simulated step when the first does not fit).
    """

    def plan(config: TrainConfig) -> Plan:
        memory = simulate_step(
            config, gpus, fake=True, planned_device_type="cuda",
            all_micro_batches=all_micro_batches,
        )  # fmt: skip
        return Plan(gpus=gpus, gpu=gpu, memory=memory, speed=roofline(config, gpus, gpu))

    key = "reduce_grads_every_microbatch"
    if getattr(cfg, key) != AUTO:
        return plan(cfg)
    for every in (False, True):
        config = copy.copy(cfg)  # not replace(): __post_init__ refuses a force-balanced model
        setattr(config, key, every)
        chosen = plan(config)
        chosen.decided[key] = every
        if chosen.fits:
            break
    return chosen


def microbatch_sizes(cfg: TrainConfig, gpus: int) -> list[int]:
    """The micro-batch sizes a step of ``cfg`` on ``gpus`` ranks can take: the divisors of the
    per-rank batch, ascending."""
    per_rank = cfg.global_train_batch_size // gpus
    return [size for size in range(1, per_rank + 1) if per_rank % size == 0]


def suggest_microbatch_size(
    cfg: TrainConfig, gpus: int, gpu: GpuSpec
) -> tuple[int | None, dict[int, Plan]]:
    """The largest micro-batch size that fits (None when even 1 does not) and the plans made to
    find it: a binary search over :func:`microbatch_sizes` (memory grows with the size), so
    about log2(number of divisors) + 1 simulated steps, each seconds to minutes."""
    sizes = microbatch_sizes(cfg, gpus)
    plans: dict[int, Plan] = {}
    best, low, high = None, 0, len(sizes) - 1
    while low <= high:
        middle = (low + high) // 2
        config = copy.copy(cfg)
        config.device_train_microbatch_size = sizes[middle]
        plans[sizes[middle]] = plan = plan_run(config, gpus, gpu)
        if plan.fits:
            best, low = sizes[middle], middle + 1
        else:
            high = middle - 1
    return best, plans
