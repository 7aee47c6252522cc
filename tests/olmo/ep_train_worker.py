"""Run under torchrun (gloo) by test_train_module.py: a model parallelised with expert parallelism
(FSDP units on a (world/ep, ep) mesh) against plain FSDP, on the same tokens.

    python -m torch.distributed.run --nproc_per_node=N -m tests.olmo.ep_train_worker EP [OPTION...]

OPTIONs: ``per_expert`` (a PolyNorm set per expert), ``shared`` (one shared expert, which stays
FSDP over all ranks), ``capacity`` (capacity factor 1: rows dropped before dispatch).

Checks, per rank: initial weights equal (whole tensors), the loss and the per-expert load of a
forward, every gradient after backward (the expert weights' included) and the clipped global
gradient norm. Prints "ok" per rank; exits non-zero with the first mismatch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from olmo.train_module import clip_grad_norm_over_meshes_, parallelize_model
from tests.moe_model.test_transformer import tiny_config

GRAD_TOL = 1e-5
"""Relative to each gradient's largest entry: the two runs sum the same terms in another order
(all-to-all then a column reduce-scatter, against one reduce-scatter over all ranks)."""


def build(config, degree: int) -> nn.Module:
    torch.manual_seed(11)
    model, sharded = parallelize_model(
        config.build("meta"), device=torch.device("cpu"), param_dtype=torch.float32,
        activation_checkpointing=False, compile_blocks=False, expert_parallel_degree=degree,
    )  # fmt: skip
    assert sharded
    model.to_empty(device="cpu")
    torch.manual_seed(11)
    model.init_weights()
    return model


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ep = int(sys.argv[1])
    options = {"per_expert": {"moe_activation_per_expert": True},
               "shared": {"moe_shared_experts": 1}, "capacity": {"moe_capacity_factor": 1.0}}
    changes = {k: v for arg in sys.argv[2:] for k, v in options[arg].items()}
    config = tiny_config("polynorm", moe_num_experts=4, **changes)
    plain, expert_parallel = build(config, 1), build(config, ep)
    reference = dict(plain.named_parameters())

    def fail(message: str) -> None:
        sys.exit(f"rank {rank}: {message}")

    for name, p in expert_parallel.named_parameters():
        if not torch.equal(p.full_tensor(), reference[name].full_tensor()):
            fail(f"initial {name} differs")
    local = expert_parallel.blocks[0].ffn.w_in_EDH.to_local()
    if local.shape[0] != config.moe_num_experts // dist.get_world_size():
        fail(f"expert weights not sharded: local shape {tuple(local.shape)}")

    ids = torch.randint(0, config.vocab_size, (2, config.max_sequence_length),
                        generator=torch.Generator().manual_seed(100 + rank))  # fmt: skip
    results = []
    for model in (plain, expert_parallel):
        out = model(ids)
        loss = out.logits.float().logsumexp(-1).mean() + out.lb_loss + out.z_loss
        loss.backward()
        results.append((loss.detach(), out.tokens_per_expert_LE))
    (loss_ref, load_ref), (loss_ep, load_ep) = results
    if abs(loss_ep.item() - loss_ref.item()) > 1e-6 * abs(loss_ref.item()):
        fail(f"loss {loss_ep.item()} != {loss_ref.item()}")
    if not torch.equal(load_ep, load_ref):
        fail("per-expert load differs")
    for name, p in expert_parallel.named_parameters():
        got, want = p.grad.full_tensor(), reference[name].grad.full_tensor()
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        if err > GRAD_TOL:
            fail(f"gradient of {name}: max relative error {err:.3g}")

    # A max_norm below the norm, so both clip: the scaled gradients must agree too.
    norm_ref = nn.utils.clip_grad_norm_(plain.parameters(), 0.05, foreach=True).full_tensor()
    norm_ep = clip_grad_norm_over_meshes_(list(expert_parallel.parameters()), 0.05)
    if not norm_ref.item() > 0.05 or abs(norm_ep.item() - norm_ref.item()) > 1e-6 * norm_ref.item():
        fail(f"gradient norm {norm_ep.item()} != {norm_ref.item()}")
    for name, p in expert_parallel.named_parameters():
        got, want = p.grad.full_tensor(), reference[name].grad.full_tensor()
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        if err > GRAD_TOL:
            fail(f"clipped gradient of {name}: max relative error {err:.3g}")
    dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()
