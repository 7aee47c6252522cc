"""Every grouped_mm the MoE layer runs, forward and backward, within CUDA's fast-path rules
(``tests/grouped_mm_rules.py``), and the checker itself catching calls that break them."""

from __future__ import annotations

import pytest
import torch

from moe_model.moe import grouped_mm
from tests.grouped_mm_rules import GroupedMMRules, grouped_mm_violations
from tests.moe_model.test_expert_parallel import run_worker
from tests.moe_model.test_moe import make_layer, skewed_inputs

BF16 = torch.bfloat16

# Two projections, each one forward call and two backward calls (input and weight gradients).
CALLS_PER_STEP = 6

VARIANTS = {
    "default (OLMoE)": {},
    "sigmoid + bias": dict(
        moe_router_score="sigmoid", moe_bias_update_rate=1e-3, moe_zloss_weight=0.0
    ),
    "capacity 0.5": dict(moe_capacity_factor=0.5),
    "1 shared expert": dict(moe_shared_experts=1),
    "per-expert sets": dict(moe_activation_per_expert=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("activation", ["polynorm", "swiglu", "relu2"])
def test_moe_layer_grouped_mm_calls_follow_cuda_rules(activation, variant):
    """bf16 layer, routing that leaves experts 4 and 5 empty: every call is CUDA-valid."""
    layer = make_layer(activation, "grouped_mm", **VARIANTS[variant])
    x = skewed_inputs(layer, num_tokens=40)
    layer = layer.to(BF16).train()
    x = x.to(BF16).requires_grad_(True)
    with GroupedMMRules() as rules:
        y, aux = layer(x)
        (y.float().square().sum() + aux.lb_loss + aux.z_loss).backward()
    assert (aux.tokens_per_expert_E[4:] == 0).all(), aux.tokens_per_expert_E
    if aux.dropped_rows is not None:
        assert aux.dropped_rows > 0, "capacity dropped nothing: tests less"
    rules.assert_clean(min_calls=CALLS_PER_STEP)
    layouts = sorted({c.layout for c in rules.calls})
    assert layouts == ["2d x 2d", "2d x 3d"], layouts


@pytest.mark.slow
def test_expert_parallel_grouped_mm_calls_follow_cuda_rules():
    """2 gloo ranks, bf16 expert-parallel layers with empty local experts and a rank that
    computes every row (tests/moe_model/ep_grouped_mm_worker.py)."""
    proc = run_worker(nproc=2, ep=2, module="tests.moe_model.ep_grouped_mm_worker")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok") == 2


# ---- the checker flags what CUDA rejects ----------------------------------------------------

R, D, H, G = 24, 16, 8, 3


def operands(dtype=BF16):
    gen = torch.Generator().manual_seed(0)
    x_RD = torch.randn(R, D, generator=gen).to(dtype)
    w_GDH = torch.randn(G, D, H, generator=gen).to(dtype)
    return x_RD, w_GDH


def offsets(*ends: int) -> torch.Tensor:
    return torch.tensor(ends, dtype=torch.int32)


def run_checked(*args, **kwargs) -> list[str]:
    """The call under the mode (CPU runs it), and the violations the mode recorded."""
    with GroupedMMRules() as rules:
        grouped_mm(*args, **kwargs)
    assert len(rules.calls) == 1
    return rules.violations


def test_checker_passes_a_valid_call():
    x_RD, w_GDH = operands()
    assert run_checked(x_RD, w_GDH, offs=offsets(5, 5, R)) == []


def test_checker_flags_a_misaligned_data_pointer():
    x_RD, w_GDH = operands()
    flat = torch.cat([x_RD.new_zeros(1), x_RD.reshape(-1)])
    shifted_RD = flat[1:].view(R, D)  # same values, storage offset 1 (2 bytes)
    found = run_checked(shifted_RD, w_GDH, offs=offsets(5, 5, R))
    assert len(found) == 1 and "data pointer not 16-byte aligned" in found[0], found


def test_checker_flags_strides_not_multiple_of_16_bytes():
    x_RD, w_GDH = operands()
    narrow_RD = torch.randn(R, D + 4).to(BF16)[:, :D]  # row stride 20 elements = 40 bytes
    found = grouped_mm_violations(narrow_RD, w_GDH, offsets(8, 16, R))  # CPU rejects it too
    assert any("leading stride 20" in v for v in found), found


def test_checker_flags_fp32_operands():
    x_RD, w_GDH = operands(torch.float32)
    found = run_checked(x_RD, w_GDH, offs=offsets(8, 16, R))
    assert len(found) == 2 and all("fast path takes bf16 only" in v for v in found), found


def test_checker_flags_empty_group_where_the_kernel_asserts():
    """2d x 2d (a weight gradient): an empty group is fine with A column-major and B row-major
    (autograd's layout), and a kernel assert with A row-major."""
    x_RD, _ = operands()
    g_RH = torch.randn(R, H).to(BF16)
    # Autograd's layout: x_RD^T (column-major) @ g_RH (row-major).
    assert run_checked(x_RD.t(), g_RH, offs=offsets(8, 8, R)) == []
    found = run_checked(x_RD.t().contiguous(), g_RH, offs=offsets(8, 8, R))
    assert any("empty groups [1]" in v for v in found), found
    # Row-major A walks along the ragged dim: group sizes must be multiples of 8 bf16.
    found = run_checked(x_RD.t().contiguous(), g_RH, offs=offsets(5, 12, R))
    assert any("not multiples of 8 elements (16 bytes) along A" in v for v in found), found


def test_checker_flags_offsets_cpu_rejects_too():
    """What the CPU kernel itself refuses is still named (the pure rule function)."""
    x_RD, w_GDH = operands()
    assert any("int32" in v for v in grouped_mm_violations(x_RD, w_GDH, offsets(5, 9, R).long()))
    found = grouped_mm_violations(x_RD, w_GDH, offsets(9, 5, R - 8))
    assert any("decrease" in v for v in found)
    assert any("past the ragged extent" in v for v in grouped_mm_violations(x_RD, w_GDH, offsets(5, 9, R + 8)))
