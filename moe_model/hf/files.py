"""Tensor streams for conversions: read one tensor at a time, write one tensor at a time.

A conversion is a list of :class:`PlannedTensor` (name, shape, dtype and a function that makes the
tensor when it is written). Writers call ``make()`` for one tensor, write it and drop it, so
converting OLMoE-1B-7B never holds a second copy of the model: peak memory is about one source
tensor plus what one output tensor needs (see benchmarks/bench_convert.py).

Sources (:class:`TensorSource`): an in-memory state dict, safetensors files (HF directories and
unsharded checkpoints) and, in :mod:`olmo.checkpoint_io`, torch.distributed.checkpoint
directories. Outputs go into a temporary sibling directory that is renamed into place at the
end (:func:`atomic_output_dir`), so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moe_model.errors import ConversionError, OutputExistsError

__all__ = [
    "CachedSource",
    "DictSource",
    "PlannedTensor",
    "SafetensorsSource",
    "TensorSource",
    "atomic_output_dir",
    "check_tensors",
    "materialize",
    "parse_size",
    "plan_rename",
    "write_safetensors",
    "write_safetensors_shards",
]


class TensorSource(Protocol):
    """Named tensors whose shapes and dtypes are known before any is read."""

    def keys(self) -> list[str]: ...

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the shape and dtype of ``key`` (nothing read)."""
        ...

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` on the CPU."""
        ...


class DictSource:
    """A state dict held in memory (meta tensors allowed: then only shapes can be asked)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict

    def keys(self) -> list[str]:
        return list(self.state_dict)

    def meta(self, key: str) -> torch.Tensor:
        return self.state_dict[key].to("meta")

    def get(self, key: str) -> torch.Tensor:
        return self.state_dict[key].detach()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` (without ``__metadata__``) and where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{str(path)!r} is not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError, MemoryError, OverflowError):
            raise ConversionError(f"{str(path)!r} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{str(path)!r} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    return header, 8 + size


def _tensor_entry(path: Path, key: str, info: object) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    """(dtype, shape, data offsets) of one header entry, checked for form."""
    try:
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        ok = (all(isinstance(n, int) and n >= 0 for n in shape)
              and len(offsets) == 2 and all(isinstance(n, int) for n in offsets))
    except (TypeError, KeyError):
        ok = False
    if not ok:
        raise ConversionError(f"{str(path)!r} is not a safetensors file (bad header entry for {key!r})")
    dtype = _SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise ConversionError(f"tensor {key!r} in {path} has unsupported dtype {dtype_name}")
    return dtype, list(shape), (offsets[0], offsets[1])


class SafetensorsSource:
    """Tensors of one or more safetensors files, each read on demand with plain file reads.

    Not memory-mapped (as ``safe_open`` is): mapped file pages would count in the process's
    resident memory and pile up to the size of the files over a conversion.
    """

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        # name -> (file, byte offset, byte length); shapes and dtypes as meta tensors.
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._meta: dict[str, torch.Tensor] = {}
        for path in self.files:
            if not path.is_file():
                raise ConversionError(f"weights file {str(path)!r} is missing")
            header, data_start = _read_header(path)
            data_end = data_start
            for key, info in header.items():
                if key in self._where:
                    raise ConversionError(f"tensor {key!r} is in both {self._where[key][0]} and {path}")
                dtype, shape, (begin, end) = _tensor_entry(path, key, info)
                meta = torch.empty(shape, dtype=dtype, device="meta")
                if not 0 <= begin <= end or end - begin != meta.numel() * meta.element_size():
                    raise ConversionError(f"tensor {key!r} in {path}: byte range does not fit its shape")
                self._where[key] = (path, data_start + begin, end - begin)
                self._meta[key] = meta
                data_end = max(data_end, data_start + end)
            # A cut-off download or copy: refused here, before any output is written, rather
            # than when the writer reaches the first missing tensor.
            size = path.stat().st_size
            if size < data_end:
                raise ConversionError(
                    f"{str(path)!r} is truncated: {size} bytes, but its header places tensor data "
                    f"up to byte {data_end}"
                )

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> torch.Tensor:
        return self._meta[key]

    def get(self, key: str) -> torch.Tensor:
        path, offset, length = self._where[key]
        meta = self._meta[key]
        buf = torch.empty(length, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf.numpy()) != length:
                raise ConversionError(f"{path} ends inside tensor {key!r} (truncated file)")
        return buf.view(meta.dtype).reshape(meta.shape)


class CachedSource:
    """Keeps the last ``size`` tensors read: a stacked expert tensor feeds E outputs in a row."""

    def __init__(self, source: TensorSource, size: int = 1):
        self.source = source
        self.size = size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def keys(self) -> list[str]:
        return self.source.keys()

    def meta(self, key: str) -> torch.Tensor:
        return self.source.meta(key)

    def get(self, key: str) -> torch.Tensor:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        tensor = self.source.get(key)
        self._cache[key] = tensor
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return tensor


@dataclass
class PlannedTensor:
    """One output tensor: known shape and dtype, made only when it is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    def build(self) -> torch.Tensor:
        tensor = self.make().to(self.dtype).contiguous()
        if tuple(tensor.shape) != self.shape:
            raise ConversionError(
                f"tensor {self.name!r} came out with shape {tuple(tensor.shape)}; planned {self.shape}"
            )
        return tensor


def plan_rename(
    source: TensorSource, rename: Callable[[str], str], dtype: torch.dtype | None = None,
    names: list[str] | None = None,
) -> list[PlannedTensor]:
    """Tensors of ``source`` under new names, optionally cast to ``dtype``.

    ``names`` (output names, in the order wanted; default: every source tensor in source order)
    are looked up in the source as ``rename(name)``.
    """
    plan = []
    if names is None:
        pairs = [(rename(key), key) for key in source.keys()]
    else:
        pairs = [(name, rename(name)) for name in names]
    for name, key in pairs:
        meta = source.meta(key)
        out_dtype = dtype if dtype is not None and meta.is_floating_point() else meta.dtype
        plan.append(PlannedTensor(name, tuple(meta.shape), out_dtype, lambda key=key: source.get(key)))
    return plan


def materialize(plan: list[PlannedTensor]) -> dict[str, torch.Tensor]:
    """The whole plan in memory (small models, tests)."""
    return {p.name: p.build() for p in plan}


def check_tensors(
    found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str, hint: str
) -> None:
    """``found`` must have exactly the names and shapes of ``expected`` (meta tensors welcome).

    Raises ConversionError naming the first missing, unexpected or mis-shaped tensor.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{what} lacks tensor {missing[0]!r}{more} that {hint} needs")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{what} has tensor {unexpected[0]!r}{more} that {hint} has no place for")
    for key, want in expected.items():
        if tuple(found[key].shape) != tuple(want.shape):
            raise ConversionError(
                f"{what}: tensor {key!r} has shape {tuple(found[key].shape)}; {hint} expects "
                f"{tuple(want.shape)}"
            )


