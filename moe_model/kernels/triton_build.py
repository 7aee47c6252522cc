"""Build the Triton kernels for a GPU on a machine without one, and read what the GPU would see.

``triton.compile`` with a :class:`GPUTarget` lowers a kernel to PTX and runs the ``ptxas``
Triton ships to a cubin: no driver, no GPU. This module builds each kernel of
:mod:`.polynorm_triton` and :mod:`.gated_triton` with the signature and launch parameters its launcher would use for a
given row width, dtype and order, then reports

* registers, spill bytes and stack frame (``ptxas -v`` on the kernel's own PTX, the tool and
  ``--gpu-name`` Triton itself uses), and the dynamic shared memory Triton allocates;
* 32-bit integer multiplies of values derived from the program id (:func:`row_offset_32bit_ops`):
  a row offset computed in 32 bits wraps past 2**31 elements (131072 rows x 16384 columns), the
  silent corruption a CPU test never sees.

Builds are cached by Triton (``~/.triton/cache``) and the ptxas reports here per PTX text, so a
second build of the same case costs a file read. Used by ``benchmarks/bench_triton_build.py``
(the full matrix, JSON in ``benchmarks/results/``) and the build tests.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "ARCHS",
    "KERNELS",
    "WIDTH_KERNELS",
    "KernelBuild",
    "build_kernel",
    "ptxas_usage",
    "row_offset_32bit_ops",
]

ARCHS = (90, 100)
"""Compute capabilities built: H100 (sm_90a) and B200 (sm_100a)."""

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class KernelBuild:
    """One kernel built for one GPU at one launch configuration."""

    kernel: str
    arch: int
    dtype: str
    order: int
    width: int | None
    """Row length (PolyNorm; the gate's H for the gated kernels); None for the elementwise
    PolyReLU kernels."""
    block: int
    num_warps: int
    registers: int
    spill_stores: int
    """Bytes per thread; anything above 0 is local-memory traffic in the inner loop."""
    spill_loads: int
    stack_frame: int
    shared: int
    """Dynamic shared memory Triton allocates for the launch (bytes per program)."""
    offset_32bit_ops: tuple[str, ...]
    """PTX lines multiplying a program-id-derived value in 32 bits (empty when offsets are 64-bit)."""

    def as_row(self) -> dict:
        row = asdict(self)
        row["offset_32bit_ops"] = len(self.offset_32bit_ops)
        return row


def _signature(kernel: str, dtype: torch.dtype) -> dict[str, str]:
    """The launcher's argument types: tensors of the input dtype, fp32 statistics and
    partials, the coefficients in the input dtype (FSDP's bf16 parameters; fp32 runs keep fp32)."""
    t = "*" + _TRITON_DTYPE[dtype]
    f32 = "*fp32"
    return {
        "poly_norm_fwd": dict(X=t, W=t, B=t, Y=t, RSTD=f32, n_cols="i32", eps="fp32"),
        "poly_norm_bwd": dict(
            X=t, DY=t, W=t, RSTD=f32, DX=t, DW_PART=f32, DB_PART=f32, n_rows="i32", n_cols="i32"
        ),
        "poly_relu_fwd": dict(X=t, W=t, B=t, Y=t, n_elem="i32"),
        "poly_relu_bwd": dict(X=t, DY=t, W=t, DX=t, DW_PART=f32, DB_PART=f32, n_elem="i32"),
        "poly_norm_glu_fwd": dict(X=t, W=t, B=t, Y=t, RSTD=f32, n_cols="i32", eps="fp32"),
        "poly_norm_glu_bwd": dict(
            X=t, DY=t, W=t, B=t, RSTD=f32, DX=t, DW_PART=f32, DB_PART=f32, n_rows="i32",
            n_cols="i32",
        ),
        "poly_relu_glu_fwd": dict(X=t, W=t, B=t, Y=t, n_cols="i32", n_col_blocks="i32"),
        "poly_relu_glu_bwd": dict(
            X=t, DY=t, W=t, B=t, DX=t, DW_PART=f32, DB_PART=f32, n_rows="i32", n_cols="i32",
            n_col_blocks="i32",
        ),
    }[kernel]  # fmt: skip


KERNELS = (
    "poly_norm_fwd", "poly_norm_bwd", "poly_relu_fwd", "poly_relu_bwd",
    "poly_norm_glu_fwd", "poly_norm_glu_bwd", "poly_relu_glu_fwd", "poly_relu_glu_bwd",
)  # fmt: skip
"""Every kernel of :mod:`.polynorm_triton` and :mod:`.gated_triton`, by launch name."""

WIDTH_KERNELS = tuple(k for k in KERNELS if k.startswith("poly_norm") or "_glu_" in k)
"""Kernels whose launch depends on the row width (the others are flat elementwise)."""


def _launch(kernel: str, width: int | None) -> tuple[object, int, int]:
    """(jit function, BLOCK, num_warps) exactly as :mod:`.polynorm_triton` launches it."""
    from moe_model.kernels import gated_triton as gt
    from moe_model.kernels import polynorm_triton as pt

    if kernel == "poly_norm_glu_fwd":
        return gt._poly_norm_glu_fwd, *gt.poly_norm_glu_fwd_launch(width)
    if kernel == "poly_norm_glu_bwd":
        return gt._poly_norm_glu_bwd, *gt.poly_norm_glu_bwd_launch(width)
    if kernel == "poly_relu_glu_fwd":
        return gt._poly_relu_glu_fwd, *gt.poly_relu_glu_launch(width)
    if kernel == "poly_relu_glu_bwd":
        return gt._poly_relu_glu_bwd, *gt.poly_relu_glu_launch(width)
    if kernel == "poly_norm_fwd":
        return pt._poly_norm_fwd, *pt.poly_norm_fwd_launch(width)
    if kernel == "poly_norm_bwd":
        return pt._poly_norm_bwd, *pt.poly_norm_bwd_launch(width)
    if kernel == "poly_relu_fwd":
        return pt._poly_relu_fwd, pt.RELU_BLOCK, pt.RELU_NUM_WARPS
    if kernel == "poly_relu_bwd":
        return pt._poly_relu_bwd, pt.RELU_BLOCK, pt.RELU_NUM_WARPS
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {list(KERNELS)}")


def _divisible_by_16(kernel: str, signature: dict[str, str], width: int | None) -> dict:
    """Triton's launch-time specialisation: pointers from torch's allocator are 16-byte aligned,
    and an integer argument that is a multiple of 16 is marked so (the row width here)."""
    attrs = {}
    for i, (name, ty) in enumerate(signature.items()):
        aligned = ty.startswith("*") or (name == "n_cols" and width is not None and width % 16 == 0)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def build_kernel(
    kernel: str, arch: int, dtype: torch.dtype, order: int, width: int | None = None,
    num_warps: int | None = None,
) -> KernelBuild:  # fmt: skip
    """Compile ``kernel`` for ``sm_<arch>a`` as its launcher would for rows of ``width``
    (``num_warps`` overrides the launcher's choice, to compare alternatives)."""
    return _build(kernel, arch, dtype, order, width if kernel in WIDTH_KERNELS else None, num_warps)


@functools.cache
def _build(
    kernel: str, arch: int, dtype: torch.dtype, order: int, width: int | None, warps: int | None
) -> KernelBuild:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, block, num_warps = _launch(kernel, width)
    num_warps = warps or num_warps
    signature = _signature(kernel, dtype)
    constexprs = {"ORDER": order, "BLOCK": block}
    src = ASTSource(
        fn=fn,
        signature={**signature, "ORDER": "constexpr", "BLOCK": "constexpr"},
        constexprs=constexprs,
        attrs=_divisible_by_16(kernel, signature, width),
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    usage = ptxas_usage(ptx, arch)
    return KernelBuild(
        kernel=kernel,
        arch=arch,
        dtype=_TRITON_DTYPE[dtype],
        order=order,
        width=width,
        block=block,
        num_warps=num_warps,
        registers=usage["registers"],
        spill_stores=usage["spill_stores"],
        spill_loads=usage["spill_loads"],
        stack_frame=usage["stack_frame"],
        shared=compiled.metadata.shared,
        offset_32bit_ops=tuple(row_offset_32bit_ops(ptx)),
    )


# ---------------------------------------------------------------------------------------------
# ptxas report
# ---------------------------------------------------------------------------------------------

_USAGE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _cache_dir() -> str:
    from triton import knobs

    path = os.path.join(knobs.cache.dir, "ptxas_usage")
    os.makedirs(path, exist_ok=True)
    return path


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill bytes per thread of the PTX's one kernel, from
    ``ptxas -v --gpu-name=sm_<arch>a`` (cached on disk by the PTX text)."""
    key = hashlib.sha256(f"{arch}\n{ptx}".encode()).hexdigest()
    cached = os.path.join(_cache_dir(), key + ".json")
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    # A file of its own per call: two processes (a test run and the script) may build the
    # same kernel at once.
    fd, ptx_file = tempfile.mkstemp(suffix=".ptx", dir=_cache_dir())
    with os.fdopen(fd, "w") as f:
        f.write(ptx)
    try:
        proc = subprocess.run(
            [_ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}a", ptx_file, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        os.remove(ptx_file)
    log = proc.stdout + proc.stderr
    usage = {}
    for name, pattern in _USAGE.items():
        m = pattern.search(log)
        if m is None:
            raise RuntimeError(f"ptxas -v for sm_{arch}a printed no '{name}' line:\n{log}")
        usage[name] = int(m.group(1))
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=_cache_dir())
    with os.fdopen(fd, "w") as f:
        json.dump(usage, f)
    os.replace(tmp, cached)
    return usage


# ---------------------------------------------------------------------------------------------
# 64-bit row offsets
# ---------------------------------------------------------------------------------------------

_REG = re.compile(r"%[a-z]+\d*(?:\.[xyz])?")
_IMMEDIATE = re.compile(r"^-?(?:0[xX][0-9a-fA-F]+|\d+)$")
# Integer multiplies whose result stays 32 bits wide (the .wide forms give 64-bit products).
_NARROW_MUL = re.compile(r"^(?:mul|mad|mul24|mad24)\.lo\.[su]32$")
_NARROW_SHL = "shl.b32"


def _instructions(ptx: str) -> list[tuple[str, list[str], str]]:
    """(opcode, operands, line) of each PTX instruction."""
    out = []
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip().rstrip(";")
        if not line or line[0] in ".${}":
            continue
        if line.startswith("@"):  # predicated: drop the guard
            line = line.split(None, 1)[1] if " " in line else ""
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        opcode, rest = parts
        out.append((opcode, [o.strip() for o in rest.split(",")], raw.strip()))
    return out


def _may_wrap(factor: str, is_shift: bool) -> bool:
    """Whether multiplying a value below 2**31 (a program or loop index) by ``factor`` can pass
    2**32: any runtime register can; a constant up to 2 (a shift by 1) cannot, which is why
    LLVM may legally narrow ``(int64) pid * 2`` to a 32-bit shift feeding ``mad.wide.u32``."""
    if not _IMMEDIATE.match(factor):
        return True
    value = int(factor, 0)
    return value > 1 if is_shift else abs(value) > 2


def row_offset_32bit_ops(ptx: str) -> list[str]:
    """PTX lines that multiply a value derived from the program id (``%ctaid``) in 32 bits by
    a factor that can make it wrap.

    Forward taint: a register is derived from the program id when an instruction computes it
    from ``%ctaid`` or from a derived register (loop counters included: iterated to a fixed
    point). Loads end the chain: what a load returns is data, not an index. ``row * n_cols``
    computed in 32 bits shows as ``mul.lo.s32`` (or ``mad.lo``, or ``shl.b32`` for a
    power-of-two constant) of a derived register; the safe form widens first (``mul.wide``, or
    ``cvt`` to 64 bits then ``mul.lo.s64``).
    """
    instrs = [i for i in _instructions(ptx) if not i[0].startswith(("ld.", "st.", "atom.", "red."))]

    def derived(reg: str) -> bool:
        return reg.startswith("%ctaid") or reg in tainted

    tainted: set[str] = set()
    changed = True
    while changed:
        changed = False
        for _, operands, _ in instrs:
            dest, sources = operands[0], [r for o in operands[1:] for r in _REG.findall(o)]
            if dest not in tainted and any(derived(s) for s in sources):
                tainted.add(dest)
                changed = True
    flagged = []
    for opcode, operands, line in instrs:
        if _NARROW_MUL.match(opcode) and len(operands) >= 3:
            a, b = operands[1], operands[2]
            if (derived(a) and _may_wrap(b, False)) or (derived(b) and _may_wrap(a, False)):
                flagged.append(line)
        elif opcode == _NARROW_SHL and len(operands) >= 3:
            if derived(operands[1]) and _may_wrap(operands[2], True):
                flagged.append(line)
    return flagged
