"""OLMoE's default recipe, pinned: a golden trace of three AdamW steps on CPU in fp32.

Every routing and balancing option (sigmoid router, expert bias, capacity factor, shared
experts, dense first blocks, LB granularities) promises that with the option off the model is
OLMoE's as it was before the options existed. This test pins that promise to numbers: the
configs/tiny.yaml shapes (SwiGLU at its hidden size 256, PolyNorm at the equal-parameter 384),
default routing, three AdamW steps on fixed random tokens; per step the CE, LB and z losses and
each layer's per-expert token counts, then a fingerprint of the final weights (their norm and
four fixed random projections). The values were generated at commit 9ea8781 (the MoE layer
before any routing option); on the machine that generated them the trace is bitwise equal at
9ea8781, b60a583 (the options added) and later commits.

The comparison allows what another CPU or BLAS may legitimately change (summation order:
1e-5 relative on the losses, 1e-5 of the weights' norm on each projection) and nothing a change
of the recipe would: renormalised top-k weights, another balancing formula, a different init or
optimizer step moves these values by orders of magnitude more, and the token counts, which
depend only on which experts win, must be equal.

Regenerate (only for an intended change of the default numerics; say why in the commit):
    git worktree add /tmp/golden 9ea8781   # or the commit whose numerics become the reference
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/golden python tests/moe_model/test_default_recipe.py
    git worktree remove /tmp/golden
and paste the printed dict over ``GOLDEN``. The trace uses only ModelConfig, build and the
forward's ModelOutput, which that commit already had, so this file runs unchanged there.
"""

from __future__ import annotations

import pprint

import pytest
import torch
import torch.nn.functional as F

from moe_model.config import ModelConfig

STEPS = 3
SEED = 6198  # configs/tiny.yaml's seed
BATCH, SEQ = 4, 64


def tiny_model_config(activation: str) -> ModelConfig:
    """configs/tiny.yaml's model, every option at its default (OLMoE's recipe)."""
    return ModelConfig(
        vocab_size=50280, embedding_size=50304, d_model=128, n_layers=4, n_heads=4,
        max_sequence_length=128, activation_type=activation,
        mlp_hidden_size={"swiglu": 256, "polynorm": 384}[activation],
        moe_num_experts=8, moe_top_k=2, moe_loss_weight=0.01, moe_zloss_weight=0.001,
    )  # fmt: skip


def weights_fingerprint(model: torch.nn.Module, n_projections: int = 4) -> dict:
    """The norm of all weights and their dot products with fixed seeded Gaussian vectors, in
    float64: any change of the weights beyond rounding moves a projection."""
    norm_sq, projections = 0.0, [0.0] * n_projections
    for index, (_, tensor) in enumerate(sorted(model.state_dict().items())):
        x = tensor.detach().double().flatten()
        norm_sq += float(x @ x)
        gen = torch.Generator().manual_seed(index)
        for k in range(n_projections):
            projections[k] += float(x @ torch.randn(x.numel(), generator=gen, dtype=torch.float64))
    return {"norm": norm_sq**0.5, "projections": projections}


