"""CUDA's host-sync rules, checked on CPU: record the ops that would make the host wait for a GPU.

On CUDA some ops cannot return before the device has computed a value, because the host needs
it: an output size that depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean
mask indexing, ``repeat_interleave`` without ``output_size``, ``bincount``, which reads min and
max in SummaryOps.cu, ``histc`` without a range), a Python number (``item``, ``tolist``,
``bool(t)``: ``aten._local_scalar_dense``), or a copy to host memory. Each stalls the CPU until the
GPU queue drains, so the host stops running ahead to launch kernels (and under torch.compile
each breaks the graph). On CPU these ops are free and nothing shows them: ``record_cuda_syncs``
lists them while a step runs, each with the project function that called it.

Two layers, because on CPU some of these never reach the dispatcher: a ``TorchDispatchMode``
sees aten ops (also inside autograd's backward, also ops that torch functions decompose into),
and a ``TorchFunctionMode`` sees the Python calls that copy to the host, which on a CPU tensor
are no-ops below Python (``Tensor.tolist``, ``.cpu()``, ``.numpy()``).

What this emulation cannot see (a GPU run with ``torch.cuda.set_sync_debug_mode("error")``
would): syncs inside CUDA kernels or libraries that do not go through an aten op (a cuBLAS or
CUTLASS fallback path copying ``offs`` to the host, NCCL waits, ``cudaMalloc`` when the caching
allocator grows or frees, non-pinned host->device copies), ``.to(device)`` calls whose target is
the CPU only because the test runs on one (a ``.to(self.device)`` is not flagged), and syncs in
code paths that only run on CUDA (``device.type == "cuda"`` branches, Triton dispatch).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

REPO = Path(__file__).resolve().parents[1]
PROJECT_DIRS = ("moe_model", "olmo")
"""Where the recorded op's caller is looked for: the project's packages (else the first frame
outside torch)."""

_DATA_DEPENDENT_SIZE = "output size depends on the data: the host reads it from the device"

SYNCING_OPS: dict[object, str] = {
    aten.bincount.default: "bincount reads the input's min and max to size its output",
    aten.nonzero.default: _DATA_DEPENDENT_SIZE,
    aten.masked_select.default: _DATA_DEPENDENT_SIZE,
    aten._unique.default: _DATA_DEPENDENT_SIZE,
    aten._unique2.default: _DATA_DEPENDENT_SIZE,
    aten.unique_dim.default: _DATA_DEPENDENT_SIZE,
    aten.unique_consecutive.default: _DATA_DEPENDENT_SIZE,
    aten.unique_dim_consecutive.default: _DATA_DEPENDENT_SIZE,
    aten._local_scalar_dense.default: "reads a tensor value as a Python number (item, bool, int)",
    aten.equal.default: "returns a Python bool",
}
"""Aten ops that always sync on CUDA, with why."""

_SCALAR_TO_HOST = "copies a device tensor to host memory"
HOST_CALLS: dict[str, str] = {
    "tolist": _SCALAR_TO_HOST,
    "cpu": _SCALAR_TO_HOST,
    "numpy": _SCALAR_TO_HOST,
    "__array__": _SCALAR_TO_HOST,
}
"""Tensor methods that copy to the host; on a CPU tensor they never reach the dispatcher."""


@dataclass(frozen=True)
class Sync:
    """One recorded op that would sync on CUDA."""

    op: str
    """The aten op or Tensor method."""
    reason: str
    where: str
    """``path/in/repo.py::function`` of the innermost project frame that ran it."""
    line: int

    def __str__(self) -> str:
        return f"{self.op} at {self.where}:{self.line} ({self.reason})"


def _bool_index(indices) -> bool:
    return any(
        i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


def sync_reason(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` syncs on CUDA, or None when it does not."""
    if func in SYNCING_OPS:
        return SYNCING_OPS[func]
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size sums the repeats on the host"
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default) and _bool_index(args[1]):  # fmt: skip
        return "boolean-mask indexing runs nonzero on the mask"
    if func is aten.histc.default:
        low = args[2] if len(args) > 2 else kwargs.get("min", 0)
        high = args[3] if len(args) > 3 else kwargs.get("max", 0)
        if low == high:
            return "histc without a range reads the input's min and max"
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
        if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
            return _SCALAR_TO_HOST
    return None


