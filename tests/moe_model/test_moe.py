"""MoE layer: experts vs a per-token reference, routing, auxiliary losses."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_model.config import ModelConfig
from moe_model.dispatch import combine
from moe_model.moe import MoELayer
from moe_model.moe_losses import load_balancing_loss, router_z_loss

pytestmark = pytest.mark.numerics

D, H, E, K = 16, 8, 6, 2


def layer_config(activation="polynorm", impl="loop", renormalize=False, **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        embedding_size=64,
        d_model=D,
        n_layers=1,
        n_heads=2,
        mlp_hidden_size=H,
        moe_num_experts=E,
        moe_top_k=K,
        activation_type=activation,
        moe_expert_impl=impl,
        moe_renormalize=renormalize,
        **kw,
    )


def make_layer(activation="polynorm", impl="loop", renormalize=False, seed=0, **kw):
    torch.manual_seed(seed)
    config = layer_config(activation, impl, renormalize, **kw)
    layer = MoELayer(config.moe_layer_config())
    if hasattr(layer.act, "weight"):  # non-default coefficients, so their gradients are real
        with torch.no_grad():
            layer.act.weight.copy_(torch.tensor([0.7, -0.4, 1.3, 0.2][: layer.act.order]))
            layer.act.bias.fill_(0.1)
    return layer


def skewed_inputs(layer, num_tokens=40, seed=1):
    """Inputs whose routing is uneven and leaves experts 4 and 5 empty.

    Feature 0 is a constant 1; the router reads it with a large negative weight for experts 4
    and 5 (never chosen) and a positive one for expert 0 (chosen by most tokens).
    """
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, D)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0, -30.0, -30.0])
    return x


def reference_moe(layer, x_TD, renormalize=False):
    """Token by token, expert by expert: y_t = sum_k p_tk * act(x_t W_in[e]) W_out[e]."""
    logits_TE = x_TD @ layer.router.weight.T
    probs_TE = logits_TE.float().softmax(-1)
    y = []
    for t in range(x_TD.shape[0]):
        top_p, top_e = probs_TE[t].topk(K)
        if renormalize:
            top_p = top_p / top_p.sum()
        y_t = torch.zeros(D)
        for p, e in zip(top_p, top_e.tolist()):
            h = layer.act(x_TD[t : t + 1] @ layer.w_in_EDH[e])
            y_t = y_t + p * (h @ layer.w_out_EHD[e])[0]
        y.append(y_t)
    return torch.stack(y), logits_TE, probs_TE


def grads(layer, x, loss):
    params = dict(layer.named_parameters())
    g = torch.autograd.grad(loss, [x, *params.values()], allow_unused=True)
    return dict(zip(["x", *params], g))


@pytest.mark.parametrize("activation", ["polynorm", "polyrelu", "swiglu", "gelu", "relu2", "polynorm_glu", "polyrelu_glu"])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_experts_match_reference(activation, impl, renormalize):
    layer = make_layer(activation, impl, renormalize)
    x = skewed_inputs(layer).requires_grad_(True)
    y, aux = layer(x)

    counts = aux.tokens_per_expert_E
    assert counts.dtype == torch.long and not counts.requires_grad
    assert counts.sum() == x.shape[0] * K
    assert counts[4] == 0 and counts[5] == 0, counts  # empty experts
    assert counts[0] > counts[1:4].max(), counts  # uneven load

    y_ref, _, _ = reference_moe(layer, x, renormalize)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)

    cotangent = torch.randn_like(y)
    g = grads(layer, x, (y * cotangent).sum())
    g_ref = grads(layer, x, (y_ref * cotangent).sum())
    assert set(g) >= {"x", "router.weight", "w_in_EDH", "w_out_EHD"}
    if activation.startswith("poly"):
        assert {"act.weight", "act.bias"} <= set(g)
    for name in g:
        assert g[name] is not None and g_ref[name] is not None, name
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Empty experts get zero gradient, and all of the router still gets one.
    assert g["w_in_EDH"][4:].abs().max() == 0
    assert g["router.weight"].abs().sum() > 0


def test_grouped_and_loop_agree_3d_input():
    x = torch.randn(2, 7, D)
    y_loop, aux_loop = make_layer("swiglu", "loop")(x)
    y_grouped, aux_grouped = make_layer("swiglu", "grouped_mm")(x)  # the same seed, weights
    assert y_loop.shape == x.shape
    torch.testing.assert_close(y_loop, y_grouped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_loop.tokens_per_expert_E, aux_grouped.tokens_per_expert_E)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_single_token_and_bf16(impl):
    layer = make_layer("polynorm", impl)
    x1 = torch.randn(1, D)
    y, aux = layer(x1)
    assert (aux.tokens_per_expert_E > 0).sum() == K
    torch.testing.assert_close(y, reference_moe(layer, x1)[0], rtol=1e-5, atol=1e-6)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(3, 5, D, dtype=torch.bfloat16)
    y, aux = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert aux.lb_loss.dtype == torch.float32
    # The same bf16 weights and inputs in fp32, token by token: equal to bf16 rounding.
    y_ref, _, _ = reference_moe(copy.deepcopy(layer).float(), x.float().reshape(-1, D))
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.float().reshape(-1, D), y_ref, rtol=0, atol=0.01 * scale)


def exact_combine_inputs(num_tokens=64, top_k=4, d=32, seed=0):
    """bf16 expert rows (sorted by a random permutation) and fp32 weights whose fp32 products and
    sums are exact: rows are multiples of 1/8 below 16, weights multiples of 1/64, so every sum
    fits in 16 bits and its only rounding is the cast to bf16."""
    gen = torch.Generator().manual_seed(seed)
    y_TKD = torch.randint(-127, 128, (num_tokens, top_k, d), generator=gen) / 8
    weights_TK = torch.randint(1, 64, (num_tokens, top_k), generator=gen) / 64
    order_R = torch.randperm(num_tokens * top_k, generator=gen)
    y_RD = y_TKD.reshape(-1, d)[order_R].to(torch.bfloat16)
    exact_TD = (y_TKD.double() * weights_TK.double().unsqueeze(-1)).sum(1)
    return y_RD, weights_TK.float(), order_R, exact_TD


def test_combine_rounds_once_in_bf16():
    y_RD, weights_TK, order_R, exact_TD = exact_combine_inputs()
    y_TD = combine(y_RD, weights_TK, order_R.argsort())
    assert y_TD.dtype == torch.bfloat16
    assert torch.equal(y_TD, exact_TD.to(torch.bfloat16))
    # The bf16 index_add_ this replaced rounds each product and partial sum: it misses the
    # once-rounded sum on these inputs.
    top_k = weights_TK.shape[1]
    old_RD = y_RD * weights_TK.reshape(-1)[order_R].unsqueeze(-1).to(torch.bfloat16)
    old_TD = torch.zeros_like(y_TD).index_add_(0, order_R // top_k, old_RD)
    assert not torch.equal(old_TD, exact_TD.to(torch.bfloat16))


def test_combine_gradients():
    y_RD, weights_TK, order_R, _ = exact_combine_inputs(num_tokens=8, top_k=3, d=16)
    y_RD.requires_grad_(True)
    weights_TK.requires_grad_(True)
    g_TD = torch.randn(8, 16).to(torch.bfloat16)
    combine(y_RD, weights_TK, order_R.argsort()).backward(g_TD)
    token_R, k_R = order_R // 3, order_R % 3
    w_R = weights_TK.detach()[token_R, k_R].double()
    want_y = (g_TD.double()[token_R] * w_R.unsqueeze(-1)).to(torch.bfloat16)
    assert y_RD.grad.dtype == torch.bfloat16 and torch.equal(y_RD.grad, want_y)
    want_w = torch.zeros(8, 3, dtype=torch.float64)
    want_w[token_R, k_R] = (g_TD.double()[token_R] * y_RD.detach().double()).sum(-1)
    assert weights_TK.grad.dtype == torch.float32
    torch.testing.assert_close(weights_TK.grad.double(), want_w, rtol=1e-6, atol=1e-6)


def grouped_vs_loop_bf16(device, *, d, h, e, k, tokens, activation):
    """grouped_mm and the per-expert loop, both bf16 with the same weights (hence the same
    routing): output, input gradient and every parameter gradient agree to bf16 rounding."""
    config = ModelConfig(
        vocab_size=64, embedding_size=64, d_model=d, n_layers=1, n_heads=2, mlp_hidden_size=h,
        moe_num_experts=e, moe_top_k=k, activation_type=activation,
    )  # fmt: skip
    layer = MoELayer(config.moe_layer_config(), init_device="meta").to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in (layer.router.weight, layer.w_in_EDH, layer.w_out_EHD):
            p.normal_(0.0, 0.02, generator=gen)
        if hasattr(layer.act, "weight"):
            layer.act.weight.copy_(torch.tensor([0.7, -0.4, 1.3, 0.2][: layer.act.order]))
            layer.act.bias.fill_(0.1)
    weights = layer.to(torch.bfloat16).state_dict()
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16, generator=gen)
    g = torch.randn(tokens, d, device=device, dtype=torch.bfloat16, generator=gen)
    got = {}
    built = layer.config
    for impl in ("grouped_mm", "loop"):
        config = dataclasses.replace(built, expert_impl=impl)
        layer = MoELayer(config, init_device="meta").to_empty(device=device).to(torch.bfloat16)
        layer.load_state_dict(weights)
        x_in = x.clone().requires_grad_(True)
        y, aux = layer(x_in)
        y.backward(g)
        got[impl] = {"y": y.detach(), "x.grad": x_in.grad}
        got[impl].update({n: p.grad for n, p in layer.named_parameters()})
        layer.zero_grad(set_to_none=True)
    assert (aux.tokens_per_expert_E > 0).all(), "an expert without rows tests less"
    for name, want in got["loop"].items():
        have = got["grouped_mm"][name]
        assert have.dtype == want.dtype and torch.isfinite(have).all(), name
        err = (have.float() - want.float()).abs().max() / want.float().abs().max()
        assert err < 2e-2, f"{name}: max|grouped_mm - loop| / max|loop| = {err:.3g}"


@pytest.mark.parametrize("activation,h", [("polynorm", 24), ("swiglu", 16)])
def test_grouped_mm_matches_loop_bf16(activation, h):
    grouped_vs_loop_bf16("cpu", d=32, h=h, e=4, k=2, tokens=64, activation=activation)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation,h", [("polynorm", 1536), ("swiglu", 1024)])
def test_grouped_mm_matches_loop_bf16_gpu(activation, h):
    """OLMoE-1B-7B's MoE layer (d 2048, 64 experts, top-8), 4096 tokens: CUTLASS grouped GEMM
    against one cuBLAS matmul per expert, with the Triton PolyNorm in both."""
    grouped_vs_loop_bf16("cuda", d=2048, h=h, e=64, k=8, tokens=4096, activation=activation)


def test_auto_impl_falls_back_to_loop_when_unaligned():
    config = ModelConfig(d_model=12, n_heads=2, mlp_hidden_size=6, moe_num_experts=4, moe_top_k=2)
    layer = MoELayer(config.moe_layer_config())
    x = torch.randn(5, 12)
    assert layer._impl(x) == "loop"
    y, _ = layer(x)
    assert y.shape == x.shape
    assert make_layer("relu", "auto")._impl(torch.randn(5, D)) == "grouped_mm"
    assert make_layer("relu", "auto")._impl(torch.randn(5, D, dtype=torch.bfloat16)) == "grouped_mm"


def test_no_router_state_kept_on_module():
    layer = make_layer()
    layer(torch.randn(10, D))
    leftovers = [k for k, v in vars(layer).items() if isinstance(v, torch.Tensor)]
    assert leftovers == []


# ---- auxiliary losses ---------------------------------------------------------------------------


def cyclic_balanced_layer(lb_weight=0.01):
    """E tokens (one-hot inputs); token t prefers experts t..t+K-1 (mod E): every expert gets
    exactly K rows, and by symmetry every expert's mean probability is 1/E."""
    layer = make_layer("relu", "loop", moe_loss_weight=lb_weight)
    logits_TE = torch.zeros(E, E)
    for t in range(E):
        for j in range(K):
            logits_TE[t, (t + j) % E] = 4.0 - j  # distinct, so top-k has no ties
    x_TD = torch.zeros(E, D)
    x_TD[:, :E] = torch.eye(E)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = logits_TE.T
    return layer, x_TD