def default_recipe_trace(activation: str) -> dict:
    """Losses and counts of each step and the final weights' fingerprint, fp32 on CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order in the CPU kernels
    try:
        config = tiny_model_config(activation)
        torch.manual_seed(SEED)
        model = config.build()
        optim = torch.optim.AdamW(
            model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
        )
        gen = torch.Generator().manual_seed(SEED + 1)
        steps = []
        for _ in range(STEPS):
            ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)
            out = model(ids)
            ce = F.cross_entropy(
                out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
            )
            optim.zero_grad()
            (ce + out.lb_loss + out.z_loss).backward()
            optim.step()
            steps.append({
                "ce": ce.item().hex(),
                "lb": out.lb_loss.item().hex(),
                "z": out.z_loss.item().hex(),
                "tokens_per_expert": out.tokens_per_expert_LE.tolist(),
            })  # fmt: skip
        return {"steps": steps, "weights": weights_fingerprint(model)}
    finally:
        torch.set_num_threads(threads)


# Generated at 9ea8781 with the command in the module docstring.
GOLDEN: dict = {
    "swiglu": {
        "steps": [
            {
                "ce": "0x1.5ac6ba0000000p+3",
                "lb": "0x1.55351e0000000p-7",
                "z": "0x1.23392e0000000p-9",
                "tokens_per_expert": [
                    [55, 62, 76, 53, 84, 57, 71, 54],
                    [67, 56, 68, 99, 44, 73, 43, 62],
                    [138, 70, 86, 45, 72, 32, 27, 42],
                    [10, 16, 1, 122, 154, 26, 75, 108],
                ],
            },
            {
                "ce": "0x1.5bbac40000000p+3",
                "lb": "0x1.5189840000000p-7",
                "z": "0x1.1bec4a0000000p-9",
                "tokens_per_expert": [
                    [62, 63, 45, 92, 89, 45, 53, 63],
                    [26, 57, 74, 116, 41, 101, 33, 64],
                    [35, 82, 74, 97, 17, 68, 50, 89],
                    [153, 14, 11, 96, 88, 75, 14, 61],
                ],
            },
            {
                "ce": "0x1.5aec480000000p+3",
                "lb": "0x1.59063e0000000p-7",
                "z": "0x1.1e8d000000000p-9",
                "tokens_per_expert": [
                    [60, 59, 66, 70, 72, 58, 58, 69],
                    [69, 75, 39, 37, 109, 59, 15, 109],
                    [113, 79, 189, 9, 27, 25, 37, 33],
                    [6, 21, 69, 52, 169, 78, 23, 94],
                ],
            },
        ],
        "weights": {
            "norm": 93.8068884307689,
            "projections": [
                17.388868369005507,
                82.60380925091567,
                51.769733191334275,
                -166.73272655495134,
            ],
        },
    },
    "polynorm": {
        "steps": [
            {
                "ce": "0x1.5b228a0000000p+3",
                "lb": "0x1.4b1d240000000p-7",
                "z": "0x1.1ca1620000000p-9",
                "tokens_per_expert": [
                    [55, 62, 76, 53, 84, 57, 71, 54],
                    [73, 53, 66, 53, 66, 56, 77, 68],
                    [40, 88, 47, 72, 60, 71, 53, 81],
                    [84, 63, 59, 63, 45, 118, 25, 55],
                ],
            },
            {
                "ce": "0x1.5af4100000000p+3",
                "lb": "0x1.58496c0000000p-7",
                "z": "0x1.1ed8a80000000p-9",
                "tokens_per_expert": [
                    [55, 65, 48, 98, 91, 44, 46, 65],
                    [42, 48, 49, 49, 139, 28, 47, 110],
                    [145, 62, 31, 65, 74, 87, 22, 26],
                    [28, 173, 87, 49, 12, 60, 54, 49],
                ],
            },
            {
                "ce": "0x1.5b21420000000p+3",
                "lb": "0x1.59c8be0000000p-7",
                "z": "0x1.2454a80000000p-9",
                "tokens_per_expert": [
                    [45, 49, 65, 68, 62, 68, 74, 81],
                    [47, 44, 39, 44, 116, 24, 110, 88],
                    [100, 92, 31, 19, 110, 61, 27, 72],
                    [21, 173, 15, 114, 7, 46, 24, 112],
                ],
            },
        ],
        "weights": {
            "norm": 93.76546128449809,
            "projections": [
                25.957878155777166,
                29.96131592965535,
                22.94903639884307,
                58.370415691781275,
            ],
        },
    },
}


@pytest.mark.parametrize("activation", ["swiglu", "polynorm"])
def test_default_recipe_matches_olmoes(activation):
    got = default_recipe_trace(activation)
    want = GOLDEN[activation]
    for step, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True), start=1):
        for key in ("ce", "lb", "z"):
            g_val, w_val = float.fromhex(g[key]), float.fromhex(w[key])
            assert g_val == pytest.approx(w_val, rel=1e-5), (
                f"step {step} {key}: {g_val!r} != golden {w_val!r}"
            )
        assert g["tokens_per_expert"] == w["tokens_per_expert"], f"step {step} tokens_per_expert"
    norm = want["weights"]["norm"]
    assert got["weights"]["norm"] == pytest.approx(norm, rel=1e-5)
    for k, (g_proj, w_proj) in enumerate(
        zip(got["weights"]["projections"], want["weights"]["projections"], strict=True)
    ):
        assert abs(g_proj - w_proj) <= 1e-5 * norm, (
            f"weights projection {k}: {g_proj!r} != golden {w_proj!r}"
        )


if __name__ == "__main__":
    pprint.pprint(
        {a: default_recipe_trace(a) for a in ("swiglu", "polynorm")}, width=100, sort_dicts=False
    )
