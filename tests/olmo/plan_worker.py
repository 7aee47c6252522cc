"""Run under torchrun (gloo) by test_plan.py: one training step of a config on real tensors,
tracked as the planner tracks its fake one (olmo/plan_memory.simulate_step, fake=False).

    python -m torch.distributed.run --nproc_per_node=N -m tests.olmo.plan_worker OUT.json CONFIG [--key=value ...]

Rank 0 writes the measured peak, its breakdown and moment to OUT.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch.distributed as dist

from olmo.config import load_config
from olmo.plan_memory import simulate_step


def main() -> None:
    out, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo")
    cfg = load_config(config, overrides)
    measured = simulate_step(cfg, dist.get_world_size(), fake=False, planned_device_type="cpu")
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(asdict(measured), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
