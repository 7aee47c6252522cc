"""Activations against independent float64 references written here (not the package's math)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from moe_model.activations import (
    ACTIVATIONS,
    GELU,
    PolyNorm,
    PolyNormGLU,
    PolyReLU,
    PolyReLUGLU,
    ReLU,
    ReLU2,
    SwiGLU,
    build_activation,
    poly_norm_eager,
    poly_relu_eager,
)

pytestmark = pytest.mark.numerics

SHAPES = [(7,), (3, 16), (2, 5, 24)]


# ---- references (float64, written from the paper's formulas) -----------------------------------


def ref_poly_norm(x, weight, bias, eps=1e-6):
    """sum_{p=1..r} weight[r-p] * x^p / sqrt(mean_row(x^(2p)) + eps) + bias."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    r = weight.numel()
    out = torch.zeros_like(x) + bias
    for p in range(1, r + 1):
        u = x**p
        out = out + weight[r - p] * u / torch.sqrt((u * u).mean(-1, keepdim=True) + eps)
    return out


def ref_poly_relu(x, weight, bias):
    x, weight, bias = x.double(), weight.double(), bias.double()
    r = weight.numel()
    pos = torch.where(x > 0, x, torch.zeros_like(x))
    return sum(weight[r - p] * pos**p for p in range(1, r + 1)) + bias


def random_poly(cls, order, **kwargs):
    torch.manual_seed(order)
    module = cls(order=order, **kwargs)
    with torch.no_grad():
        module.weight.copy_(torch.randn(order))
        module.bias.copy_(torch.randn(1))
    return module


