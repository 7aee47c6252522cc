"""Run under torchrun (gloo) by test_expert_parallel.py: the all-to-all dispatcher and an
expert-parallel MoE layer against the single-rank ones on the same tokens.

    python -m torch.distributed.run --nproc_per_node=N -m tests.moe_model.ep_dispatch_worker EP

Each rank routes its own tokens. The references run every rank's tokens through the whole layer
(LocalDispatcher) on this rank; expert-weight gradients are summed over ranks, as the tokens of
all ranks reach an expert's owner. Prints "ok" per rank; exits non-zero with the first mismatch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe_model.dispatch import LocalDispatcher
from moe_model.expert_parallel import AllToAllDispatcher
from moe_model.routing import Routing, count_per_expert
from tests.moe_model.test_transformer import tiny_config

E, K, T, D = 4, 2, 6, 8


def fail(message: str) -> None:
    sys.exit(f"rank {dist.get_rank()}: {message}")


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    if got.shape != want.shape:
        fail(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    scale = want.abs().max().clamp_min(1e-30)
    err = ((got - want).abs().max() / scale).item() if want.numel() else 0.0
    if err > tol:
        fail(f"{name}: max relative error {err:.3g} > {tol}")


def scale_by_expert(x_RD: torch.Tensor, rows_per_expert: torch.Tensor, experts: range) -> torch.Tensor:
    """A stand-in for the expert FFNs: expert e multiplies its rows by e + 1."""
    factor_R = torch.repeat_interleave(
        torch.tensor([e + 1.0 for e in experts]), rows_per_expert, output_size=x_RD.shape[0]
    )
    return x_RD * factor_R.unsqueeze(-1)


def check_dispatcher(ep_group: dist.ProcessGroup, experts_TK: torch.Tensor, label: str) -> None:
    """dispatch -> per-expert function -> combine equals the same on this rank alone."""
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(dist.get_rank()))
    weights_TK = torch.rand(T, K, generator=torch.Generator().manual_seed(7))
    local, ep = LocalDispatcher(), AllToAllDispatcher(ep_group, E)
    counts_E = count_per_expert(experts_TK, E)
    x_RD, rows_E, done = local.dispatch(x_TD, experts_TK, counts_E)
    want = local.combine(scale_by_expert(x_RD, rows_E, range(E)), weights_TK, done)
    x_RD, rows_X, done = ep.dispatch(x_TD, experts_TK, counts_E)
    if rows_X.shape != (E // dist.get_world_size(ep_group),):
        fail(f"{label}: counts for {tuple(rows_X.shape)} experts")
    if int(rows_X.sum()) != x_RD.shape[0]:
        fail(f"{label}: {x_RD.shape[0]} rows received but counts say {int(rows_X.sum())}")
    got = ep.combine(scale_by_expert(x_RD, rows_X, ep.local_experts(E)), weights_TK, done)
    check_close(f"{label}: combined output", got, want, tol=0)


def forced_routing(layer, experts_TK: torch.Tensor):
    """Wrap ``layer.route`` so every token picks the given experts (with the router's weights)."""
    route = layer.route

    def routed(x_TD: torch.Tensor, choice=None) -> Routing:
        r = route(x_TD, choice)
        chosen = experts_TK.expand(x_TD.shape[0], -1)
        counts_E = count_per_expert(chosen, r.probs_TE.shape[-1])
        return Routing(r.logits_TE, r.probs_TE, r.probs_TE.gather(1, chosen), chosen, counts_E)

    layer.route = routed


def check_layer(mesh, config, label: str, experts_TK: torch.Tensor | None = None) -> None:
    """An expert-parallel MoELayer: output, aux losses, counts and gradients vs the whole layer."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(3)
    whole = config.build().blocks[0].ffn
    torch.manual_seed(3)
    model = config.build()
    layer = model.blocks[0].ffn
    layer.parallelize(mesh["ep"])
    if experts_TK is not None:
        forced_routing(whole, experts_TK)
        forced_routing(layer, experts_TK)
    xs = [torch.randn(2, 5, config.d_model, generator=torch.Generator().manual_seed(r))
          for r in range(world)]  # fmt: skip
    probe = torch.randn(2, 5, config.d_model, generator=torch.Generator().manual_seed(99))

    # Reference: every rank's tokens through the whole layer, one rank at a time.
    outputs, auxes = [], []
    for x in xs:
        y, aux = whole(x)
        (y * probe).sum().add(aux.lb_loss + aux.z_loss).backward()
        outputs.append(y.detach())
        auxes.append(aux)
    y, aux = layer(xs[rank])
    (y * probe).sum().add(aux.lb_loss + aux.z_loss).backward()

    check_close(f"{label}: output", y.detach(), outputs[rank])
    check_close(f"{label}: lb_loss", aux.lb_loss.detach(), auxes[rank].lb_loss.detach())
    check_close(f"{label}: z_loss", aux.z_loss.detach(), auxes[rank].z_loss.detach())
    if not torch.equal(aux.tokens_per_expert_E, auxes[rank].tokens_per_expert_E):
        fail(f"{label}: tokens_per_expert_E differs from the whole layer's")
    reference = dict(whole.named_parameters())
    for name, p in layer.named_parameters():
        grad = p.grad
        if name in ("w_in_EDH", "w_out_EHD"):
            # An owner holds the sum over its EP group's tokens; the other groups' owners of
            # the same experts hold the rest.
            grad = grad.full_tensor()
            dist.all_reduce(grad, group=mesh["efsdp"].get_group())
        else:
            dist.all_reduce(grad)  # each rank's share of the other parameters' gradient
        check_close(f"{label}: gradient of {name}", grad, reference[name].grad, tol=1e-5)


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    ep = int(sys.argv[1])
    mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("efsdp", "ep"))
    group = mesh["ep"].get_group()
    spread = torch.randint(0, E, (T, K), generator=torch.Generator().manual_seed(dist.get_rank()))
    check_dispatcher(group, spread, "random routing")
    # Every token to experts 0 and 1: the ranks holding other experts receive no rows.
    check_dispatcher(group, torch.tensor([[0, 1]]).expand(T, K), "all rows to the first rank")

    for per_expert in (False, True):
        config = tiny_config("polynorm", moe_num_experts=E, moe_top_k=K,
                             moe_activation_per_expert=per_expert)  # fmt: skip
        check_layer(mesh, config, f"layer (per-expert sets: {per_expert})")
    config = tiny_config("swiglu", moe_num_experts=E, moe_top_k=K)
    check_layer(mesh, config, "swiglu layer, no rows for the last rank", torch.tensor([[0, 1]]))
    # Forced balance: the split sizes come from the host (no count exchange); 10 tokens x 2
    # rows over 4 experts, 5 each.
    exchange = dist.all_to_all_single
    dist.all_to_all_single = lambda *a, **k: fail("forced balance exchanged counts")
    try:
        for per_expert in (False, True):
            config = tiny_config("polynorm", moe_num_experts=E, moe_top_k=K,
                                 moe_force_balance=True, moe_activation_per_expert=per_expert)  # fmt: skip
            check_layer(mesh, config, f"forced balance, counts from the host (per-expert sets: {per_expert})")
    finally:
        dist.all_to_all_single = exchange
    dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()
