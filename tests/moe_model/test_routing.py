"""Routing options of the MoE layer: forced balance (benchmarks only) and imposed choices."""

from __future__ import annotations

import pytest
import torch

from moe_model.routing import (
    RouteChoice,
    balanced_experts,
    balanced_rows_per_expert,
    capacity_keep,
    count_per_expert,
)
from tests.moe_model.test_moe import D, E, K, layer_config, make_layer, reference_moe

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("tokens,top_k,experts", [(12, 2, 6), (64, 8, 64), (7, 3, 5)])
def test_balanced_experts_spread_rows_evenly(tokens, top_k, experts):
    experts_TK = balanced_experts(tokens, top_k, experts, torch.device("cpu"))
    counts_E = count_per_expert(experts_TK, experts)
    # floor or ceil of T*K/E each; exactly T*K/E when E divides T*K.
    assert counts_E.sum() == tokens * top_k
    assert counts_E.max() - counts_E.min() <= 1
    if tokens * top_k % experts == 0:
        assert counts_E.tolist() == [tokens * top_k // experts] * experts
    # A token never gets the same expert twice.
    assert all(len(set(row)) == top_k for row in experts_TK.tolist())


@pytest.mark.parametrize("tokens,top_k,experts", [(12, 2, 6), (64, 8, 64), (7, 3, 5), (3, 1, 8)])
@pytest.mark.parametrize("capacity", [None, 1, 4])
def test_balanced_rows_on_the_host_equal_the_device_counts(tokens, top_k, experts, capacity):
    """What the expert-parallel dispatcher takes as split sizes under forced balance, without
    reading the device, is what the routing computes there (after any capacity drop)."""
    experts_TK = balanced_experts(tokens, top_k, experts, torch.device("cpu"))
    counts_E = count_per_expert(experts_TK, experts)
    if capacity is not None:
        keep_TK = capacity_keep(experts_TK, torch.rand(tokens, top_k), counts_E, capacity)
        counts_E = count_per_expert(experts_TK[keep_TK], experts)
    assert balanced_rows_per_expert(tokens, top_k, experts, capacity) == counts_E.tolist()


def test_forced_balance_layer_gives_every_expert_tk_over_e_rows():
    layer = make_layer(moe_force_balance=True)
    torch.manual_seed(3)
    x = torch.randn(2, 9, D)  # T = 18, K = 2, E = 6: 6 rows each
    _, aux = layer(x)
    assert aux.tokens_per_expert_E.tolist() == [18 * K // E] * E
    # Weights: the router's softmax at the forced experts (torchtitan), checked by hand.
    probs_TE = (x.reshape(-1, D) @ layer.router.weight.T).softmax(-1)
    t = torch.arange(18).unsqueeze(-1)
    expected = probs_TE[t, (t * K + torch.arange(K)) % E]
    torch.testing.assert_close(aux.route.weights_TK, expected)
    assert aux.route.experts_TK.tolist() == ((t * K + torch.arange(K)) % E).tolist()


def test_forced_balance_gradient_still_reaches_the_router():
    layer = make_layer(moe_force_balance=True)
    y, aux = layer(torch.randn(10, D))
    (y.sum() + aux.lb_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_imposed_choice_is_used_as_given():
    """A RouteChoice replaces the top-k and its weights: the layer equals the per-token
    reference computed with those experts and weights."""
    layer = make_layer().double()
    torch.manual_seed(5)
    x_TD = torch.randn(11, D, dtype=torch.float64)
    experts_TK = torch.randint(0, E, (11, 1)).repeat(1, K)
    experts_TK[:, 1] = (experts_TK[:, 0] + 1 + torch.randint(0, E - 1, (11,))) % E
    weights_TK = torch.rand(11, K, dtype=torch.float64)
    y, aux = layer(x_TD, RouteChoice(experts_TK.to(torch.uint8), weights_TK))
    expected = torch.stack([
        sum(w * layer.act(x_TD[t : t + 1] @ layer.w_in_EDH[e]) @ layer.w_out_EHD[e]
            for w, e in zip(weights_TK[t], experts_TK[t].tolist()))[0]
        for t in range(11)
    ])  # fmt: skip
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(aux.route.experts_TK, experts_TK)
    assert torch.equal(aux.tokens_per_expert_E, count_per_expert(experts_TK, E))


def test_own_route_replayed_gives_the_same_output():
    layer = make_layer(renormalize=True, moe_route_scale=2.5).double()
    x_TD = torch.randn(13, D, dtype=torch.float64)
    y, aux = layer(x_TD)
    y_replayed, _ = layer(x_TD, aux.route)
    assert torch.equal(y, y_replayed)
    y_ref, _, _ = reference_moe(layer, x_TD, renormalize=True)
    torch.testing.assert_close(y, 2.5 * y_ref.double(), rtol=1e-5, atol=1e-6)


def test_forced_balance_is_off_by_default():
    assert layer_config().moe_layer_config().force_balance is False
