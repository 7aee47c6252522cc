"""PolyNorm / PolyReLU kernels against an independent float64 reference.

* ``fused`` (torch autograd.Function) and ``eager``/``auto`` dispatch: in process, orders 1..4,
  fp32/bf16/fp16, plus float64 gradcheck and a check of what is saved for backward.
* ``compile``: one shape, fp32, order 3 (each new shape, dtype or order compiles again).
* ``triton`` on CPU: Triton's interpreter must be enabled (``TRITON_INTERPRET=1``) before
  ``triton`` itself is first imported -- ``triton.language`` helpers are decorated at import --
  so those cases run in one subprocess (inputs and outputs travel through a file) and are
  compared here. Triton is a dev dependency on Linux: there a missing Triton fails these
  tests; elsewhere they skip.
* autocast: every backend under CPU bf16 autocast (forward and backward inside it) gives what
  the same call gives without it (statistics in fp32 either way); triton in the subprocess.
* empty inputs (an expert without rows): the dispatcher sends them to ``eager`` whatever the
  backend, and each backend's own function still handles them.
* ``gpu``-marked: the Triton kernels on CUDA at the real shape (131072 x 1536 bf16) and ragged
  row counts and lengths; skipped without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_model.kernels import dispatch as kernels
from moe_model.kernels.polynorm_fused import poly_norm_fused, poly_relu_fused
from tests.cpu_capability import INDUCTOR_CPU

pytestmark = pytest.mark.numerics

REPO = Path(__file__).resolve().parents[3]
EPS = 1e-6
ORDERS = [1, 2, 3, 4]
# max|err| / max|ref|: fp32 math throughout vs float64; low precision dominated by output rounding.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Whether this process runs Triton kernels in the CPU interpreter (read once, at its import).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# Reference: float64, written from the formula (weight[0] multiplies the highest power).
# ---------------------------------------------------------------------------------------------


def ref_poly_norm(x, weight, bias, eps=EPS):
    x, weight, bias = x.double(), weight.double(), bias.double()
    order = weight.numel()
    y = bias.reshape(())
    for i in range(order):
        u = x ** (order - i)
        y = y + weight[i] * u / torch.sqrt((u * u).mean(-1, keepdim=True) + eps)
    return y


def ref_poly_relu(x, weight, bias):
    x, weight, bias = x.double(), weight.double(), bias.double()
    order = weight.numel()
    y = bias.reshape(())
    for i in range(order):
        y = y + weight[i] * torch.clamp(x, min=0) ** (order - i)
    return y


def require_triton():
    """Triton is a dev dependency on Linux (setup.py): its absence there is a failure."""
    if platform.system() != "Linux":
        return pytest.importorskip("triton")
    import triton

    return triton


def make_inputs(shape, order, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    # Non-uniform coefficients so that a swapped weight order shows.
    weight = (torch.rand(order, generator=gen) + 0.5).to(device)
    bias = torch.randn(1, generator=gen).to(device)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return x, weight, bias, g


def reference_grads(ref_fn, x, weight, bias, g):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = ref_fn(*leaves)
    y.backward(g.double())  # g already rounded to the input dtype: same upstream gradient
    return y.detach(), *(t.grad for t in leaves)


def run_impl(fn, x, weight, bias, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves)
    y.backward(g)
    return y.detach(), *(t.grad for t in leaves)


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    assert err <= tol * scale, f"{what}: max err {err:.3g} > {tol:g} x {scale:.3g}"


def check_all(got, want, x_dtype, what):
    y, dx, dw, db = got
    ry, rdx, rdw, rdb = want
    assert y.dtype == x_dtype and dx.dtype == x_dtype
    assert_close(y, ry, TOL[x_dtype], f"{what} y")
    assert_close(dx, rdx, TOL[x_dtype], f"{what} dx")
    # dweight/dbias are fp32 sums of exact products of the (rounded) inputs: tight everywhere.
    assert_close(dw, rdw, 1e-4, f"{what} dweight")
    assert_close(db, rdb, 1e-4, f"{what} dbias")


# ---------------------------------------------------------------------------------------------
# fused (torch) and dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(37, 96), (2, 3, 1000)])
def test_fused_matches_reference(shape, order, dtype):
    x, w, b, g = make_inputs(shape, order, dtype)
    got = run_impl(lambda x, w, b: poly_norm_fused(x, w, b, EPS), x, w, b, g)
    check_all(got, reference_grads(ref_poly_norm, x, w, b, g), dtype, "polynorm")
    got = run_impl(poly_relu_fused, x, w, b, g)
    check_all(got, reference_grads(ref_poly_relu, x, w, b, g), dtype, "polyrelu")


@pytest.mark.parametrize("order", ORDERS)
def test_fused_gradcheck_float64(order):
    # Float64 in, float64 math inside: the analytic backward against finite differences.
    x, w, b, _ = make_inputs((4, 3, 16), order, torch.float64, seed=order)
    args = [t.double().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: poly_norm_fused(x, w, b, EPS), args)
    assert torch.autograd.gradcheck(poly_relu_fused, args)


def test_fused_saves_only_input_and_row_stats():
    n_rows, n_cols, order = 64, 96, 3
    x, w, b, _ = make_inputs((n_rows, n_cols), order, torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    for fn, extra in [(poly_norm_fused, n_rows * order * 4), (poly_relu_fused, 0)]:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            args = [t.clone().requires_grad_() for t in (x, w, b)]
            fn(*args, EPS) if fn is poly_norm_fused else fn(*args)
        # x in bf16 + the (order,) weight + fp32 rstd per row and power (PolyNorm only).
        assert sum(saved) == x.numel() * 2 + order * 4 + extra


@pytest.mark.parametrize("backend", ["eager", "fused", "auto"])
@pytest.mark.parametrize("order", [1, 3])
def test_dispatch_backends_match_reference(backend, order):
    x, w, b, g = make_inputs((2, 5, 64), order, torch.float32)
    got = run_impl(lambda x, w, b: kernels.poly_norm(x, w, b, EPS, backend=backend), x, w, b, g)
    check_all(got, reference_grads(ref_poly_norm, x, w, b, g), torch.float32, backend)
    got = run_impl(lambda x, w, b: kernels.poly_relu(x, w, b, backend=backend), x, w, b, g)
    check_all(got, reference_grads(ref_poly_relu, x, w, b, g), torch.float32, backend)


def test_unknown_backend_lists_names():
    x, w, b, _ = make_inputs((2, 8), 3, torch.float32)
    for call in (lambda: kernels.poly_norm(x, w, b, EPS, backend="cuda"),
                 lambda: kernels.poly_relu(x, w, b, backend="cuda")):  # fmt: skip
        with pytest.raises(ValueError, match="auto.*eager.*fused.*triton.*compile"):
            call()


EMPTY_SHAPES = [(0, 64), (2, 0, 64)]


def empty_leaves(shape):
    x = torch.empty(shape, requires_grad=True)
    w = torch.tensor([0.5, -0.2, 0.9], requires_grad=True)
    b = torch.tensor([0.1], requires_grad=True)
    return x, w, b


def check_empty(y, x, w, b):
    """Empty output of the input's shape, and zero (not None) gradients: with per-expert
    coefficient sets every FSDP rank must reduce a gradient for every expert's set."""
    assert y.shape == x.shape and y.dtype == x.dtype
    gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b], allow_unused=True)
    assert gx is not None and gx.shape == x.shape
    assert gw is not None and torch.equal(gw, torch.zeros(3))
    assert gb is not None and torch.equal(gb, torch.zeros(1))


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_dispatch_sends_empty_inputs_to_eager(shape):
    empty, rows = torch.empty(shape), torch.randn(4, 64)
    for backend in kernels.BACKENDS:
        assert kernels.resolve_backend(backend, empty, 3) == "eager", backend
        if backend != "auto":  # a non-empty input keeps the backend it asked for
            assert kernels.resolve_backend(backend, rows, 3) == backend
    # The triton backend refuses CPU tensors outside the interpreter: it only returns here
    # because the dispatcher never reached it.
    if not INTERPRETER:
        x, w, b = empty_leaves(shape)
        check_empty(kernels.poly_norm(x, w, b, EPS, backend="triton"), x, w, b)
        check_empty(kernels.poly_relu(x, w, b, backend="triton"), x, w, b)


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_eager_and_fused_functions_handle_empty_inputs(shape):
    from moe_model.kernels.reference import poly_norm_eager, poly_relu_eager

    for fn in (lambda x, w, b: poly_norm_eager(x, w, b, EPS), poly_relu_eager,
               lambda x, w, b: poly_norm_fused(x, w, b, EPS), poly_relu_fused):  # fmt: skip
        x, w, b = empty_leaves(shape)
        check_empty(fn(x, w, b), x, w, b)


