"""S3-compatible object storage: URLs, clients from the environment, ranged reads, listing,
uploads with retry, and the one-line errors preflight reports.

Schemes and endpoints follow OLMo-core's ``olmo_core.io``:

* ``s3://bucket/key``: AWS or any S3 API; boto3 reads ``AWS_ENDPOINT_URL`` (a local or
  on-premise server), credentials from its usual chain, the profile from ``S3_PROFILE``.
* ``r2://bucket/key``: Cloudflare R2 at ``R2_ENDPOINT_URL`` (required), profile ``R2_PROFILE``.
* ``weka://bucket/key``: WEKA's S3 front end at ``WEKA_ENDPOINT_URL`` (required), profile
  ``WEKA_PROFILE``.

OLMo-core requires the R2/WEKA profile variables; here they are optional (the default
credential chain otherwise), and unlike OLMo-core a missing credential is an error, not a
silent switch to unsigned (anonymous) requests.

Every operation retries transient failures (connection cut, timeout, 5xx, throttling) with
exponential backoff, then raises :class:`ObjectStoreError` naming the URL, the operation and
the last cause. Permanent failures (no such bucket, access denied) are not retried.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from moe_model.errors import ObjectStoreError

__all__ = [
    "SCHEMES",
    "ObjectInfo",
    "ObjectURL",
    "RetryPolicy",
    "check_access",
    "delete_object",
    "delete_prefix",
    "download_file",
    "exists",
    "get_bytes",
    "glob_objects",
    "has_magic",
    "is_remote",
    "join",
    "list_objects",
    "put_bytes",
    "read_range",
    "stat",
    "upload_file",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SchemeEnv:
    """Where one URL scheme's endpoint and profile come from (environment variable names)."""

    endpoint_var: str | None
    """None: boto3's own resolution (AWS_ENDPOINT_URL, else AWS)."""
    profile_var: str


SCHEMES: dict[str, SchemeEnv] = {
    "s3": SchemeEnv(endpoint_var=None, profile_var="S3_PROFILE"),
    "r2": SchemeEnv(endpoint_var="R2_ENDPOINT_URL", profile_var="R2_PROFILE"),
    "weka": SchemeEnv(endpoint_var="WEKA_ENDPOINT_URL", profile_var="WEKA_PROFILE"),
}
_URL = re.compile(r"(?P<scheme>[a-z0-9]+)://(?P<bucket>[^/]+)/?(?P<key>.*)")


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for an object-storage URL of a supported scheme (``s3://``, ``r2://``, ``weka://``)."""
    if path is None:
        return False
    match = _URL.fullmatch(str(path))
    return match is not None and match["scheme"] in SCHEMES


@dataclass(frozen=True)
class ObjectURL:
    """A parsed ``scheme://bucket/key`` (the key may be a prefix, or empty)."""

    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> ObjectURL:
        match = _URL.fullmatch(str(url))
        if match is None or match["scheme"] not in SCHEMES:
            raise ObjectStoreError(
                f"{url!r} is not an object-storage URL; expected one of "
                f"{', '.join(s + '://bucket/key' for s in SCHEMES)}"
            )
        return cls(match["scheme"], match["bucket"], match["key"])

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    def child(self, key: str) -> ObjectURL:
        return ObjectURL(self.scheme, self.bucket, key)


def join(url: str, *parts: str) -> str:
    """``url/part/...`` without doubled slashes."""
    out = str(url).rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its URL, size in bytes and ETag (changes whenever its content does)."""

    url: str
    size: int
    etag: str


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently an operation is retried on a transient failure."""

    attempts: int = 5
    """Tries per operation (on top of botocore's own per-request retries)."""
    base_delay_s: float = 0.5
    """Wait before the second try; doubled after each failure."""
    max_delay_s: float = 8.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """OBJECT_STORE_ATTEMPTS / OBJECT_STORE_RETRY_DELAY override the defaults (tests, flaky links)."""
        return cls(
            attempts=int(os.environ.get("OBJECT_STORE_ATTEMPTS", cls.attempts)),
            base_delay_s=float(os.environ.get("OBJECT_STORE_RETRY_DELAY", cls.base_delay_s)),
        )

    def delay(self, failures: int) -> float:
        return min(self.base_delay_s * 2 ** (failures - 1), self.max_delay_s)


# --- clients ---------------------------------------------------------------------------------


def _client_key(scheme: str) -> tuple:
    env = SCHEMES[scheme]
    names = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
             env.profile_var, env.endpoint_var or ""]  # fmt: skip
    # The pid: a boto3 client must not be shared with a forked data-loader worker.
    return (scheme, os.getpid(), *(os.environ.get(n) for n in names))


