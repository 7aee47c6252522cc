"""Run under torchrun (gloo) by test_cuda_syncs.py: a training step with expert parallelism
(EP over all ranks, FSDP) under tests/cuda_rules.py's recorder, for several routing options.

    python -m torch.distributed.run --nproc_per_node=2 -m tests.olmo.cuda_sync_worker

Prints "ok" per rank when every recorded sync is in ``EP_ALLOWED`` (and the EP split-size
exchange was seen, so the EP path ran; under forced balance, where the split sizes follow from
the shapes, that it was not); otherwise exits non-zero listing the others.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from olmo.config import load_config
from olmo.plan_memory import force_balance
from olmo.train_module import MoETrainModule, train_module_config
from tests.cuda_rules import record_cuda_syncs, unexpected
from tests.olmo.helpers import TEST_CONFIG
from tests.olmo.test_cuda_syncs import EP_ALLOWED

FORCED = "forced balance (benchmarks, planner): split sizes from the host"
OPTIONS = {
    "dropless": [],
    "capacity, shared expert": ["--model.moe_capacity_factor=0.5", "--model.moe_shared_experts=1"],
    "sigmoid, aux-free bias, global-batch lb": [
        "--model.moe_router_score=sigmoid", "--model.moe_renormalize=true",
        "--model.moe_zloss_weight=0.0", "--model.moe_bias_update_rate=0.01",
        "--model.moe_lb_granularity=global_batch",
    ],
    "per-expert sets": ["--model.moe_activation_per_expert=true"],
    FORCED: [],
}  # fmt: skip
EP_EXCHANGE = "moe_model/expert_parallel.py::dispatch"


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    for label, overrides in OPTIONS.items():
        cfg = load_config(TEST_CONFIG, [f"--parallel.expert_parallel_degree={world}", *overrides])
        if label == FORCED:
            cfg = force_balance(cfg)
        module = MoETrainModule(
            cfg.model.build(init_device="meta"), train_module_config(cfg), torch.device("cpu")
        )
        # train_batch / optim_step read only these from olmo-core's Trainer.
        module._trainer = SimpleNamespace(
            global_step=1, max_steps=8, record_metric=lambda *a, **k: None
        )
        gen = torch.Generator().manual_seed(rank)
        batch = {"input_ids": torch.randint(0, cfg.model.vocab_size, (4, 32), generator=gen)}
        with record_cuda_syncs() as syncs:
            module.train_batch(batch)
            module.optim_step()
        bad = unexpected(syncs, EP_ALLOWED)
        kinds = sorted({f"{s.op} at {s.where}" for s in syncs})
        print(f"rank {rank}, {label}: {len(syncs)} recorded: {kinds}", flush=True)
        if bad:
            failures.append(f"{label}: " + "; ".join(map(str, bad)))
        exchanged = any(s.where == EP_EXCHANGE for s in syncs)
        if label == FORCED and exchanged:
            failures.append(f"{label}: the split sizes were read from the device")
        elif label != FORCED and not exchanged:
            failures.append(f"{label}: no split-size exchange recorded: the EP path did not run")
    if failures:
        sys.exit(f"rank {rank}:\n" + "\n".join(failures))
    print("ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