def test_auto_on_cpu_is_fused():
    x, w, b, _ = make_inputs((4, 32), 3, torch.float32)
    x.requires_grad_()
    y = kernels.poly_norm(x, w, b, EPS)
    assert type(y.grad_fn).__name__ == "PolyNormFunctionBackward"


@pytest.mark.slow
@INDUCTOR_CPU
def test_compile_backend_matches_reference():
    # One shape, fp32, order 3: every new shape, dtype or order compiles again (seconds each).
    x, w, b, g = make_inputs((8, 64), 3, torch.float32)
    got = run_impl(lambda x, w, b: kernels.poly_norm(x, w, b, EPS, backend="compile"), x, w, b, g)
    check_all(got, reference_grads(ref_poly_norm, x, w, b, g), torch.float32, "compile polynorm")
    got = run_impl(lambda x, w, b: kernels.poly_relu(x, w, b, backend="compile"), x, w, b, g)
    check_all(got, reference_grads(ref_poly_relu, x, w, b, g), torch.float32, "compile polyrelu")


# ---------------------------------------------------------------------------------------------
# autocast: the same numbers with and without it
# ---------------------------------------------------------------------------------------------

AUTOCAST_SHAPE = (64, 1536)  # where the fused PolyNorm's bf16 bmm row sums lost 0.06 in dy


