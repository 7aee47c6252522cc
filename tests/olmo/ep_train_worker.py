"""Run under torchrun (gloo) by test_train_module.py: a model parallelised with expert parallelism
(FSDP units on a (world/ep, ep) mesh) against plain FSDP, on the same tokens.

    python -m torch.distributed.run --nproc_per_node=N -m tests.olmo.ep_train_worker EP [OPTION...]

OPTIONs: ``per_expert`` (a PolyNorm set per expert), ``shared`` (one shared expert, which stays
FSDP over all ranks), ``capacity`` (capacity factor 1: rows dropped before dispatch),
``aux_free`` (sigmoid router with the auxiliary-loss-free expert bias, and the balance loss over
the global batch: expert counts summed over all ranks).

Checks, per rank: initial weights equal (whole tensors), the loss and the per-expert load of a
forward, every gradient after backward (the expert weights' included) and the clipped global
gradient norm. With ``aux_free`` the forward routes with a nonzero bias, and after the step's
bias update (as the train module does it: counts summed over ranks) the biases are equal and a
second forward's loss and load are too. Prints "ok" per rank; exits non-zero with the first
mismatch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from olmo.optim import clip_grad_norm_over_meshes_
from olmo.parallelism import parallelize_model
from tests.moe_model.test_transformer import tiny_config

BIAS_RATE = 0.01
# Large enough against sigmoid scores near 0.5 to change top-k choices, so the EP run must route
# with the bias to match; different in each layer.
INITIAL_BIAS_E = torch.tensor([0.3, -0.2, 0.1, -0.15])

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
               "shared": {"moe_shared_experts": 1}, "capacity": {"moe_capacity_factor": 1.0},
               "aux_free": {"moe_router_score": "sigmoid", "moe_renormalize": True,
                            "moe_zloss_weight": 0.0, "moe_bias_update_rate": BIAS_RATE,
                            "moe_lb_granularity": "global_batch"}}  # fmt: skip
    changes = {k: v for arg in sys.argv[2:] for k, v in options[arg].items()}
    config = tiny_config("polynorm", moe_num_experts=4, **changes)
    plain, expert_parallel = build(config, 1), build(config, ep)
    reference = dict(plain.named_parameters())
    aux_free = config.moe_bias_update_rate is not None
    if aux_free:
        for model in (plain, expert_parallel):
            for i, layer in enumerate(model.moe_layers()):
                layer.expert_bias_E.copy_(INITIAL_BIAS_E * (i + 1))

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

    if aux_free:
        loads = [load_ref.clone(), load_ep.clone()]
        for load in loads:
            dist.all_reduce(load)
        plain.update_expert_bias(loads[0])
        expert_parallel.update_expert_bias(loads[1])
        for i, (a, b) in enumerate(zip(plain.moe_layers(), expert_parallel.moe_layers())):
            step = (b.expert_bias_E - INITIAL_BIAS_E * (i + 1)) / BIAS_RATE
            if not torch.equal(a.expert_bias_E, b.expert_bias_E):
                fail(f"layer {i} expert bias {b.expert_bias_E.tolist()} != "
                     f"{a.expert_bias_E.tolist()}")  # fmt: skip
            # sign(mean load - load): each entry moves by -rate, 0 or +rate, and some move.
            if not ((step - step.round()).abs().max() < 1e-4 and 0 < step.abs().max() < 1.5):
                fail(f"layer {i} expert bias moved by {step.tolist()} x rate")
        with torch.no_grad():
            outs = [model(ids) for model in (plain, expert_parallel)]
        if not torch.equal(outs[1].tokens_per_expert_LE, outs[0].tokens_per_expert_LE):
            fail("per-expert load differs after the bias update")
        if not torch.allclose(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-6):
            fail("logits differ after the bias update")
    dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()
