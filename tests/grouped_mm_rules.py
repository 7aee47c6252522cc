"""CUDA's rules for ``aten._grouped_mm``, checked on CPU: a dispatch mode that inspects every call.

The CPU kernel accepts layouts, dtypes and offsets that the H100/B200 fast path rejects, asserts
on, or silently routes to a slow fallback. This module states the fast path's rules as they are
written in the CUDA build of torch (pytorch/pytorch; the files read at commits 00d4eaf9
GroupedBlas.cpp, 2295ac79 GroupedMMUtils.h, 06c0cf01 GroupMM.cu, 187e65ad GroupMMCommon.cuh).
A later Blas.cpp first tries cuBLASLt grouped GEMM when built with CUDA >= 13.3; the GPU image's
torch 2.11+cu130 is not, so the CUTLASS rules below are the ones it runs by:

* ``aten/src/ATen/native/cuda/GroupedBlas.cpp`` ``_grouped_mm_cuda``: the fast path
  (``bf16bf16_grouped_mm``, CUTLASS) runs only when both operands and the output are bf16 on
  sm90/sm100; anything else takes ``_grouped_mm_fallback``, which copies ``offs`` to the host
  (a sync) and loops one ``mm`` per group.
* ``aten/src/ATen/native/GroupedMMUtils.h`` ``_grouped_mm_validate_inputs`` and
  ``check_valid_strides_and_return_transposed``: 2-d or 3-d operands; offsets iff an operand is
  2-d, 1-d int32; per operand, one of the last two strides is 1 and the other is at least the
  matching size and a multiple of 16 bytes; ``data_ptr`` 16-byte aligned (checked only off CPU).
  ``create_grouped_gemm_output_tensor``: ``offs.size(0)`` equals the batch of the 3-d operand.
* ``aten/src/ATen/native/cuda/GroupMM.cu``: "row major" means ``stride(-1) == 1``; at most 1023
  groups; a group's base pointer is ``base + tid * stride(0)`` of a 3-d operand, so a 3-d
  operand's batch stride feeds TMA addresses too.
* ``aten/src/ATen/native/cuda/GroupMMCommon.cuh`` ``prepare_grouped_gemm_data``: in a 2d x 2d
  call (K ragged: the weight gradients) ``CUDA_KERNEL_ASSERT(delta > 0)`` for every group unless
  A is column-major and B row-major (then ``delta >= 0``: empty groups allowed); for every group
  but the last, the ragged extent is a multiple of 16 bytes of the operand it walks along when
  that operand is contiguous along the ragged dimension (2d x 2d: A row-major, B column-major;
  2d x 3d: A column-major; 3d x 2d: B row-major, and always the output).

Offsets beyond the kernel's own asserts: they must rise from 0 and end within the ragged extent.
Ending short of it is legal, but the output is ``empty_strided``, so in 2d x 3d and 3d x 2d calls
the rows past ``offs[-1]`` stay uninitialised: the caller must mask them, as the MoE layer does
for capacity-dropped rows (``moe.py``; tests/moe_model/test_moe_variants.py writes NaN there
and checks that nothing reaches the output or the gradients), so such calls are not
violations here.

A data pointer's alignment on CUDA is its storage offset's: the caching allocator hands out
512-byte aligned blocks, so ``storage_offset * itemsize % 16`` decides it (CPU allocations are
64-byte aligned, so this equals the CPU pointer's alignment too).

Use::

    with GroupedMMRules() as rules:
        y, aux = layer(x)
        y.sum().backward()
    rules.assert_clean()   # fails on any violation, and when no grouped_mm ran at all
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["GroupedMMCall", "GroupedMMRules", "grouped_mm_violations"]

TMA_ALIGN_BYTES = 16
"""TMA transfers need 16-byte aligned addresses and strides (GroupMMCommon.cuh, GroupedMMUtils.h)."""
MAX_GROUPS = 1023
"""GroupMM.cu: ``TORCH_CHECK(group_count < 1024, ...)``."""


def _row_major(t: torch.Tensor) -> bool:
    # GroupMM.cu dispatch_bf16_grouped_kernel_on_ab_transpose: row major iff stride(-1) == 1.
    return t.stride(-1) == 1


def _stride_violations(name: str, t: torch.Tensor) -> list[str]:
    """check_valid_strides_and_return_transposed (GroupedMMUtils.h), data pointer included, plus
    a 3-d operand's batch stride (a per-group base address in GroupMM.cu)."""
    out = []
    itemsize = t.element_size()
    align = TMA_ALIGN_BYTES // itemsize
    if t.storage_offset() * itemsize % TMA_ALIGN_BYTES:
        out.append(
            f"{name}: data pointer not 16-byte aligned (storage offset {t.storage_offset()} x "
            f"{itemsize} bytes)"
        )
    sizes, strides = t.shape, t.stride()
    if strides[-2] == 1 and strides[-1] >= max(1, sizes[-2]):
        lead = strides[-1]
    elif strides[-1] == 1 and strides[-2] >= max(1, sizes[-1]):
        lead = strides[-2]
    else:
        return out + [
            f"{name}: invalid strides {strides} for sizes {tuple(sizes)} (neither of "
            "the last two dims is contiguous with the other's stride covering it)"
        ]
    if lead % align:
        out.append(f"{name}: leading stride {lead} is not a multiple of 16 bytes ({strides})")
    if t.dim() == 3 and sizes[0] > 1 and strides[0] % align:
        out.append(f"{name}: batch stride {strides[0]} is not a multiple of 16 bytes")
    return out