@functools.lru_cache(maxsize=16)
def _client_for(key: tuple) -> Any:
    import boto3
    from botocore.config import Config

    scheme = key[0]
    env = SCHEMES[scheme]
    endpoint = os.environ.get(env.endpoint_var) if env.endpoint_var else None
    if env.endpoint_var and not endpoint:
        raise ObjectStoreError(f"{env.endpoint_var} is not set (the endpoint of {scheme}:// URLs)")
    session = boto3.Session(profile_name=os.environ.get(env.profile_var) or None)
    if session.get_credentials() is None:
        raise ObjectStoreError(
            f"no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
            f"or {env.profile_var})"
        )
    # botocore's "standard" mode already retries throttling, 5xx and connection errors per
    # request; our RetryPolicy wraps whole operations (a multipart upload, a streamed body).
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10,
                    read_timeout=60, max_pool_connections=32)  # fmt: skip
    return session.client("s3", endpoint_url=endpoint, config=config)


def client(scheme: str) -> Any:
    """The boto3 S3 client for ``scheme``, built from the current environment (cached per env)."""
    return _client_for(_client_key(scheme))


# --- errors and retry ------------------------------------------------------------------------


def _error_code(err: BaseException) -> tuple[str, int]:
    response = getattr(err, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


_PERMANENT_CAUSES = {
    "NoSuchBucket": "bucket does not exist",
    "InvalidAccessKeyId": "credentials rejected (unknown access key)",
    "SignatureDoesNotMatch": "credentials rejected (wrong secret key)",
    "AccessDenied": "access denied (no permission for this operation)",
    "NoSuchKey": "object does not exist",
    "InvalidRange": "byte range outside the object",
    "PreconditionFailed": "object changed since it was listed (ETag differs)",
}


def describe(err: BaseException) -> str:
    """A short cause for a boto/botocore error (what a user can act on)."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    if isinstance(err, ObjectStoreError):
        return str(err)
    if isinstance(err, NoCredentialsError):
        return "no credentials found"
    if isinstance(err, EndpointConnectionError):
        return f"cannot reach the endpoint ({err})"
    code, status = _error_code(err)
    if code in _PERMANENT_CAUSES:
        return _PERMANENT_CAUSES[code]
    if status == 404:
        return "not found"
    if status == 403:
        return "access denied (credentials or permissions)"
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _is_transient(err: BaseException) -> bool:
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectionError,
        HTTPClientError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(err, (ConnectionError, ConnectionClosedError, HTTPClientError, ReadTimeoutError,
                        ResponseStreamingError, ConnectionResetError, TimeoutError)):  # fmt: skip
        return True
    code, status = _error_code(err)
    return status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "InternalError")


def _failed(context: str, cause: str) -> ObjectStoreError:
    err = ObjectStoreError(context + cause)
    err.cause = cause  # type: ignore[attr-defined]  # what check_access reports
    return err


def retrying(what: str, url: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """``fn()``, retried with backoff on transient failures; ObjectStoreError naming ``url`` otherwise."""
    policy = policy or RetryPolicy.from_env()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except ObjectStoreError as err:
            if not hasattr(err, "cause"):
                err.cause = str(err)  # type: ignore[attr-defined]
            raise
        except Exception as err:
            if not _is_transient(err):
                raise _failed(f"{url}: {what} failed: ", describe(err)) from err
            if attempt == policy.attempts:
                raise _failed(f"{url}: {what} failed after {policy.attempts} attempts: ",
                              describe(err)) from err
            log.warning("%s %s failed (attempt %d/%d): %s; retrying", what, url, attempt,
                        policy.attempts, describe(err))  # fmt: skip
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


# --- operations ------------------------------------------------------------------------------


def stat(url: str) -> ObjectInfo:
    """Size and ETag of one object (ObjectStoreError 'object does not exist' if absent)."""
    u = ObjectURL.parse(url)

    def head() -> ObjectInfo:
        try:
            r = client(u.scheme).head_object(Bucket=u.bucket, Key=u.key)
        except Exception as err:
            if _error_code(err)[1] == 404:
                raise ObjectStoreError(f"{url}: object does not exist") from err
            raise
        return ObjectInfo(str(u), int(r["ContentLength"]), r["ETag"].strip('"'))

    return retrying("stat", url, head)


def exists(url: str) -> bool:
    try:
        stat(url)
    except ObjectStoreError as err:
        if str(err).endswith("object does not exist"):
            return False
        raise
    return True


def list_objects(url: str) -> list[ObjectInfo]:
    """Every object under the prefix ``url`` (recursively), sorted by key."""
    u = ObjectURL.parse(url)

    def listing() -> list[ObjectInfo]:
        pages = client(u.scheme).get_paginator("list_objects_v2").paginate(Bucket=u.bucket, Prefix=u.key)
        return [
            ObjectInfo(str(u.child(o["Key"])), int(o["Size"]), o["ETag"].strip('"'))
            for page in pages
            for o in page.get("Contents", [])
        ]

    return sorted(retrying("list", url, listing), key=lambda o: o.url)


_MAGIC = re.compile(r"[*?\[]")


def _glob_regex(pattern: str) -> re.Pattern:
    """Shell glob -> regex over keys: ``*`` and ``?`` stay within one path segment, ``**/`` spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 1)) > i:
            body = pattern[i + 1 : end]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def has_magic(url: str) -> bool:
    return _MAGIC.search(ObjectURL.parse(url).key) is not None


