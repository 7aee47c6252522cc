"""Token files: globs and object URLs resolved, the token dtype, cheap checks of each file."""

import glob
import os

import numpy as np

from moe_model.errors import DataError, ObjectStoreError
from olmo import object_store
from olmo.token_files import file_size, open_tokens

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# Tokens read per sampled chunk when checking ids: enough to catch a wrong dtype or tokenizer
# (they corrupt every position), cheap enough to run on terabyte corpora before every run.
_SAMPLE_CHUNK_TOKENS = 4096
_SAMPLE_RANDOM_CHUNKS = 4


def resolve_paths(patterns: list[str] | str, key: str = "data.paths") -> list[str]:
    """Expand files and globs into a sorted, de-duplicated file list; DataError if any matches nothing."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    if not patterns:
        raise DataError(
            f"{key} is empty; expected token files or globs such as 'data/tokens/*.npy'"
        )
    out: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if object_store.is_remote(pattern):
            matches = _resolve_objects(pattern, key)
        elif glob.has_magic(pattern):
            # Sorted: glob order is filesystem order, and the data order and the resume
            # fingerprint must not depend on it.
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(pattern):
            raise DataError(
                f"{key}: '{pattern}' is a directory; expected files or a glob such as "
                f"'{os.path.join(pattern, '*.npy')}'"
            )
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise DataError(
                f"{key}: '{pattern}' matches no files; expected dolma token files "
                f"(run scripts/prepare_sample_data.sh, or scripts/tokenize.sh on your documents)"
            )
        out.extend(m for m in matches if m not in out)
    return out


def _resolve_objects(pattern: str, key: str) -> list[str]:
    """Object URLs a `s3://bucket/prefix/*.npy` pattern (or one object's URL) names, sorted."""
    try:
        # Bucket and credentials first: their one-line causes beat "matches no files".
        object_store.check_access(pattern, write=False, what=key)
        matches = [o.url for o in object_store.glob_objects(pattern)]
        if not matches and not object_store.has_magic(pattern):
            if object_store.list_objects(object_store.join(pattern, "")):
                raise DataError(
                    f"{key}: '{pattern}' is a prefix; expected objects or a glob such as "
                    f"'{object_store.join(pattern, '*.npy')}'"
                )
    except ObjectStoreError as err:
        message = str(err)
        raise DataError(message if message.startswith(key) else f"{key}: {message}") from None
    return matches


def resolve_dtype(dtype: str | None, vocab_size: int, key: str = "data.dtype") -> type:
    """The numpy token dtype: the configured one, or the smallest that holds vocab_size."""
    if dtype is None:
        return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    if dtype not in _DTYPES:
        raise DataError(f"{key}: '{dtype}' is not supported; expected 'uint16', 'uint32' or null")
    np_dtype = _DTYPES[dtype]
    max_id = int(np.iinfo(np_dtype).max)
    if vocab_size - 1 > max_id:
        raise DataError(
            f"{key}: {dtype} holds token ids up to {max_id:,d} but vocab_size is {vocab_size:,d}; "
            f"use uint32 (and tokenize with --dtype uint32)"
        )
    return np_dtype


def _check_token_file(path: str, np_dtype: type, vocab_size: int, key: str) -> int:
    """Cheap checks of one token file (size, sampled ids); returns its number of tokens."""
    itemsize = np.dtype(np_dtype).itemsize
    dtype_name = np.dtype(np_dtype).name
    size = file_size(path)
    if size == 0:
        raise DataError(f"{key}: '{path}' is empty (0 bytes); expected a dolma token file")
    if size % itemsize != 0:
        raise DataError(
            f"{key}: '{path}' has {size:,d} bytes, not a multiple of {itemsize} ({dtype_name}); "
            f"expected a {dtype_name} token file (is data.dtype right, is this a token file?)"
        )
    n_tokens = size // itemsize
    # Object URLs are sampled by byte ranges; nothing is downloaded whole.
    tokens = open_tokens(path, np_dtype)
    # First and last chunk plus a few random ones: a wrong dtype or tokenizer shows up
    # everywhere, so a sample finds it without reading the whole file. The seed is fixed so
    # a check that passed once passes again.
    chunk = min(_SAMPLE_CHUNK_TOKENS, n_tokens)
    starts = {0, n_tokens - chunk}
    rng = np.random.default_rng(n_tokens)
    starts.update(int(s) for s in rng.integers(0, n_tokens - chunk + 1, _SAMPLE_RANDOM_CHUNKS))
    for start in sorted(starts):
        ids = np.asarray(tokens[start : start + chunk])
        bad = np.flatnonzero(ids >= vocab_size)
        if bad.size:
            pos = start + int(bad[0])
            raise DataError(
                f"{key}: '{path}' has token id {int(tokens[pos]):,d} at position {pos:,d}, "
                f"expected ids < vocab_size {vocab_size:,d} (wrong data.dtype or tokenizer?)"
            )
    del tokens
    return n_tokens


def _check_file_set(
    patterns: list[str], key: str, np_dtype: type, vocab_size: int, sequence_length: int
) -> tuple[list[str], int, int]:
    """Resolve and check a set of files; returns (paths, tokens, whole sequences)."""
    paths = resolve_paths(patterns, key)
    n_tokens = n_sequences = 0
    for path in paths:
        n = _check_token_file(path, np_dtype, vocab_size, key)
        n_tokens += n
        # Per file, as NumpyFSLDataset counts: sequences never span two files.
        n_sequences += n // sequence_length
    return paths, n_tokens, n_sequences


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} is {value!r}; expected a positive integer")
