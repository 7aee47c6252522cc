"""Run under torchrun (gloo) by test_grouped_mm_rules.py: bf16 expert-parallel MoE layers,
forward and backward, with every ``aten._grouped_mm`` checked against CUDA's fast-path rules
(``tests/grouped_mm_rules.py``).

    python -m torch.distributed.run --nproc_per_node=2 -m tests.moe_model.ep_grouped_mm_worker 2

Prints "ok" per rank; exits non-zero with the first violation.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tests.grouped_mm_rules import GroupedMMRules
from tests.moe_model.ep_dispatch_worker import forced_routing
from tests.moe_model.test_transformer import tiny_config

E, K = 4, 2


def check(mesh, config, label: str, experts_TK: torch.Tensor | None, min_calls: int) -> None:
    torch.manual_seed(3)
    model = config.replace(moe_expert_impl="grouped_mm").build().to(torch.bfloat16)
    layer = model.blocks[0].ffn
    layer.parallelize(mesh["ep"])
    if experts_TK is not None:
        forced_routing(layer, experts_TK)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(2, 5, config.d_model, generator=gen).to(torch.bfloat16).requires_grad_()
    with GroupedMMRules() as rules:
        y, aux = layer(x)
        (y.float().square().sum() + aux.lb_loss + aux.z_loss).backward()
    try:
        rules.assert_clean(min_calls=min_calls)
    except AssertionError as err:
        sys.exit(f"rank {dist.get_rank()}: {label}: {err}")


def main() -> None:
    dist.init_process_group("gloo")
    ep = int(sys.argv[1])
    mesh = init_device_mesh(
        "cpu", (dist.get_world_size() // ep, ep), mesh_dim_names=("efsdp", "ep")
    )
    rank = dist.get_rank()
    for activation in ("polynorm", "swiglu"):
        config = tiny_config(activation, moe_num_experts=E, moe_top_k=K)
        check(mesh, config, f"{activation}, router's choice", None, min_calls=6)
        # Experts 0 and 2: each rank holds one full and one empty local expert.
        check(mesh, config, f"{activation}, empty local experts", torch.tensor([[0, 2]]), 6)
        # Experts 0 and 1: rank 0 computes every row (an empty group nowhere), rank 1 none (its
        # layer takes the per-expert loop and runs no grouped_mm).
        check(mesh, config, f"{activation}, one rank computes all", torch.tensor([[0, 1]]),
              min_calls=6 if rank == 0 else 0)  # fmt: skip
    per_expert = tiny_config("polynorm", moe_num_experts=E, moe_top_k=K,
                             moe_activation_per_expert=True, moe_shared_experts=1)  # fmt: skip
    check(mesh, per_expert, "per-expert sets + shared expert", torch.tensor([[0, 2]]), 6)
    dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()