def run_autocast(fn, x, w, b, g, autocast: bool):
    """``run_impl`` with forward and backward inside CPU bf16 autocast (or not)."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        return run_impl(fn, x, w, b, g)


def assert_autocast_invariant(with_ac, without_ac, x_dtype, what):
    """Outputs within one rounding of their dtype (bf16's when that is the input's; fp32
    otherwise), dweight/dbias within fp32 summation noise: autocast changed no statistic."""
    out_tol = 2.0**-8 if x_dtype == torch.bfloat16 else 1e-6
    for name, a, b, tol in zip(("y", "dx", "dweight", "dbias"), with_ac, without_ac,
                               (out_tol, out_tol, 1e-6, 1e-6)):  # fmt: skip
        assert a.dtype == b.dtype, f"{what} {name}: autocast changed the dtype to {a.dtype}"
        assert_close(a, b.double(), tol, f"{what} {name} under autocast")


def poly_norm_backend(backend):
    return lambda x, w, b: kernels.poly_norm(x, w, b, EPS, backend=backend)


def poly_relu_backend(backend):
    return lambda x, w, b: kernels.poly_relu(x, w, b, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_backends_ignore_autocast(backend, dtype):
    x, w, b, g = make_inputs(AUTOCAST_SHAPE, 3, dtype)
    for kind, fn in [("polynorm", poly_norm_backend(backend)), ("polyrelu", poly_relu_backend(backend))]:
        got = run_autocast(fn, x, w, b, g, autocast=True)
        want = run_autocast(fn, x, w, b, g, autocast=False)
        assert_autocast_invariant(got, want, dtype, f"{backend} {kind} {dtype}")


@pytest.mark.slow
@INDUCTOR_CPU
def test_compile_backend_ignores_autocast():
    # One shape and dtype: each new one compiles again (seconds each).
    x, w, b, g = make_inputs((8, 1536), 3, torch.float32)
    for kind, fn in [("polynorm", poly_norm_backend("compile")), ("polyrelu", poly_relu_backend("compile"))]:
        got = run_autocast(fn, x, w, b, g, autocast=True)
        want = run_autocast(fn, x, w, b, g, autocast=False)
        assert_autocast_invariant(got, want, torch.float32, f"compile {kind}")


# ---------------------------------------------------------------------------------------------
# triton under the CPU interpreter (subprocess)
# ---------------------------------------------------------------------------------------------

INTERP_SHAPES = [(37, 96), (5, 1000)]
INTERP_DTYPES = [torch.float32, torch.bfloat16]
INTERP_CASES = [
    (kind, shape, order, dtype)
    for kind in ("polynorm", "polyrelu")
    for shape in INTERP_SHAPES
    for order in ORDERS
    for dtype in INTERP_DTYPES
]
# The same inputs run with and without CPU bf16 autocast (cases: (kind, dtype, autocast)); few
# rows of the paper's width keep the interpreter quick.
INTERP_AUTOCAST_SHAPE = (4, 1536)
INTERP_AUTOCAST = [
    (kind, dtype, autocast)
    for kind in ("polynorm", "polyrelu")
    for dtype in INTERP_DTYPES
    for autocast in (False, True)
]
# The kernels called directly on an expert without rows (they skip the launch).
INTERP_EMPTY = [(kind, shape) for kind in ("polynorm", "polyrelu") for shape in EMPTY_SHAPES]


_INTERP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from moe_model.kernels.gated_triton import poly_norm_glu_triton, poly_relu_glu_triton
    from moe_model.kernels.polynorm_triton import INTERPRET, poly_norm_triton, poly_relu_triton

    assert INTERPRET, "TRITON_INTERPRET was not seen"
    KERNELS = {
        "polynorm": lambda x, w, b: poly_norm_triton(x, w, b, 1e-6),
        "polyrelu": poly_relu_triton,
        "polynorm_glu": lambda x, w, b: poly_norm_glu_triton(x, w, b, 1e-6),
        "polyrelu_glu": poly_relu_glu_triton,
    }
    out = []
    for kind, x, w, b, g, autocast in torch.load(sys.argv[1]):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        saved = []
        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = KERNELS[kind](*leaves)
            y.backward(g)
        out.append((y.detach(), *(t.grad for t in leaves), sum(saved)))
    torch.save(out, sys.argv[2])
    """
)


