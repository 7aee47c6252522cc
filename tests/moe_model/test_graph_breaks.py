"""One graph per block: ``torch._dynamo.explain`` of a dense block and of an MoE block of every
routing option, plain and wrapped for activation checkpointing as the train module wraps it,
finds no graph break.

A break inside a checkpointed block makes torch.compile run the whole block eagerly (dynamo
cannot split a checkpoint region), so ``compile: true`` with ``activation_checkpointing: true``
would compile nothing; a break elsewhere costs a graph boundary and its guards per block.

Under bf16 autocast, as on a GPU: grouped_mm's fake-tensor rule (what dynamo traces with) takes
only bf16, and in fp32 the experts take the per-expert loop, which reads split sizes on the host
(a break by design, see ``MoELayer._impl``). Per-expert activation sets read split sizes too
(the option's documented host sync) and are not covered here.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from moe_model.config import ModelConfig
from moe_model.transformer import Block

ROUTING = {
    "softmax (OLMoE)": {},
    "sigmoid, renormalised, route scale": dict(
        moe_router_score="sigmoid", moe_renormalize=True, moe_route_scale=2.5,
        moe_zloss_weight=0.0,
    ),
    "aux-free bias": dict(moe_bias_update_rate=1e-3),
    "capacity drops": dict(moe_capacity_factor=0.5),
    "shared expert": dict(moe_shared_experts=1),
    "sequence lb": dict(moe_lb_granularity="sequence"),
    "global-batch lb (one process)": dict(moe_lb_granularity="global_batch"),
    "swiglu": dict(activation_type="swiglu", mlp_hidden_size=16),
    "forced balance": dict(moe_force_balance=True),
}
BLOCKS = {"dense block": dict(block_type="dense"), **{f"moe: {k}": v for k, v in ROUTING.items()}}


def block(**changes) -> Block:
    torch.manual_seed(0)
    config = ModelConfig(**{
        "vocab_size": 64, "embedding_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2,
        "max_sequence_length": 16, "activation_type": "polynorm", "mlp_hidden_size": 24,
        "moe_num_experts": 4, "moe_top_k": 2, **changes,
    })  # fmt: skip
    return config.build_block(0).train()


def explain(module: torch.nn.Module):
    torch._dynamo.reset()
    x_BSD = torch.randn(2, 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch._dynamo.explain(module)(x_BSD)


# The default test command checks OLMoE's block; the other blocks are marked slow.
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize(
    "name", [n if n == "moe: softmax (OLMoE)" else pytest.param(n, marks=pytest.mark.slow) for n in BLOCKS]
)
def test_block_is_one_graph(name, checkpointed):
    module = block(**BLOCKS[name])
    if checkpointed:  # as olmo.train_module.parallelize_model wraps each block
        module = checkpoint_wrapper(module, preserve_rng_state=False)
    result = explain(module)
    reasons = [str(r.reason).splitlines()[0] for r in result.break_reasons]
    assert (result.graph_count, result.graph_break_count) == (1, 0), reasons


def test_explain_sees_a_break_in_the_moe_block(monkeypatch):
    """The check can fail: the layer's former bincount count breaks the graph."""
    import moe_model.moe as moe

    def bincount_counts(experts_TK, num_experts):
        return torch.bincount(experts_TK.reshape(-1), minlength=num_experts)

    monkeypatch.setattr(moe, "count_per_expert", bincount_counts)
    result = explain(block())
    assert result.graph_break_count >= 1
    assert any("bincount" in str(r.reason) for r in result.break_reasons)