# ---- PolyNorm / PolyReLU ------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_poly_norm_matches_reference(order, shape):
    module = random_poly(PolyNorm, order, eps=1e-6)
    x = torch.randn(shape)
    y = module(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    expected = ref_poly_norm(x, module.weight.detach(), module.bias.detach(), 1e-6)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        poly_norm_eager(x, module.weight, module.bias, 1e-6).double(),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_poly_relu_matches_reference(order, shape):
    module = random_poly(PolyReLU, order)
    x = torch.randn(shape) * 2
    y = module(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    expected = ref_poly_relu(x, module.weight.detach(), module.bias.detach())
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        poly_relu_eager(x, module.weight, module.bias).double(), expected, rtol=1e-5, atol=1e-5
    )


def test_weight_zero_multiplies_highest_power():
    """weight[0] multiplies x^order (released code / Liger-Kernel), not x^1 (review snippet)."""
    x = torch.randn(4, 8).double()
    bias = torch.zeros(1, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    cube = x**3
    torch.testing.assert_close(poly_relu_eager(x, w, bias), F.relu(x) ** 3)
    torch.testing.assert_close(
        poly_norm_eager(x, w, bias, 1e-6),
        cube / torch.sqrt(cube.pow(2).mean(-1, keepdim=True) + 1e-6),
    )


def test_poly_defaults_and_reset():
    for cls in (PolyNorm, PolyReLU):
        module = cls(order=3)
        torch.testing.assert_close(module.weight.detach(), torch.full((3,), 1 / 3))
        torch.testing.assert_close(module.bias.detach(), torch.zeros(1))
        assert [n for n, _ in module.named_parameters()] == ["weight", "bias"]
        with torch.no_grad():
            module.weight.fill_(5.0)
            module.bias.fill_(2.0)
        module.reset_parameters()
        torch.testing.assert_close(module.weight.detach(), torch.full((3,), 1 / 3))
        torch.testing.assert_close(module.bias.detach(), torch.zeros(1))
    assert PolyNorm().eps == 1e-6


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("cls", [PolyNorm, PolyReLU])
def test_poly_gradcheck(cls, order):
    """Gradients w.r.t. input, weight and bias through the module's forward, in float64."""
    module = random_poly(cls, order).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    if cls is PolyReLU:
        x = x + 0.05 * torch.sign(x)  # keep away from the kink at 0
    w = module.weight.detach().clone().requires_grad_(True)
    b = module.bias.detach().clone().requires_grad_(True)
    x.requires_grad_(True)

    def f(x, w, b):
        return functional_call(module, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cls", [PolyNorm, PolyReLU])
def test_poly_bf16_large_inputs(cls):
    """bf16 in, |x| up to 1e3: finite and close to the fp32 result (powers run in fp32)."""
    module = random_poly(cls, 3)
    torch.manual_seed(0)
    x_bf16 = ((torch.rand(4, 64) * 2 - 1) * 1e3).to(torch.bfloat16)
    x_bf16[0, 0] = 1e3
    y_bf16 = module(x_bf16)
    assert y_bf16.dtype == torch.bfloat16
    assert torch.isfinite(y_bf16).all()
    y_fp32 = module(x_bf16.float())
    scale = y_fp32.abs().max()
    torch.testing.assert_close(y_bf16.float(), y_fp32, rtol=1e-2, atol=1e-2 * scale.item())
    # The fp32 path itself agrees with the float64 reference at this scale.
    ref = ref_poly_norm if cls is PolyNorm else ref_poly_relu
    expected = ref(x_bf16.double(), module.weight.detach(), module.bias.detach())
    torch.testing.assert_close(y_fp32.double(), expected, rtol=1e-4, atol=1e-4 * scale.item())


def test_poly_norm_is_per_row():
    """Each row is normalised on its own (the README snippet's torch.norm mixes rows)."""
    module = random_poly(PolyNorm, 3)
    x = torch.randn(2, 16)
    y = module(x)
    x2 = x.clone()
    x2[1] *= 100.0
    torch.testing.assert_close(module(x2)[0], y[0])


# ---- the other activations ----------------------------------------------------------------------


def test_simple_activations_match_formulas():
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(ReLU()(x), torch.where(x > 0, x, 0.0))
    gelu_ref = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(GELU()(x), gelu_ref)
    tanh_ref = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(GELU(approximate="tanh")(x), tanh_ref)
    torch.testing.assert_close(ReLU2()(x), torch.where(x > 0, x * x, 0.0))


def test_swiglu_gate_is_first_half():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    a, b = x[..., :4], x[..., 4:]
    y = SwiGLU()(x)
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y, a / (1 + torch.exp(-a)) * b)


def test_gated_flags():
    gated = {name for name, cls in ACTIVATIONS.items() if cls.gated}
    assert gated == {"swiglu", "polynorm_glu", "polyrelu_glu"}
    assert set(ACTIVATIONS) == {
        "relu", "gelu", "relu2", "swiglu", "polyrelu", "polynorm", "polyrelu_glu", "polynorm_glu"
    }


@pytest.mark.parametrize("cls, ref", [(PolyNormGLU, ref_poly_norm), (PolyReLUGLU, ref_poly_relu)])
def test_gated_poly_is_act_of_first_half_times_second(cls, ref):
    """Motif's form: act(gate) * up on [gate | up], gate from w1 (first half), up from w3."""
    module = random_poly(cls, 3)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    y = module(x)
    assert y.shape == (2, 3, 8)
    expected = ref(x[..., :8], module.weight.detach(), module.bias.detach()) * x[..., 8:]
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("name", ["polynorm_glu", "polyrelu_glu"])
def test_gated_poly_init_and_options(name):
    """Motif's (and the paper's) init: weight 1/order each, bias 0; one set per module."""
    module = build_activation(name, order=3, backend="eager")
    assert module.gated
    assert torch.equal(module.weight.detach(), torch.full((3,), 1 / 3))
    assert torch.equal(module.bias.detach(), torch.zeros(1))
    assert set(ACTIVATIONS[name].options) >= {"order", "backend"}


def test_build_activation():
    assert isinstance(build_activation("polynorm", order=2, eps=1e-5), PolyNorm)
    assert build_activation("polynorm", order=2).weight.shape == (2,)
    assert isinstance(build_activation("relu2"), ReLU2)
    with pytest.raises(ValueError) as err:
        build_activation("swish")
    for name in ACTIVATIONS:
        assert name in str(err.value)
    assert "swish" in str(err.value)
    with pytest.raises(ValueError, match="does not take"):
        build_activation("relu", order=3)