def _offset_violations(
    layout: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor
) -> list[str]:
    """The offsets' values against GroupMMCommon.cuh's asserts and the ragged extent."""
    out = []
    a_row, b_row = _row_major(a), _row_major(b)
    if layout == "2d x 2d":
        ragged, groups = a.shape[1], offs.shape[0]
    elif layout == "2d x 3d":
        ragged, groups = a.shape[0], b.shape[0]
    else:  # 3d x 2d
        ragged, groups = b.shape[1], a.shape[0]
    if offs.shape[0] != groups:
        return [f"offs has {offs.shape[0]} entries for {groups} groups"]
    if groups > MAX_GROUPS:
        out.append(f"{groups} groups; the CUTLASS path takes at most {MAX_GROUPS}")
    ends = offs.tolist()  # the checker may sync: it runs on CPU, in tests
    deltas = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    if any(d < 0 for d in deltas):
        out.append(f"offs decrease: {ends}")
    if ends and ends[-1] > ragged:
        out.append(f"offs end at {ends[-1]} past the ragged extent {ragged}")
    if layout == "2d x 2d" and not (not a_row and b_row):
        empty = [g for g, d in enumerate(deltas) if d == 0]
        if empty:
            out.append(
                f"empty groups {empty} in a 2d x 2d call with A "
                f"{'row' if a_row else 'column'}-major and B {'row' if b_row else 'column'}-major:"
                " GroupMMCommon.cuh asserts delta > 0 unless A is column-major and B row-major"
            )
    # Which operands walk along the ragged dim contiguously (GroupMMCommon.cuh: "TMA transfers
    # require global memory tensor addresses to be aligned to 16 bytes").
    walkers = []
    if layout == "2d x 2d":
        walkers = [("A", a)] * a_row + [("B", b)] * (not b_row)
    elif layout == "2d x 3d":
        walkers = [("A", a)] * (not a_row)
    else:
        walkers = [("B", b)] * b_row + [("output", a)]
    for name, t in walkers:
        align = TMA_ALIGN_BYTES // t.element_size()
        bad = [g for g, d in enumerate(deltas[:-1]) if d % align]
        if bad:
            out.append(
                f"groups {bad} have ragged extents {[deltas[g] for g in bad]} that are not "
                f"multiples of {align} elements (16 bytes) along {name}"
            )
    return out


def grouped_mm_violations(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> list[str]:
    """Every rule of CUDA's bf16 grouped_mm fast path that ``_grouped_mm(a, b, offs, bias,
    out_dtype)`` breaks; empty when it would run there as it runs here."""
    out = []
    for name, t in (("A", a), ("B", b)):
        if t.dtype != torch.bfloat16:
            out.append(
                f"{name} is {t.dtype}: CUDA's fast path takes bf16 only, anything else "
                "falls back to a per-group loop that copies offs to the host"
            )
    if out_dtype not in (None, torch.bfloat16):
        out.append(f"out_dtype {out_dtype}: the fast path writes bf16 only")
    if bias is not None:
        out.append("bias is not supported")
    if a.dim() not in (2, 3) or b.dim() not in (2, 3):
        return out + [f"operands are {a.dim()}-d and {b.dim()}-d; 2-d or 3-d expected"]
    layout = f"{a.dim()}d x {b.dim()}d"
    if layout != "2d x 2d" and a.shape[-1] != b.shape[-2]:
        out.append(f"contraction dims differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    out += _stride_violations("A", a) + _stride_violations("B", b)
    if (offs is not None) != (layout != "3d x 3d"):
        return out + [f"{layout}: offs {'missing' if offs is None else 'given'}"]
    if offs is None:
        return out
    if offs.dim() != 1 or offs.dtype != torch.int32:
        return out + [f"offs must be 1-d int32, got {offs.dim()}-d {offs.dtype}"]
    if offs.device != a.device:
        out.append(f"offs on {offs.device}, operands on {a.device}: the kernel reads it there")
    return out + _offset_violations(layout, a, b, offs)


@dataclass
class GroupedMMCall:
    """One ``aten._grouped_mm`` call as the mode saw it."""

    layout: str
    """'2d x 3d' (forward and input gradients), '2d x 2d' (weight gradients), ..."""
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    strides: tuple[tuple[int, ...], tuple[int, ...]]
    violations: list[str] = field(default_factory=list)


class GroupedMMRules(TorchDispatchMode):
    """Records every ``aten._grouped_mm`` call (forward and autograd's backward, which runs on
    the calling thread on CPU) with the CUDA rules it breaks; the call itself runs unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[GroupedMMCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.aten._grouped_mm:
            names = ("offs", "bias", "out_dtype")
            extra = dict(zip(names, args[2:], strict=False)) | kwargs
            a, b = args[0], args[1]
            self.calls.append(
                GroupedMMCall(
                    layout=f"{a.dim()}d x {b.dim()}d",
                    shapes=(tuple(a.shape), tuple(b.shape)),
                    strides=(a.stride(), b.stride()),
                    violations=grouped_mm_violations(a, b, **extra),
                )
            )
        return func(*args, **kwargs)

    @property
    def violations(self) -> list[str]:
        """'call i (layout shapes): rule' for every broken rule of every call."""
        return [
            f"call {i} ({c.layout} {c.shapes}): {v}"
            for i, c in enumerate(self.calls)
            for v in c.violations
        ]

    def assert_clean(self, min_calls: int = 1) -> None:
        """Fails on any violation, or when fewer than ``min_calls`` calls were seen (a check of
        no calls proves nothing)."""
        assert len(self.calls) >= min_calls, (
            f"{len(self.calls)} grouped_mm calls seen, expected at least {min_calls}"
        )
        assert not self.violations, "\n".join(self.violations)