def _frame_name(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename).resolve()
    parts = path.parts
    # A virtual environment inside the checkout (.venv) holds library code, not the project's.
    if path.is_relative_to(REPO) and not {"site-packages", "dist-packages"} & set(parts):
        return f"{path.relative_to(REPO).as_posix()}::{frame.name}"
    # Library code by its package path: torch/optim/adamw.py, not the site-packages prefix.
    top = max((i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")),
              default=len(parts) - 2)  # fmt: skip
    return f"{'/'.join(parts[top + 1:])}::{frame.name}"


_WRAPPER_FRAMES = ("/torch/utils/_python_dispatch.py", "/torch/overrides.py", "/torch/_compile.py",
                   "/torch/_dynamo/eval_frame.py")  # fmt: skip
"""Frames of the modes and of torch's decorators: never where an op comes from."""


def _is_project(frame: traceback.FrameSummary) -> bool:
    path = Path(frame.filename).resolve()
    return path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in PROJECT_DIRS


def _caller() -> tuple[str, int]:
    """Where the op ran: ``file::function`` of the innermost project frame (moe_model/, olmo/),
    followed by `` > library/file.py::function`` when the op itself came from library code below
    it (torch.optim, FSDP, ...); and the project frame's line."""
    frames = [
        f for f in traceback.extract_stack()[:-1]
        if Path(f.filename).resolve() != Path(__file__).resolve()
        and not f.filename.endswith(_WRAPPER_FRAMES)
    ]  # fmt: skip
    if not frames:
        return "<unknown>", 0
    innermost = frames[-1]
    for frame in reversed(frames):
        if _is_project(frame):
            where = _frame_name(frame)
            if not _is_project(innermost):
                where += f" > {_frame_name(innermost)}"
            return where, frame.lineno
    return _frame_name(innermost), innermost.lineno


class CudaSyncDispatchMode(TorchDispatchMode):
    """Records every aten op that would sync on CUDA (``sync_reason``) into ``syncs``."""

    def __init__(self, syncs: list[Sync]):
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            where, line = _caller()
            self.syncs.append(Sync(str(func.overloadpacket.__name__), reason, where, line))
        return func(*args, **kwargs)


class HostCallFunctionMode(TorchFunctionMode):
    """Records the Tensor methods of ``HOST_CALLS`` into ``syncs``."""

    def __init__(self, syncs: list[Sync]):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_CALLS and getattr(torch.Tensor, name, None) is func:
            where, line = _caller()
            self.syncs.append(Sync(f"Tensor.{name}", HOST_CALLS[name], where, line))
        return func(*args, **(kwargs or {}))


@contextmanager
def record_cuda_syncs() -> Iterator[list[Sync]]:
    """``with record_cuda_syncs() as syncs: step()``: ``syncs`` lists each op of the block that
    would make the host wait for a CUDA device."""
    syncs: list[Sync] = []
    with HostCallFunctionMode(syncs), CudaSyncDispatchMode(syncs):
        yield syncs


def unexpected(syncs: list[Sync], allowed: dict[tuple[str, str], str]) -> list[Sync]:
    """The syncs whose (op, where) is not a key of ``allowed`` (values: why it is allowed)."""
    return [s for s in syncs if (s.op, s.where) not in allowed]


__all__ = [
    "HOST_CALLS",
    "SYNCING_OPS",
    "CudaSyncDispatchMode",
    "HostCallFunctionMode",
    "Sync",
    "record_cuda_syncs",
    "sync_reason",
    "unexpected",
]

