#!/usr/bin/env python
"""The plan's peak against the measured one on this GPU (the GPU round's ``plan_check`` part).

    python scripts/plan_vs_measured.py [CONFIG] [--key=value ...] [--gpu h100] [--out PATH]
        [--also-compiled]

Plans CONFIG on one GPU (fake tensors, olmo/plan.py), then runs the same step (first, second and
last micro-batch, the optimizer update) on this GPU with real tensors, in a one-process NCCL
group (FSDP as a one-GPU run has it), and reads the CUDA allocator's counters: the tensor peak
(max_memory_allocated) the plan estimates, and the reserved peak (max_memory_reserved, the
allocator's rounding and fragmentation on top) that the plan's margin must cover. Writes JSON.
``--also-compiled`` repeats both with ``--compile=true`` (key ``compiled``): the plan simulates
Inductor's partition op by op (olmo/plan_memory.PLAN_COMPILE_BACKEND), the GPU runs Inductor.
"""

import argparse
import json
import os
import sys


def plan_and_measure(config: str, overrides: list[str], gpu: str) -> dict:
    import torch
    import torch.distributed as dist

    from olmo.config import load_config
    from olmo.gpus import gpu_spec
    from olmo.plan import FRAGMENTATION_MARGIN, plan_run
    from olmo.plan_memory import simulate_step

    plan = plan_run(load_config(config, overrides), 1, gpu_spec(gpu))
    print(plan.report(), flush=True)
    result = {"overrides": overrides, "plan": plan.to_json()}
    if not torch.cuda.is_available():
        print("no CUDA device: plan only")
        return result
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.reset_peak_memory_stats()
    measured = simulate_step(load_config(config, overrides), 1, fake=False)
    allocated = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    dist.destroy_process_group()
    result["measured"] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tracker_peak_bytes": measured.peak_bytes,
        "tracker_breakdown": measured.breakdown,
        "max_memory_allocated": allocated,
        "max_memory_reserved": reserved,
        "plan_over_allocated": plan.memory.peak_bytes / allocated,
        "reserved_over_allocated": reserved / allocated,
        "margin_covers_reserved": plan.memory.peak_bytes * (1 + FRAGMENTATION_MARGIN) >= reserved,
    }
    print(json.dumps(result["measured"], indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/small-gpu-polynorm.yaml")
    parser.add_argument("--gpu", default="h100", help="GPU kind the plan assumes")
    parser.add_argument("--out", default="plan_vs_measured.json")
    parser.add_argument("--also-compiled", action="store_true",
                        help="also plan and measure the step with --compile=true")  # fmt: skip
    args, overrides = parser.parse_known_args(argv)

    result = {"config": args.config, **plan_and_measure(args.config, overrides, args.gpu)}
    if args.also_compiled:
        result["compiled"] = plan_and_measure(args.config, [*overrides, "--compile=true"], args.gpu)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
