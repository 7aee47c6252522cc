"""Benchmark the MoE combine (weighted sum of each token's K expert rows), forward + backward:
the one-shot form with (T, K, D) fp32 products that ``moe.combine`` replaced, against the
chunked form it runs now.

Per form and shape: bytes moved and operator count forward and backward, peak memory above the
inputs, and on a measured run the time. Two kinds of row:

* ``traced``: OLMoE-1B-7B's layer shape (16384 tokens, top-8, d_model 2048, bf16 rows, fp32
  weights) run on fake tensors (``FakeTensorMode``): no memory, no time, exact op sequence.
* ``cpu``: a medium shape run for real on this CPU (default 2048 tokens, top-8, d 512, the
  chunked form in 8 chunks as at OLMoE's shape), the same counters plus the median forward +
  backward step, the two forms interleaved round-robin (the machine is shared).

Bytes moved are counted per operator from its operands (``TrafficCounter``): what it reads
(inputs; for gathers and index_add only the rows they touch; a broadcast operand once) plus
what it writes (outputs), views and allocations free. That is the eager traffic, an upper bound
when caches catch reuse. Peak memory is torch's ``MemTracker`` over the call, inputs excluded.
The JSON also holds the floor a fused kernel would reach: rows, weights and gradient read once,
output and gradients written once.

    python -m benchmarks.bench_combine --device cpu
    python -m benchmarks.bench_combine --device cpu --quick   # smoke test
"""

from __future__ import annotations

import functools
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.bench_common import Benchmark, Run, median, run_benchmark, time_interleaved
from moe_model.dispatch import combine

OLMOE_SHAPE = (16384, 8, 2048)
"""(tokens, top-k, d_model) of one OLMoE-1B-7B MoE layer at micro-batch 4 x 4096."""


def one_shot_combine(y_RD, weights_TK, inverse_R):
    """The combine before the chunked one: a gathered (T, K, D) copy and (T, K, D) fp32
    products, autograd's backward (two (T, K, D) fp32 gradients)."""
    num_tokens, top_k = weights_TK.shape
    y_TKD = y_RD.index_select(0, inverse_R).view(num_tokens, top_k, y_RD.shape[-1])
    return (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1).to(y_RD.dtype)


FORMS = {"one-shot (T,K,D)": one_shot_combine, "chunked": combine}

aten = torch.ops.aten
GATHERS = {aten.index_select.default, aten.gather.default, aten.index.Tensor}
SCATTER_ADDS = {aten.index_add_.default, aten.scatter_add_.default}
WRITE_ONLY = {aten.copy_.default, aten.zero_.default, aten.fill_.Scalar}


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements: a broadcast (stride 0) dim is read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        n *= size if stride else 1
    return n * t.element_size()


