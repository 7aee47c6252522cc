"""Gated PolyNorm / PolyReLU kernels (``act(gate) * up``) against an independent float64
reference written here from the formula.

* ``fused`` and the dispatcher's ``eager``/``auto``: in process, orders 1..4, fp32/bf16/fp16,
  float64 gradcheck, what is saved for backward;
* ``triton`` under the CPU interpreter: in one subprocess (``TRITON_INTERPRET=1`` must be set
  before Triton's first import), fp32 and bf16, ragged and aligned widths, empty inputs;
* the gate is the first half of the fused input (Motif's ``gate_up_proj`` split), the product
  is taken in fp32 with one rounding (Motif's ``FusedMulPolyNorm``);
* an odd input width (a non-gated hidden size) fails with a one-line error.
"""

from __future__ import annotations

import pytest
import torch

from moe_model.kernels import dispatch as kernels
from moe_model.kernels.gated_fused import poly_norm_glu_fused, poly_relu_glu_fused
from tests.moe_model.kernels.test_polynorm import (
    EPS,
    ORDERS,
    TOL,
    assert_close,
    require_triton,
    run_in_interpreter,
)

pytestmark = pytest.mark.numerics


def ref_poly_norm_glu(x, weight, bias, eps=EPS):
    """sum_p weight[r-p] * gate^p / sqrt(mean_row(gate^(2p)) + eps) + bias, times up; float64."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    h = x.shape[-1] // 2
    gate, up = x[..., :h], x[..., h:]
    order = weight.numel()
    a = bias.reshape(())
    for p in range(1, order + 1):
        u = gate**p
        a = a + weight[order - p] * u / torch.sqrt((u * u).mean(-1, keepdim=True) + eps)
    return a * up


def ref_poly_relu_glu(x, weight, bias):
    x, weight, bias = x.double(), weight.double(), bias.double()
    h = x.shape[-1] // 2
    gate, up = x[..., :h], x[..., h:]
    order = weight.numel()
    pos = torch.clamp(gate, min=0)
    return (sum(weight[order - p] * pos**p for p in range(1, order + 1)) + bias) * up


REFS = {"polynorm_glu": ref_poly_norm_glu, "polyrelu_glu": ref_poly_relu_glu}
FUSED = {
    "polynorm_glu": lambda x, w, b: poly_norm_glu_fused(x, w, b, EPS),
    "polyrelu_glu": poly_relu_glu_fused,
}


def make_inputs(shape, order, dtype, seed=0, device="cpu"):
    """x (..., 2H), weight, bias, and an output gradient (..., H)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.rand(order, generator=gen) + 0.5).to(device)  # non-uniform: swaps show
    bias = torch.randn(1, generator=gen).to(device)
    g = torch.randn((*shape[:-1], shape[-1] // 2), generator=gen).to(device=device, dtype=dtype)
    return x, weight, bias, g


def grads(fn, x, weight, bias, g, double=False):
    leaves = [(t.detach().double() if double else t.detach().clone()).requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves)
    y.backward(g.double() if double else g)
    return y.detach(), *(t.grad for t in leaves)


def check_all(got, want, x_dtype, what):
    y, dx, dw, db = got
    ry, rdx, rdw, rdb = want
    assert y.dtype == x_dtype and dx.dtype == x_dtype, what
    assert y.shape == (*dx.shape[:-1], dx.shape[-1] // 2), what
    assert_close(y, ry, TOL[x_dtype], f"{what} y")
    assert_close(dx, rdx, TOL[x_dtype], f"{what} dx")
    # fp32 sums of products of the rounded inputs: tight in every input dtype.
    assert_close(dw, rdw, 1e-4, f"{what} dweight")
    assert_close(db, rdb, 1e-4, f"{what} dbias")


# ---------------------------------------------------------------------------------------------
# fused (torch) and dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(REFS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(37, 96), (2, 3, 2000)])
def test_fused_matches_reference(kind, shape, order, dtype):
    x, w, b, g = make_inputs(shape, order, dtype)
    got = grads(FUSED[kind], x, w, b, g)
    check_all(got, grads(REFS[kind], x, w, b, g, double=True), dtype, f"fused {kind}")


@pytest.mark.parametrize("kind", list(REFS))
@pytest.mark.parametrize("order", ORDERS)
def test_fused_gradcheck_float64(kind, order):
    x, w, b, _ = make_inputs((4, 2, 12), order, torch.float64, seed=order)
    leaves = tuple(t.requires_grad_() for t in (x, w.double(), b.double()))
    assert torch.autograd.gradcheck(FUSED[kind], leaves)


@pytest.mark.parametrize("kind", list(REFS))
@pytest.mark.parametrize("backend", ["eager", "fused", "auto"])
def test_dispatch_backends_match_reference(kind, backend):
    fn = {"polynorm_glu": lambda x, w, b: kernels.poly_norm_glu(x, w, b, EPS, backend),
          "polyrelu_glu": lambda x, w, b: kernels.poly_relu_glu(x, w, b, backend)}[kind]  # fmt: skip
    x, w, b, g = make_inputs((9, 64), 3, torch.bfloat16, seed=3)
    check_all(grads(fn, x, w, b, g), grads(REFS[kind], x, w, b, g, double=True), x.dtype, kind)


def test_gate_is_first_half_and_product_rounded_once():
    # up = 1 on every column: the output is PolyNorm(gate) itself, rounded once to bf16 from fp32.
    torch.manual_seed(0)
    gate = torch.randn(5, 32, dtype=torch.bfloat16)
    x = torch.cat([gate, torch.ones_like(gate)], dim=-1)
    w, b = torch.tensor([0.5, -0.25, 2.0]), torch.tensor([0.125])
    want = ref_poly_norm_glu(x, w, b).to(torch.bfloat16)
    for backend in ("eager", "fused"):
        assert torch.equal(kernels.poly_norm_glu(x, w, b, EPS, backend), want), backend
    # Swapping the halves changes the result: the first half is the gate.
    swapped = torch.cat([torch.ones_like(gate), gate], dim=-1)
    assert not torch.equal(kernels.poly_norm_glu(swapped, w, b, EPS, "fused"), want)


def test_fused_saves_input_and_row_stats_only():
    x, w, b, _ = make_inputs((16, 64), 3, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        poly_norm_glu_fused(*leaves, EPS)
    # x (2H, bf16), weight and bias (fp32), rstd: one fp32 per row and power.
    assert sum(saved) == x.nbytes + w.nbytes + b.nbytes + 16 * 3 * 4


@pytest.mark.parametrize("backend", ["eager", "fused"])
@pytest.mark.parametrize("fn", ["poly_norm_glu", "poly_relu_glu"])
def test_odd_width_is_a_one_line_error(fn, backend):
    x = torch.randn(4, 33)
    args = (torch.ones(3), torch.zeros(1)) + ((EPS,) if fn == "poly_norm_glu" else ())
    with pytest.raises(ValueError, match=r"even width 2H, got shape \(4, 33\)") as err:
        getattr(kernels, fn)(x, *args, backend=backend)
    assert "\n" not in str(err.value)


def test_auto_resolves_on_the_gate_width():
    x = torch.randn(2, 2 * 16)
    assert kernels.resolve_backend("auto", x, 3, row_width=16) == "fused"  # CPU: never triton


# ---------------------------------------------------------------------------------------------
# triton under the CPU interpreter (one subprocess)
# ---------------------------------------------------------------------------------------------

INTERP_CASES = [
    (kind, shape, order, dtype)
    for kind in REFS
    for shape in [(37, 96), (5, 2000), (3, 2 * 1024)]  # aligned, ragged (H = 1000), OLMoE's H
    for order in ORDERS
    for dtype in (torch.float32, torch.bfloat16)
]
INTERP_EMPTY = [(kind, (0, 64)) for kind in REFS]

@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    require_triton()
    tmp = tmp_path_factory.mktemp("gated_triton_interp")
    cases = []
    for i, (kind, shape, order, dtype) in enumerate(INTERP_CASES):
        cases.append((kind, *make_inputs(shape, order, dtype, seed=i), False))
    for kind, shape in INTERP_EMPTY:
        cases.append((kind, *make_inputs(shape, 3, torch.float32), False))
    return cases, run_in_interpreter(cases, tmp, timeout=600)


@pytest.mark.parametrize("case", range(len(INTERP_CASES)), ids=lambda i: "-".join(map(str, INTERP_CASES[i])))
def test_triton_interpreter_matches_reference(interp_results, case):
    cases, results = interp_results
    kind, x, w, b, g, _ = cases[case]
    y, dx, dw, db, saved = results[case]
    check_all((y, dx, dw, db), grads(REFS[kind], x, w, b, g, double=True), x.dtype, f"triton {kind}")
    n_rows = x.numel() // x.shape[-1]
    # Saved: x (2H) in its dtype, weight and bias, and (PolyNorm) one fp32 per row and power.
    stats = n_rows * w.numel() * 4 if kind == "polynorm_glu" else 0
    assert saved == x.nbytes + w.nbytes + b.nbytes + stats


@pytest.mark.parametrize("case", range(len(INTERP_EMPTY)), ids=lambda i: INTERP_EMPTY[i][0])
def test_triton_interpreter_handles_empty_input(interp_results, case):
    cases, results = interp_results
    x = cases[len(INTERP_CASES) + case][1]
    y, dx, dw, db, _ = results[len(INTERP_CASES) + case]
    assert y.shape == (0, 32) and dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# GPU: real shapes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape, order, dtype", [
    ((131072, 2 * 1024), 3, torch.bfloat16),  # one OLMoE MoE layer's rows at the gated H = 1024
    ((4, 8191, 2 * 1024), 2, torch.bfloat16),  # ragged row count, leading dims
    ((333, 2 * 1500), 4, torch.float32),  # ragged H
    ((1000, 2 * 4096), 1, torch.float16),  # the widest gate auto sends to Triton
])  # fmt: skip
def test_triton_gpu_matches_reference(shape, order, dtype):
    require_triton()
    x, w, b, g = make_inputs(shape, order, dtype, device="cuda")
    for kind in REFS:
        fn = {"polynorm_glu": lambda x, w, b: kernels.poly_norm_glu(x, w, b, EPS, "triton"),
              "polyrelu_glu": lambda x, w, b: kernels.poly_relu_glu(x, w, b, "triton")}[kind]  # fmt: skip
        got = grads(fn, x, w, b, g)
        check_all(got, grads(REFS[kind], x, w, b, g, double=True), dtype, f"triton {kind} {shape}")
        del got
        torch.cuda.empty_cache()


@pytest.mark.gpu
@needs_gpu
def test_auto_on_cuda_is_triton():
    require_triton()
    x, w, b, _ = make_inputs((16, 512), 3, torch.bfloat16, device="cuda")
    x.requires_grad_()
    assert type(kernels.poly_norm_glu(x, w, b, EPS).grad_fn).__name__ == "TritonPolyNormGLUBackward"
    assert type(kernels.poly_relu_glu(x, w, b).grad_fn).__name__ == "TritonPolyReLUGLUBackward"