# ---- writing --------------------------------------------------------------------------------


def parse_size(size: str | int) -> int:
    """'5GB' -> 5 * 10**9 (decimal units, as transformers' max_shard_size); ints pass through."""
    if isinstance(size, int):
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise ConversionError(f"max_shard_size={size!r}; expected a size like '5GB' or '500MB'")


def write_safetensors(
    path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None
) -> None:
    """Write one safetensors file, one tensor at a time.

    The header (names, dtypes, shapes, byte offsets) is known from the plan, so it is written
    first and each tensor is made, written and dropped in turn; ``safetensors.torch.save_file``
    would need every tensor in memory at once.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for p in plan:
        if p.dtype not in _SAFETENSORS_NAMES:
            raise ConversionError(f"tensor {p.name!r}: dtype {p.dtype} cannot be stored in safetensors")
        header[p.name] = {"dtype": _SAFETENSORS_NAMES[p.dtype], "shape": list(p.shape),
                          "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so the data starts 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for p in plan:
            tensor = p.build()
            # Raw little-endian bytes; bf16 has no numpy dtype, so view everything as bytes.
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor


def write_safetensors_shards(
    out_dir: Path, plan: list[PlannedTensor], max_shard_size: str | int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index past the size.

    Tensors stay in plan order; a shard closes before the tensor that would take it past
    ``max_shard_size`` (a tensor larger than that gets a shard of its own), as transformers does.
    Returns the file names.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    metadata = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(out_dir / name, shard, metadata)
    index = {
        "metadata": {"total_size": sum(p.nbytes for p in plan)},
        "weight_map": {p.name: name for name, shard in zip(names, shards) for p in shard},
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to write into; rename it to ``out_dir`` on success.

    ``out_dir`` must not exist (or be an empty directory), checked before any work. On any error
    the temporary directory is removed, and so are the parent directories made for it (those
    still empty), so nothing partial is left behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(f"output {str(out_dir)!r} already exists and is not empty; pick a new one")
    made = []  # missing ancestors, deepest first
    parent = out_dir.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        try:
            yield tmp
            if out_dir.exists():
                out_dir.rmdir()  # empty, checked above
            tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        for directory in made:
            try:
                directory.rmdir()
            except OSError:  # something else wrote there meanwhile: theirs to keep
                break
        raise