def run_in_interpreter(cases: list, tmp: Path, timeout: int) -> list:
    """The Triton kernels on ``cases`` in a subprocess under TRITON_INTERPRET=1 (it must be set
    before Triton's first import). A case is ``(kind, x, weight, bias, grad_out, autocast)``, kind
    polynorm, polyrelu, polynorm_glu or polyrelu_glu; its result ``(y, dx, dweight, dbias, bytes
    saved for backward)``."""
    torch.save(cases, tmp / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _INTERP_SCRIPT, str(tmp / "in.pt"), str(tmp / "out.pt")],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt")


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    require_triton()
    tmp = tmp_path_factory.mktemp("triton_interp")
    cases = []
    for i, (kind, shape, order, dtype) in enumerate(INTERP_CASES):
        x, w, b, g = make_inputs(shape, order, dtype, seed=i)
        cases.append((kind, x, w, b, g, False))
    for kind, shape in INTERP_EMPTY:
        x, w, b = (t.detach() for t in empty_leaves(shape))
        cases.append((kind, x, w, b, torch.zeros(shape), False))
    for kind, dtype, autocast in INTERP_AUTOCAST:
        x, w, b, g = make_inputs(INTERP_AUTOCAST_SHAPE, 3, dtype, seed=7)
        cases.append((kind, x, w, b, g, autocast))
    return cases, run_in_interpreter(cases, tmp, timeout=300)


