"""The chunked combine (dispatch.combine): values and gradients against float64 and against the
one-shot (T, K, D) form it replaced, chunk boundaries, the memory it does not allocate, and a
graph-break-free trace.

Tolerances are a-priori rounding bounds, not one CPU's noise: a K-term fp32 sum of exact
products is within (K + 1) * eps32 * sum_k |w_k y_k| of the exact value; a result rounded once to
bf16 adds half a bf16 ulp (2**-8 relative).
"""

from __future__ import annotations

import pytest
import torch

from moe_model import dispatch
from moe_model.dispatch import combine
from tests.moe_model.test_moe import D, K, make_layer, skewed_inputs

EPS32 = torch.finfo(torch.float32).eps
U_BF16 = 2.0**-8  # unit roundoff of bf16's 8-bit significand


def one_shot_combine(y_RD, weights_TK, inverse_R):
    """The form this replaced: one gathered (T, K, D) copy and (T, K, D) fp32 products."""
    num_tokens, top_k = weights_TK.shape
    y_TKD = y_RD.index_select(0, inverse_R).view(num_tokens, top_k, y_RD.shape[-1])
    return (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1).to(y_RD.dtype)


def inputs(num_tokens=10, top_k=3, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y_RD = torch.randn(num_tokens * top_k, d, generator=gen).to(dtype)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen)
    inverse_R = torch.randperm(num_tokens * top_k, generator=gen)
    g_TD = torch.randn(num_tokens, d, generator=gen).to(dtype)
    return y_RD, weights_TK, inverse_R, g_TD


def run(fn, y_RD, weights_TK, inverse_R, g_TD, **kw):
    """Output, grad of y_RD, grad of the weights."""
    y = y_RD.clone().requires_grad_(True)
    w = weights_TK.clone().requires_grad_(True)
    out = fn(y, w, inverse_R, **kw)
    out.backward(g_TD)
    return out.detach(), y.grad, w.grad


def exact(y_RD, weights_TK, inverse_R, g_TD):
    """float64 output, grads, and the sums of |terms| that bound their fp32 rounding."""
    num_tokens, top_k = weights_TK.shape
    y_TKD = y_RD.double()[inverse_R].view(num_tokens, top_k, -1)
    terms_TKD = y_TKD * weights_TK.double().unsqueeze(-1)
    g_T1D = g_TD.double().unsqueeze(1)
    grad_y_RD = torch.empty_like(y_RD, dtype=torch.float64)
    grad_y_RD[inverse_R] = (g_T1D * weights_TK.double().unsqueeze(-1)).reshape(-1, y_RD.shape[1])
    grad_terms_TKD = g_T1D * y_TKD
    return {
        "out": (terms_TKD.sum(1), terms_TKD.abs().sum(1) * (top_k + 1) * EPS32),
        "grad_y": (grad_y_RD, grad_y_RD.abs() * EPS32),
        "grad_w": (
            grad_terms_TKD.sum(-1),
            grad_terms_TKD.abs().sum(-1) * (y_RD.shape[1] + 1) * EPS32,
        ),
    }


def assert_within(name, got, want, bound, rounded_to_bf16):
    if rounded_to_bf16:
        bound = bound + U_BF16 * want.abs()
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"{name}: error {err.max():.3g} past its rounding bound"


