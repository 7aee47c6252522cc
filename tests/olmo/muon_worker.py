"""Run under torchrun (gloo) by test_muon.py: the distributed Muon step against a single-process
Muon step on the same parameters and gradients, in float64.

    python -m torch.distributed.run --nproc_per_node=N -m tests.olmo.muon_worker EP [ACTIVATION]

Each rank holds a whole-model reference (plain tensors) and the model parallelised as training
does it (FSDP2, with expert parallelism of degree EP when EP > 1; a shared expert and a dense
first block, so every kind of Muon matrix is there), both in float64 with the same weights.
Two steps with the same made-up gradients (whole tensors drawn from one seed; each rank gives
its shard) must leave every parameter equal to the reference's. Then a stand-alone pair of
matrices whose rows do not split evenly (5 and 3 rows over N ranks; some ranks hold none).
Prints "ok" per rank; exits non-zero with the first mismatch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from olmo.config import OptimizerConfig
from olmo.muon import MatrixLayout, MuonWithAdamW
from olmo.optim import build_muon
from olmo.parallelism import parallelize_model
from tests.moe_model.test_transformer import tiny_config

REL_TOL = 1e-12
"""float64 with the same ops on the same whole matrices; only summation order may differ."""


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full``'s entries that this rank holds of the parameter ``like``."""
    if not isinstance(like, DTensor):
        return full.clone()
    shape, offset = compute_local_shape_and_global_offset(
        full.shape, like.device_mesh, like.placements
    )
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    local = full[index].clone()
    assert local.shape == like.to_local().shape, (local.shape, like.to_local().shape)
    return local


def set_grads(pairs, step: int) -> None:
    """The same whole gradients for both models, one seed per parameter and step."""
    for k, (ref, dist_p) in enumerate(pairs):
        g = torch.randn(ref.shape, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1000 * step + k))  # fmt: skip
        ref.grad = g
        local = shard_of(g, dist_p)
        dist_p.grad = (
            DTensor.from_local(local, dist_p.device_mesh, dist_p.placements,
                               shape=dist_p.shape, stride=dist_p.stride())  # fmt: skip
            if isinstance(dist_p, DTensor) else local
        )


def compare(pairs, names, what: str, fail) -> None:
    for name, (ref, dist_p) in zip(names, pairs):
        got = dist_p.full_tensor() if isinstance(dist_p, DTensor) else dist_p
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
        if err > REL_TOL:
            fail(f"{what} {name}: max relative error {err:.3g}")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = int(sys.argv[1])
    activation = sys.argv[2] if len(sys.argv) > 2 else "swiglu"

    def fail(message: str) -> None:
        sys.exit(f"rank {rank}: {message}")

    config = tiny_config(activation, n_layers=3, moe_first_dense_layers=1, moe_shared_experts=1)
    torch.manual_seed(5)
    reference = config.build("cpu").double()
    sharded, is_sharded = parallelize_model(
        config.build("cpu").double(), device=torch.device("cpu"), param_dtype=torch.float64,
        activation_checkpointing=False, compile_blocks=False, expert_parallel_degree=ep,
    )  # fmt: skip
    assert is_sharded
    ref_params = dict(reference.named_parameters())
    names = [n for n, _ in sharded.named_parameters()]
    pairs = [(ref_params[n], p) for n, p in sharded.named_parameters()]
    with torch.no_grad():
        for ref, p in pairs:
            p.to_local().copy_(shard_of(ref.detach(), p))
    compare(pairs, names, "initial", fail)
    if ep > 1 and sharded.blocks[1].ffn.w_in_EDH.to_local().shape[0] != 4 // world:
        fail("expert weights not sharded over all ranks")

    cfg = OptimizerConfig(name="muon", learning_rate=0.02, weight_decay=0.1,
                          muon_ns_dtype="fp32")  # fmt: skip
    optimizers = [build_muon(model, cfg) for model in (reference, sharded)]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if group["use_muon"]:
                group["ns_dtype"] = None  # the parameters' float64
    muon_names = {n for n, p in reference.named_parameters() if p in optimizers[0].layouts}
    stacks = {n for n in names if n.endswith(("w_in_EDH", "w_out_EHD"))}
    if not stacks or not stacks <= muon_names or not any("shared" in n for n in muon_names):
        fail(f"Muon parameters {sorted(muon_names)} miss expert stacks or the shared expert")
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    for step in (1, 2):
        set_grads(pairs, step)
        for optimizer in optimizers:
            optimizer.step()
        compare(pairs, names, f"step {step}", fail)
    unmoved = [n for n, p in reference.named_parameters() if torch.equal(p, initial[n])]
    if unmoved:
        fail(f"parameters {unmoved} did not move")

    # Rows that do not split evenly: FSDP2 gives 5 rows over 4 ranks as 2, 2, 1, 0.
    torch.manual_seed(6)
    plain = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False)).double()
    uneven = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False)).double()
    uneven.load_state_dict(plain.state_dict())
    fully_shard(uneven)
    small_pairs = list(zip(plain.parameters(), uneven.parameters()))
    small_opts = []
    for model in (plain, uneven):
        params = list(model.parameters())
        group = {"params": params, "use_muon": True, "lr": 0.05, "weight_decay": 0.1,
                 "momentum": 0.95, "lr_scale": "original", "ns_steps": 5, "ns_dtype": None}  # fmt: skip
        small_opts.append(MuonWithAdamW([group], {p: MatrixLayout(experts=False) for p in params}))
    for step in (1, 2):
        set_grads(small_pairs, 10 + step)
        for optimizer in small_opts:
            optimizer.step()
        compare(small_pairs, ["5x6", "3x5"], f"uneven step {step}", fail)
    dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()