class TrafficCounter(TorchDispatchMode):
    """Bytes read + written and operators run, per aten operator of the code it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if (
            func.namespace != "aten"
            or func.is_view
            or name.startswith(("empty", "new_empty"))
            or name in ("detach", "alias")
        ):
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if func in GATHERS:  # reads the rows it returns and the index
            moved = 2 * sum(map(_distinct_bytes, outs)) + sum(map(_distinct_bytes, ins[1:]))
        elif func in SCATTER_ADDS:  # in place: reads source and index, updates the rows touched
            source, index = ins[-1], ins[1]
            moved = 3 * _distinct_bytes(source) + _distinct_bytes(index)
        elif func in WRITE_ONLY:  # the destination is written, not read
            moved = sum(map(_distinct_bytes, ins[1:])) + _distinct_bytes(ins[0])
        else:
            moved = sum(map(_distinct_bytes, ins)) + sum(map(_distinct_bytes, outs))
        self.bytes += moved
        self.ops += 1
        return out


def make_inputs(num_tokens, top_k, d, gen=None):
    y_RD = torch.randn(num_tokens * top_k, d, generator=gen).to(torch.bfloat16)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen)
    inverse_R = torch.randperm(num_tokens * top_k, generator=gen)
    g_TD = torch.randn(num_tokens, d, generator=gen).to(torch.bfloat16)
    return y_RD.requires_grad_(), weights_TK.requires_grad_(), inverse_R, g_TD


def count(fn, y_RD, weights_TK, inverse_R, g_TD) -> dict:
    """Bytes and operators forward and backward, peak MiB above the inputs."""
    y_RD.grad = weights_TK.grad = None  # no accumulation into an earlier call's gradients
    tracker = MemTracker()
    tracker.track_external(y_RD, weights_TK, inverse_R, g_TD)
    fwd, bwd = TrafficCounter(), TrafficCounter()
    with tracker:
        with fwd:
            out = fn(y_RD, weights_TK, inverse_R)
        with bwd:
            out.backward(g_TD)
    inputs = sum(t.numel() * t.element_size() for t in (y_RD, weights_TK, inverse_R, g_TD))
    peak = tracker.get_tracker_snapshot("peak")[y_RD.device]["Total"] - inputs
    return {
        "fwd_gb": fwd.bytes / 1e9, "bwd_gb": bwd.bytes / 1e9,
        "total_gb": (fwd.bytes + bwd.bytes) / 1e9,
        "fwd_ops": fwd.ops, "bwd_ops": bwd.ops, "peak_mib": peak / 2**20,
    }  # fmt: skip


def fused_floor_gb(num_tokens, top_k, d) -> dict:
    """Forward: rows (bf16), weights and indices read, output (bf16) written. Backward: gradient
    and rows read, row gradient (bf16) and weight gradient written."""
    rows, small = 2 * num_tokens * top_k * d, 12 * num_tokens * top_k  # fp32 w + int64 index
    fwd = rows + small + 2 * num_tokens * d
    bwd = 2 * num_tokens * d + 2 * rows + 2 * small
    return {"fwd_gb": fwd / 1e9, "bwd_gb": bwd / 1e9, "total_gb": (fwd + bwd) / 1e9}


def add_arguments(p) -> None:
    p.add_argument("--tokens", type=int, default=2048, help="measured run: tokens")
    p.add_argument("--top-k", type=int, default=8, help="measured run: top-k")
    p.add_argument("--d-model", type=int, default=512, help="measured run: d_model")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="measured run: the chunked form's tokens per chunk (default: tokens / 8, "
                        "the 8 chunks the default byte budget gives at OLMoE's shape)")  # fmt: skip


def setup(run: Run) -> None:
    args = run.args
    if run.quick:
        args.tokens, args.top_k, args.d_model = 256, 4, 64
    args.chunk_tokens = args.chunk_tokens or max(1, args.tokens // 8)
    run.settings.update(
        traced_shape=dict(zip(("tokens", "top_k", "d_model"), OLMOE_SHAPE, strict=True)),
        traced_chunk_tokens="default (COMBINE_CHUNK_BYTES)",
        measured_shape={"tokens": args.tokens, "top_k": args.top_k, "d_model": args.d_model},
        measured_chunk_tokens=args.chunk_tokens, rows_dtype="bf16", weights_dtype="fp32",
        timing="forward + backward per step, the two forms interleaved round-robin",
    )  # fmt: skip
    run.extra["fused_floor_traced"] = fused_floor_gb(*OLMOE_SHAPE)
    run.extra["fused_floor_measured"] = fused_floor_gb(args.tokens, args.top_k, args.d_model)


def traced_rows():
    """OLMoE's shape on fake tensors, each form with its defaults."""
    for form, fn in FORMS.items():
        with FakeTensorMode():
            counts = count(fn, *make_inputs(*OLMOE_SHAPE))
        yield {"form": form, "run": "traced", **dict(zip(("tokens", "top_k", "d"), OLMOE_SHAPE,
                                                        strict=True)), **counts}  # fmt: skip


def measured_rows(run: Run):
    """The measured shape for real: counts, then steps timed round-robin."""
    args = run.args
    shape = (args.tokens, args.top_k, args.d_model)
    forms = dict(FORMS, chunked=functools.partial(combine, chunk_tokens=args.chunk_tokens))
    inputs = make_inputs(*shape, gen=torch.Generator().manual_seed(0))
    rows, steps = {}, {}
    for form, fn in forms.items():
        rows[form] = {"form": form, "run": run.device.type,
                      **dict(zip(("tokens", "top_k", "d"), shape, strict=True)),
                      **count(fn, *inputs)}  # fmt: skip

        def step(fn=fn, y_RD=inputs[0], weights_TK=inputs[1]):
            y_RD.grad = weights_TK.grad = None
            fn(y_RD, weights_TK, inputs[2]).backward(inputs[3])

        steps[form] = step
    _, times = time_interleaved(steps, warmup=run.warmup, iters=run.iters)
    for form, row in rows.items():
        yield dict(row, step_ms=median(times[form]), step_ms_all=times[form])


def measure(run: Run):
    if not run.quick:
        yield from traced_rows()
    yield from measured_rows(run)


COLUMNS = [
    ("form", "form", ""), ("run", "run", ""), ("tokens", "T", "d"), ("top_k", "K", "d"),
    ("d", "D", "d"), ("fwd_gb", "fwd GB moved", ".2f"), ("bwd_gb", "bwd GB moved", ".2f"),
    ("total_gb", "total GB", ".2f"), ("fwd_ops", "fwd ops", "d"), ("bwd_ops", "bwd ops", "d"),
    ("peak_mib", "peak MiB", ".0f"), ("step_ms", "fwd+bwd ms", ".1f"),
]  # fmt: skip

BENCHMARK = Benchmark(
    name="combine",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    columns=COLUMNS,
    progress=lambda r: f"{r['form']:17s} {r['run']:6s} peak {r['peak_mib']:8.0f} MiB",
    timing={"cpu": (1, 5), "quick": (1, 2)},
    devices=("cpu",),
)

if __name__ == "__main__":
    sys.exit(run_benchmark(BENCHMARK))