@pytest.mark.parametrize("chunk_tokens", [None, 1, 3, 4, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_within_rounding_of_float64_and_of_the_one_shot_form(dtype, chunk_tokens):
    """Chunks of 1, 3 (a ragged last chunk of 1), 4, the default and more than T tokens."""
    args = inputs(dtype=dtype)
    ref = exact(*args)
    new = dict(zip(ref, run(combine, *args, chunk_tokens=chunk_tokens), strict=True))
    old = dict(zip(ref, run(one_shot_combine, *args), strict=True))
    for name, (want, bound) in ref.items():
        to_bf16 = dtype == torch.bfloat16 and name != "grad_w"
        assert new[name].dtype == old[name].dtype == (dtype if name != "grad_w" else torch.float32)
        assert_within(f"chunked {name}", new[name], want, bound, to_bf16)
        assert_within(f"one-shot {name}", old[name], want, bound, to_bf16)
        # The same fp32 operations in the same order per chunk: the same values.
        assert torch.equal(new[name], old[name]), name


def test_combine_zero_row_chosen_repeatedly():
    """A row read by several choices (dropped choices reading one appended zero row, as an
    earlier capacity path laid them out): kept rows get their gradient, the shared row the sum
    of its readers'."""
    y_RD, weights_TK, _, g_TD = inputs(num_tokens=6, top_k=2, d=8)
    keep_R = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    kept = int(keep_R.sum())
    y_zero_RD = torch.cat([y_RD[:kept], y_RD.new_zeros(1, 8)])
    inverse_R = torch.where(keep_R, keep_R.cumsum(0) - 1, kept)
    for name, new, old in zip(
        ("out", "grad_y", "grad_w"),
        run(combine, y_zero_RD, weights_TK, inverse_R, g_TD, chunk_tokens=4),
        run(one_shot_combine, y_zero_RD, weights_TK, inverse_R, g_TD),
        strict=True,
    ):
        torch.testing.assert_close(new, old, rtol=2 * EPS32, atol=0, msg=name)


def test_combine_without_weight_gradient():
    y_RD, weights_TK, inverse_R, g_TD = inputs()
    y = y_RD.clone().requires_grad_(True)
    combine(y, weights_TK, inverse_R, chunk_tokens=4).backward(g_TD)
    assert torch.equal(y.grad, run(one_shot_combine, y_RD, weights_TK, inverse_R, g_TD)[1])


class LargestFloatTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements of any fp32 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


def test_combine_forms_no_T_K_D_fp32_tensor():
    """Forward and backward in bf16: the largest fp32 tensor is one chunk's products, where the
    one-shot form made T x K x D of them."""
    num_tokens, top_k, d, chunk = 32, 4, 16, 8
    args = inputs(num_tokens, top_k, d, dtype=torch.bfloat16)
    with LargestFloatTensor() as chunked:
        run(combine, *args, chunk_tokens=chunk)
    with LargestFloatTensor() as one_shot:
        run(one_shot_combine, *args)
    assert chunked.numel == chunk * top_k * d
    assert one_shot.numel == num_tokens * top_k * d


def test_combine_traces_without_graph_breaks():
    y_RD, weights_TK, inverse_R, g_TD = inputs(dtype=torch.bfloat16)
    y = y_RD.clone().requires_grad_(True)

    def step(y, w):
        out = combine(y, w, inverse_R, chunk_tokens=4)
        return (out.float() * g_TD).sum()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(y, weights_TK.clone().requires_grad_(True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # AOT autograd traces the backward too; the compiled step gives eager's gradients.
    grads = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, backend="aot_eager"))):
        w = weights_TK.clone().requires_grad_(True)
        y.grad = None
        fn(y, w).backward()
        grads[name] = (y.grad, w.grad)
    for eager, compiled in zip(grads["eager"], grads["compiled"], strict=True):
        assert torch.equal(eager, compiled)


@pytest.mark.parametrize("variant", [{}, {"moe_capacity_factor": 0.5}])
def test_layer_in_chunks_equals_layer_in_one_chunk(monkeypatch, variant):
    """The MoE layer (dropless and with capacity drops), its combines cut into chunks of 3 tokens
    by a small byte budget: output and every gradient equal the one-chunk layer's."""
    layer = make_layer("swiglu", "grouped_mm", **variant).train()
    x = skewed_inputs(layer, num_tokens=20)
    got = {}
    for budget in (dispatch.COMBINE_CHUNK_BYTES, 3 * 4 * K * D):
        monkeypatch.setattr(dispatch, "COMBINE_CHUNK_BYTES", budget)
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        y, aux = layer(x_in)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        got[budget] = [y.detach(), x_in.grad] + [p.grad for p in layer.parameters()]
    for one_chunk, chunks in zip(*got.values(), strict=True):
        assert torch.equal(one_chunk, chunks)
