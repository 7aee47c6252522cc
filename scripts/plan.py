#!/usr/bin/env python
"""Plan a run: ``python scripts/plan.py CONFIG [--key=value ...] --gpus N --gpu h100 [--json PATH]``.

Prints, per rank, the memory peak of one simulated training step (when it happens and where it
goes), whether it fits the GPU with the margins olmo/plan.py keeps, and a roofline estimate of
the step time, tokens/s and MFU. Needs no GPU: the step runs on fake tensors (olmo/plan_memory.py).
"""

import argparse
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (configs/...)")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (processes)")
    parser.add_argument("--gpu", required=True, help="GPU kind: h100, h200, b200, a100-80gb")
    parser.add_argument("--json", default=None, help="also write the plan as JSON here")
    parser.add_argument(
        "--all-micro-batches", action="store_true",
        help="simulate every micro-batch of the step (default: the first, second and last; the "
        "others repeat the second exactly)",
    )  # fmt: skip
    parser.add_argument(
        "--force-balance", action="store_true",
        help="route every MoE layer's tokens round-robin (every expert T*K/E rows) instead of by "
        "the router: the balanced case, without routing noise",
    )  # fmt: skip
    parser.add_argument(
        "--suggest-microbatch", action="store_true",
        help="find the largest device_train_microbatch_size that fits (a binary search over the "
        "divisors of the per-rank batch: one plan per try) and report that size's plan",
    )  # fmt: skip
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    from moe_model.errors import ConfigError
    from olmo.cli import run_cli

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        from olmo.config import load_config
        from olmo.gpus import gpu_spec
        from olmo.plan import GIB, plan_run, suggest_microbatch_size
        from olmo.plan_memory import check_plannable, force_balance

        if args.gpus < 1:
            raise ConfigError(f"--gpus={args.gpus} must be >= 1")
        gpu = gpu_spec(args.gpu)
        cfg = load_config(args.config, overrides)
        check_plannable(cfg, args.gpus)
        if args.force_balance:
            cfg = force_balance(cfg)
        if args.suggest_microbatch:
            size, plans = suggest_microbatch_size(cfg, args.gpus, gpu)
            for tried, tried_plan in sorted(plans.items()):
                need = tried_plan.required_bytes / GIB
                verdict = "fits" if tried_plan.fits else "does NOT fit"
                print(f"micro-batch {tried}: {need:.1f} GiB with margins: {verdict}")
            if size is None:
                raise ConfigError(
                    f"no device_train_microbatch_size fits {args.gpus} x {gpu.name}: "
                    f"{plans[min(plans)].verdict()}"
                )
            print(f"suggested: --device_train_microbatch_size={size}", flush=True)
            plan = plans[size]
        else:
            plan = plan_run(cfg, args.gpus, gpu, all_micro_batches=args.all_micro_batches)
        print(plan.report(), flush=True)
        if args.json:
            plan.write_json(args.json)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