def test_lb_loss_equals_weight_at_perfect_balance():
    layer, x = cyclic_balanced_layer(lb_weight=0.01)
    _, aux = layer(x)
    assert aux.tokens_per_expert_E.tolist() == [K] * E
    torch.testing.assert_close(aux.lb_loss, torch.tensor(0.01))
    # Uniform probabilities give exactly the weight whatever the counts.
    probs = torch.full((10, E), 1.0 / E)
    counts = torch.tensor([20, 0, 0, 0, 0, 0])
    torch.testing.assert_close(load_balancing_loss(probs, counts, K, 0.5), torch.tensor(0.5))


def test_lb_loss_grows_when_routing_collapses():
    layer, x = cyclic_balanced_layer(lb_weight=0.01)
    with torch.no_grad():
        layer.router.weight[0, :] = 8.0  # expert 0 and 1 win for every token
        layer.router.weight[1, :] = 6.0
    x = torch.ones(E, D)
    _, aux = layer(x)
    assert aux.tokens_per_expert_E.tolist() == [E, E, 0, 0, 0, 0]
    # Every token: logits 8 D and 6 D for experts 0 and 1; 4 + 3 for the others (each is
    # some feature's first choice and another's second in the cyclic router).
    probs = torch.tensor([8.0 * D, 6.0 * D] + [7.0] * (E - 2), dtype=torch.float64).softmax(-1)
    # w E / (T K) * sum_e count_e * mean_prob_e, with T = E tokens: near the collapse value w E / K.
    expected = 0.01 * E / (E * K) * (E * probs[0] + E * probs[1])
    torch.testing.assert_close(aux.lb_loss.double(), expected, rtol=1e-6, atol=0)
    assert expected > 2.9 * 0.01


