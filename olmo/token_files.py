"""Token files on a local disk or in object storage, read the same way.

A local file is a numpy memmap. An object (``s3://``, ``r2://``, ``weka://``) is read by HTTP
byte ranges, one ranged GET per sequence, never downloaded whole -- unless a local cache
directory is given, then each object is copied there once (named by its ETag, so a changed
object is fetched again) and memmapped. Every ranged read is conditional on the ETag seen when
the dataset was built: an object replaced during a run is an error, not silently other tokens.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_model.errors import DataError, ObjectStoreError
from olmo import object_store
from olmo.object_store import ObjectInfo, ObjectURL, is_remote

__all__ = ["ObjectStoreReads", "file_info", "file_size", "open_tokens", "read_tokens"]


def file_info(path: str) -> ObjectInfo:
    """Size and (for objects) ETag of a token file (one HEAD per call for an object)."""
    if is_remote(path):
        return object_store.stat(str(path))
    return ObjectInfo(str(path), os.path.getsize(path), "")


def file_size(path: str) -> int:
    return file_info(path).size


class RemoteTokens:
    """A read-only token array over one object: ``tokens[a:b]`` is one ranged GET."""

    def __init__(self, url: str, dtype: Any, info: ObjectInfo | None = None):
        self.url, self.dtype = url, np.dtype(dtype)
        self.info = info or file_info(url)

    def __len__(self) -> int:
        return self.info.size // self.dtype.itemsize

    def __getitem__(self, index: slice | int) -> np.ndarray | Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("RemoteTokens supports contiguous slices only")
            return read_tokens(self.url, start, stop, self.dtype, info=self.info)
        return read_tokens(self.url, int(index), int(index) + 1, self.dtype, info=self.info)[0]


def _cached_copy(url: str, info: ObjectInfo, cache_dir: str) -> Path:
    u = ObjectURL.parse(url)
    local = Path(cache_dir) / u.scheme / u.bucket / f"{u.key}.{info.etag}"
    if not local.is_file() or local.stat().st_size != info.size:
        object_store.download_file(url, local)
    return local


@functools.lru_cache(maxsize=1024)
def _cached_memmap(info: ObjectInfo, dtype: Any, cache_dir: str) -> np.memmap:
    # Opened once per process and object version: a memmap per sequence costs more than the read.
    return np.memmap(_cached_copy(info.url, info, cache_dir), dtype=dtype, mode="r")


def open_tokens(path: str, dtype: Any, cache_dir: str | None = None, info: ObjectInfo | None = None) -> Any:
    """``tokens[a:b]``-sliceable array of a token file (memmap, cached copy or ranged reads);
    ``info``: the object's size and ETag as already seen (else one HEAD)."""
    if not is_remote(path):
        return np.memmap(path, dtype=dtype, mode="r")
    info = info or file_info(path)
    if cache_dir:
        return _cached_memmap(info, np.dtype(dtype), cache_dir)
    return RemoteTokens(path, dtype, info)


def read_tokens(path: str, start: int, stop: int, dtype: Any, cache_dir: str | None = None,
                info: ObjectInfo | None = None) -> np.ndarray:  # fmt: skip
    """Tokens ``[start, stop)`` of a token file; for an object, only if its ETag is still
    ``info``'s (the version the run started on)."""
    if not is_remote(path) or cache_dir:
        return np.asarray(open_tokens(path, dtype, cache_dir, info)[start:stop])
    itemsize = np.dtype(dtype).itemsize
    info = info or file_info(path)
    try:
        data = object_store.read_range(path, start * itemsize, (stop - start) * itemsize, if_match=info.etag)
    except ObjectStoreError as err:
        if "PreconditionFailed" in str(err) or "changed since" in str(err):
            raise DataError(
                f"{path}: the object changed during the run (ETag is no longer {info.etag}); "
                f"expected token files to stay fixed while training reads them"
            ) from None
        raise
    return np.frombuffer(data, dtype=dtype)


class ObjectStoreReads:
    """Mixin for olmo-core's FSL datasets: sizes, reads and the fingerprint of object URLs
    through :mod:`olmo.object_store` (our retry policy, credentials check, ETag, cache);
    local files are left to olmo-core."""

    cache_dir: str | None = None

    def object_info(self, path) -> ObjectInfo:
        """Size and ETag of a file of this dataset as first seen (one HEAD per object): every
        read and the fingerprint use this version, so a change shows as an error, not a mix."""
        infos = self.__dict__.setdefault("_object_infos", {})
        if str(path) not in infos:
            infos[str(path)] = file_info(str(path))
        return infos[str(path)]

    def _get_file_size_and_length(self, path, idx, dtype=None):
        if not is_remote(path):
            return super()._get_file_size_and_length(path, idx, dtype)  # type: ignore[misc]
        size = self.object_info(path).size
        item_size = (dtype or self.dtype)(0).itemsize  # type: ignore[attr-defined]
        return size, size // (item_size * self.sequence_length)  # type: ignore[attr-defined]

    def _read_chunk_from_array(self, path, index: int, dtype=None) -> torch.Tensor:
        if not is_remote(path):
            return super()._read_chunk_from_array(path, index, dtype)  # type: ignore[misc]
        start = index * self.sequence_length  # type: ignore[attr-defined]
        tokens = read_tokens(str(path), start, start + self.sequence_length,  # type: ignore[attr-defined]
                             dtype or self.dtype, self.cache_dir, self.object_info(path))  # type: ignore[attr-defined]  # fmt: skip
        return torch.tensor(tokens.astype(np.int_), dtype=torch.long)

    def etags(self) -> list[str]:
        """The ETag of each file ('' for local files), in path order."""
        return [self.object_info(p).etag for p in self.paths]  # type: ignore[attr-defined]

    @property
    def fingerprint(self) -> str:
        """olmo-core's (or the mixture's) fingerprint, plus each object's ETag when any file is
        remote: an object rewritten with the same size is a different dataset."""
        return self.with_etags(super().fingerprint)  # type: ignore[misc]

    def with_etags(self, base: str) -> str:
        """``base`` (a fingerprint), extended by the objects' ETags when any file is remote."""
        etags = self.etags()
        if not any(etags):
            return base
        import hashlib

        return hashlib.sha256((base + "," + ",".join(etags)).encode()).hexdigest()