def glob_objects(url_pattern: str) -> list[ObjectInfo]:
    """Objects whose key matches the glob in ``url_pattern``, sorted by key; one object if no magic."""
    u = ObjectURL.parse(url_pattern)
    magic = _MAGIC.search(u.key)
    if magic is None:
        try:
            return [stat(url_pattern)]
        except ObjectStoreError as err:
            if str(err).endswith("object does not exist"):
                return []
            raise
    regex = _glob_regex(u.key)
    prefix = u.key[: magic.start()]
    return [o for o in list_objects(str(u.child(prefix))) if regex.fullmatch(ObjectURL.parse(o.url).key)]


def read_range(url: str, start: int, num_bytes: int, if_match: str | None = None) -> bytes:
    """Bytes ``[start, start + num_bytes)`` of an object, by one ranged GET (retried whole);
    with ``if_match`` (an ETag) the read fails if the object has changed since."""
    u = ObjectURL.parse(url)
    extra = {"IfMatch": f'"{if_match}"'} if if_match else {}

    def get() -> bytes:
        r = client(u.scheme).get_object(Bucket=u.bucket, Key=u.key, Range=f"bytes={start}-{start + num_bytes - 1}",
                                        **extra)  # fmt: skip
        data = r["Body"].read()
        if len(data) != num_bytes:
            # A cut connection can end a body early without an exception from urllib3.
            raise ConnectionResetError(f"short read: {len(data)} of {num_bytes} bytes")
        return data

    return retrying(f"read bytes {start}+{num_bytes}", url, get)


def get_bytes(url: str) -> bytes:
    u = ObjectURL.parse(url)
    return retrying("get", url, lambda: client(u.scheme).get_object(Bucket=u.bucket, Key=u.key)["Body"].read())


def put_bytes(url: str, data: bytes) -> None:
    """Write one object (a single PUT: visible whole or not at all)."""
    u = ObjectURL.parse(url)
    retrying("put", url, lambda: client(u.scheme).put_object(Bucket=u.bucket, Key=u.key, Body=data))


def upload_file(path: str | os.PathLike, url: str) -> None:
    """Upload a local file (multipart for large files; an object appears only when complete)."""
    u = ObjectURL.parse(url)
    retrying("upload", url, lambda: client(u.scheme).upload_file(str(path), u.bucket, u.key))


def upload_tree(local_dir: str | os.PathLike, url: str, last: tuple[str, ...] = ()) -> int:
    """Upload every file under ``local_dir`` to ``url/<relative path>``; the relative paths in
    ``last`` go after all others (a reader that looks for them first then finds the rest
    there). Returns the number of files uploaded."""
    root = Path(local_dir)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    ordered = [f for f in files if f not in last] + [f for f in last if f in files]
    for rel in ordered:
        upload_file(root / rel, join(url, rel))
    return len(ordered)


def download_file(url: str, path: str | os.PathLike) -> None:
    u = ObjectURL.parse(url)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.{uuid.uuid4().hex}.part")
    try:
        retrying("download", url, lambda: client(u.scheme).download_file(u.bucket, u.key, str(tmp)))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def delete_object(url: str) -> None:
    """Delete one object (no error if it is absent: S3 deletes are idempotent)."""
    u = ObjectURL.parse(url)
    retrying("delete", url, lambda: client(u.scheme).delete_object(Bucket=u.bucket, Key=u.key))


def delete_prefix(url: str, first: tuple[str, ...] = ()) -> int:
    """Delete every object under ``url/``; the keys named in ``first`` (relative) go first.

    Deleting a checkpoint's completion marker first means a deletion cut short leaves an
    incomplete checkpoint, never one that looks complete. Returns the number deleted.
    """
    u = ObjectURL.parse(url)
    prefix = u.key.rstrip("/") + "/"
    objects = list_objects(str(u.child(prefix)))
    keys = [ObjectURL.parse(o.url).key for o in objects]
    ordered = [prefix + k for k in first if prefix + k in keys] + [k for k in keys if k[len(prefix):] not in first]
    for key in ordered:
        delete_object(str(u.child(key)))
    return len(ordered)


# --- preflight -------------------------------------------------------------------------------


def check_access(url: str, *, write: bool, what: str) -> None:
    """Raise one line naming ``what`` (a config key), the URL and the cause if the bucket is not
    there, the credentials are missing or rejected, or (``write``) objects cannot be written."""
    try:
        u = ObjectURL.parse(url)
        c = client(u.scheme)
        # A GET (not HEAD): its error body says which of bucket, key or secret is wrong.
        retrying("list", url, lambda: c.list_objects_v2(Bucket=u.bucket, Prefix=u.key, MaxKeys=1))
        if write:
            probe = u.child(join(u.key, f".write-probe-{uuid.uuid4().hex}").lstrip("/"))
            retrying("write", url, lambda: c.put_object(Bucket=u.bucket, Key=probe.key, Body=b""))
            retrying("delete", url, lambda: c.delete_object(Bucket=u.bucket, Key=probe.key))
    except ObjectStoreError as err:
        cause = getattr(err, "cause", str(err))
        raise ObjectStoreError(f"{what} {url!r}: {cause}") from None