def test_lb_formula_direct():
    torch.manual_seed(0)
    probs = torch.randn(12, E).softmax(-1)
    counts = torch.randint(0, 5, (E,))
    expected = 0.01 * E / (12 * K) * sum(counts[e] * probs[:, e].mean() for e in range(E))
    torch.testing.assert_close(load_balancing_loss(probs, counts, K, 0.01), expected)


def test_z_loss_equals_direct_computation():
    layer = make_layer(moe_zloss_weight=0.001)
    x = torch.randn(20, D)
    _, aux = layer(x)
    logits = (x.double() @ layer.router.weight.double().T).detach()
    lse = torch.log(torch.exp(logits).sum(-1))
    expected = 0.001 * (lse**2).sum() / (20 * K)
    torch.testing.assert_close(aux.z_loss.double(), expected, rtol=1e-5, atol=1e-9)


def test_z_loss_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [3e4, 3e4, 0.0]])
    z = router_z_loss(logits, top_k=1, weight=1.0)
    expected = (1e4**2 + (3e4 + torch.log(torch.tensor(2.0)).item()) ** 2) / 2
    assert torch.isfinite(z)
    torch.testing.assert_close(z.double(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("loss_name", ["lb_loss", "z_loss"])
def test_aux_losses_reach_router(loss_name):
    """The router weight's gradient from each auxiliary loss equals that of the formula
    written out here (float64; the counts carry no gradient)."""
    layer = make_layer(moe_loss_weight=0.01, moe_zloss_weight=0.001)
    x = skewed_inputs(layer)
    _, aux = layer(x)
    loss = getattr(aux, loss_name)
    assert aux[loss_name] is loss
    loss.backward()
    w = layer.router.weight.detach().double().requires_grad_(True)
    logits = x.double() @ w.T
    probs = logits.softmax(-1)
    T = x.shape[0]
    if loss_name == "lb_loss":
        counts = torch.bincount(probs.topk(K).indices.flatten(), minlength=E)
        direct = 0.01 * E / (T * K) * (counts * probs.mean(0)).sum()
    else:
        direct = 0.001 * (logits.logsumexp(-1) ** 2).sum() / (T * K)
    (expected,) = torch.autograd.grad(direct, w)
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(layer.router.weight.grad.double(), expected, rtol=1e-4, atol=1e-9)


def test_weights_not_renormalised_by_default():
    """OLMoE: the output is sum_k softmax_k * expert_k, weights summing to < 1."""
    layer = make_layer("relu", "loop")
    x = torch.randn(5, D)
    y, _ = layer(x)
    y_renorm, _ = make_layer("relu", "loop", renormalize=True)(x)
    assert not torch.allclose(y, y_renorm)
    probs = F.softmax(x @ layer.router.weight.T, -1)
    assert (probs.topk(K).values.sum(-1) < 1).all()


# ---- one coefficient set per expert ------------------------------------------------------------


def make_per_expert_layer(activation, impl, backend="eager"):
    layer = make_layer(activation, impl, moe_activation_per_expert=True, activation_backend=backend)
    assert isinstance(layer.act, torch.nn.ModuleList) and len(layer.act) == E
    with torch.no_grad():  # a different set in every expert
        for e, act in enumerate(layer.act):
            act.weight.copy_(torch.tensor([0.7, -0.4, 1.3]) * (1 + 0.3 * e))
            act.bias.fill_(0.1 - 0.05 * e)
    return layer


def reference_moe_per_expert(layer, x_TD):
    probs_TE = (x_TD @ layer.router.weight.T).float().softmax(-1)
    y = []
    for t in range(x_TD.shape[0]):
        top_p, top_e = probs_TE[t].topk(K)
        y_t = torch.zeros(D)
        for p, e in zip(top_p, top_e.tolist()):
            h = layer.act[e](x_TD[t : t + 1] @ layer.w_in_EDH[e])
            y_t = y_t + p * (h @ layer.w_out_EHD[e])[0]
        y.append(y_t)
    return torch.stack(y)


@pytest.mark.parametrize("activation", ["polynorm", "polyrelu", "polynorm_glu", "polyrelu_glu"])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_per_expert_coefficients_match_reference(activation, impl, backend):
    layer = make_per_expert_layer(activation, impl, backend)
    x = skewed_inputs(layer).requires_grad_(True)
    y, aux = layer(x)
    assert aux.tokens_per_expert_E[4] == 0 and aux.tokens_per_expert_E[5] == 0
    y_ref = reference_moe_per_expert(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)

    cotangent = torch.randn_like(y)
    g = grads(layer, x, (y * cotangent).sum())
    g_ref = grads(layer, x, (y_ref * cotangent).sum())
    for e in range(4):  # used experts: their own set gets the reference gradient
        for p in ("weight", "bias"):
            name = f"act.{e}.{p}"
            assert g[name].abs().sum() > 0, name
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Empty experts: a zero gradient, not None (every FSDP rank must reduce the same grads).
    for e in (4, 5):
        assert g[f"act.{e}.weight"] is not None and g[f"act.{e}.weight"].abs().max() == 0
    torch.testing.assert_close(g["x"], g_ref["x"], rtol=1e-4, atol=1e-6)


def test_per_expert_sets_all_equal_is_the_shared_layer():
    shared = make_layer("polynorm", "grouped_mm")
    per_expert = make_layer("polynorm", "grouped_mm", moe_activation_per_expert=True)
    per_expert.load_state_dict(
        {k: v for k, v in shared.state_dict().items() if not k.startswith("act.")}, strict=False
    )
    with torch.no_grad():
        for act in per_expert.act:
            act.weight.copy_(shared.act.weight)
            act.bias.copy_(shared.act.bias)
    x = skewed_inputs(shared)
    skewed_inputs(per_expert)  # the same router edit
    torch.testing.assert_close(per_expert(x)[0], shared(x)[0], rtol=1e-6, atol=1e-7)


def test_per_expert_option_is_ignored_without_coefficients():
    layer = make_layer("swiglu", "loop", moe_activation_per_expert=True)
    assert not isinstance(layer.act, torch.nn.ModuleList)
    config = layer_config("swiglu", "loop", moe_activation_per_expert=True)
    assert config.num_params() == config.replace(moe_activation_per_expert=False).num_params()


@pytest.mark.parametrize("per_expert", [False, True])
def test_parameter_counts_with_per_expert_sets(per_expert):
    config = layer_config("polynorm", moe_activation_per_expert=per_expert)
    model = config.build("meta")
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    sets = E if per_expert else 1
    assert sum(p.numel() for n, p in model.named_parameters() if ".act." in n) == sets * 4
    # Active: the top-k experts' sets when per expert.
    shared_active = config.replace(moe_activation_per_expert=False).num_active_params()
    assert config.num_active_params() - shared_active == (4 * (K - 1) if per_expert else 0)