@pytest.mark.parametrize("case", range(len(INTERP_CASES)), ids=lambda i: "-".join(map(str, INTERP_CASES[i])))
def test_triton_interpreter_matches_reference(interp_results, case):
    cases, results = interp_results
    kind, x, w, b, g, _ = cases[case]
    y, dx, dw, db, saved = results[case]
    ref = ref_poly_norm if kind == "polynorm" else ref_poly_relu
    check_all((y, dx, dw, db), reference_grads(ref, x, w, b, g), x.dtype, f"triton {kind}")
    n_rows = x.numel() // x.shape[-1]
    # Saved for backward: x in its dtype, the weight, and (PolyNorm) one fp32 per row and power.
    extra = n_rows * w.numel() * 4 if kind == "polynorm" else 0
    assert saved == x.numel() * x.element_size() + w.numel() * 4 + extra


@pytest.mark.parametrize("kind", ["polynorm", "polyrelu"])
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_triton_interpreter_ignores_autocast(interp_results, kind, dtype):
    _, results = interp_results
    first = len(INTERP_CASES) + len(INTERP_EMPTY)
    by_case = dict(zip(INTERP_AUTOCAST, results[first:]))
    got, want = by_case[(kind, dtype, True)][:4], by_case[(kind, dtype, False)][:4]
    assert_autocast_invariant(got, want, dtype, f"triton {kind} {dtype}")


@pytest.mark.parametrize("case", range(len(INTERP_EMPTY)), ids=lambda i: "-".join(map(str, INTERP_EMPTY[i])))
def test_triton_interpreter_handles_empty_input(interp_results, case):
    cases, results = interp_results
    i = len(INTERP_CASES) + case
    x = cases[i][1]
    y, dx, dw, db, _ = results[i]
    assert y.shape == x.shape and dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(1))


def test_triton_backend_needs_cuda_or_interpreter():
    require_triton()
    if INTERPRETER:  # CPU tensors are then allowed
        pytest.skip("only meaningful in a process without TRITON_INTERPRET")
    x, w, b, _ = make_inputs((4, 32), 3, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.poly_norm(x, w, b, EPS, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU: real shapes
# ---------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "shape,order,dtype",
    [
        ((131072, 1536), 3, torch.bfloat16),  # one OLMoE MoE layer at h=1536
        ((131072, 1024), 3, torch.bfloat16),
        ((4, 8191, 1536), 2, torch.bfloat16),  # ragged row count, leading dims
        ((1, 1536), 4, torch.bfloat16),
        ((1000, 8192), 1, torch.float16),  # long rows
        ((333, 1500), 4, torch.float32),  # row length not a power of two
        ((7, 65536), 3, torch.bfloat16),  # longest single-program row
    ],
)
def test_triton_gpu_matches_reference(shape, order, dtype):
    require_triton()
    x, w, b, g = make_inputs(shape, order, dtype, device="cuda")
    for kind, fn, ref in [
        ("polynorm", lambda x, w, b: kernels.poly_norm(x, w, b, EPS, backend="triton"), ref_poly_norm),
        ("polyrelu", lambda x, w, b: kernels.poly_relu(x, w, b, backend="triton"), ref_poly_relu),
    ]:
        got = run_impl(fn, x, w, b, g)
        want = reference_grads(ref, x, w, b, g)
        check_all(got, want, dtype, f"triton {kind} {shape}")
        del got, want
        torch.cuda.empty_cache()


@pytest.mark.gpu
@needs_gpu
def test_auto_on_cuda_is_triton():
    require_triton()
    x, w, b, _ = make_inputs((16, 256), 3, torch.bfloat16, device="cuda")
    x.requires_grad_()
    y = kernels.poly_norm(x, w, b, EPS)
    assert type(y.grad_fn).__name__ == "TritonPolyNormBackward"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_triton_gpu_handles_empty_input(shape):
    """Called directly (the dispatcher never sends empty inputs here): no launch, zero grads."""
    require_triton()
    from moe_model.kernels.polynorm_triton import poly_norm_triton, poly_relu_triton

    for fn in (lambda x, w, b: poly_norm_triton(x, w, b, EPS), poly_relu_triton):
        x, w, b = (t.detach().cuda().requires_grad_() for t in empty_leaves(shape))
        y = fn(x, w, b)
        assert y.shape == x.shape
        gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b])
        assert gx.shape == x.shape
        assert torch.equal(gw.cpu(), torch.zeros(3)) and torch.equal(gb.cpu(), torch.zeros(1))
