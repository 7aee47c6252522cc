"""A real S3 API server for tests: moto's, on 127.0.0.1 at a free port, with IAM auth on.

Two users: ``rw`` (s3:* on everything) and ``ro`` (read and list only). Credentials a test does
not create (wrong key, wrong secret) are rejected by the server as on AWS. The environment a
test gets (:meth:`S3Server.env`) points boto3 at the server only: ``AWS_ENDPOINT_URL`` set, the
EC2 metadata service disabled and no shared config files, so nothing but 127.0.0.1 is
contacted. :class:`CuttingProxy` sits between a client and the server and cuts connections.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .helpers import free_port

_ALLOW_ALL = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
_READ_ONLY = ('{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:Get*","s3:List*",'
              '"s3:HeadBucket"],"Resource":"*"}]}')  # fmt: skip
# IAM calls made before auth is enforced: 2 x (create_user, put_user_policy, create_access_key).
_SETUP_ACTIONS = 6


@dataclass
class S3Server:
    endpoint: str
    rw: dict[str, str]
    ro: dict[str, str]

    def env(self, creds: dict[str, str] | None = None, endpoint: str | None = None) -> dict[str, str]:
        """Environment variables for a client of this server (``creds``: rw by default)."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            **(self.rw if creds is None else creds),
        }

    def client(self, creds: dict[str, str] | None = None):
        import boto3

        c = creds or self.rw
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=c["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=c["AWS_SECRET_ACCESS_KEY"])  # fmt: skip

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: Path, url_prefix: str) -> None:
        """Every file under ``local`` to ``s3://bucket/prefix/<relative path>``."""
        bucket, _, prefix = url_prefix.removeprefix("s3://").partition("/")
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.client().upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(local)}")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _wait_listening(port: int, proc: subprocess.Popen, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto server exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start listening")


def _make_user(iam, name: str, policy: str) -> dict[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=policy)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@contextmanager
def moto_server():
    """Start ``python -m moto.server`` on 127.0.0.1, create the users, stop it on exit."""
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)}
    # The server logs every request: to a file, as a pipe nobody reads fills and stalls it.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)  # fmt: skip
    try:
        _wait_listening(port, proc, log)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")  # fmt: skip
        rw = _make_user(iam, "trainer", _ALLOW_ALL)
        ro = _make_user(iam, "reader", _READ_ONLY)
        yield S3Server(endpoint, rw, ro)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port`` that cuts connections.

    Every client-to-server chunk is counted; with ``cut_every=k`` the k-th, 2k-th, ... chunk
    is dropped and both sides of that connection closed (a request lost mid-way); after
    ``cut_all_after`` chunks, or from the first chunk that contains ``cut_from`` on (e.g. a
    request line), every connection is cut (a server gone).
    """

    def __init__(self, target_port: int, cut_every: int = 0, cut_all_after: int | None = None,
                 cut_from: bytes | None = None):  # fmt: skip
        self.target_port, self.cut_every, self.cut_all_after = target_port, cut_every, cut_all_after
        self.cut_from, self.dead = cut_from, False
        self.chunks = self.cuts = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _should_cut(self, data: bytes) -> bool:
        with self._lock:
            self.chunks += 1
            self.dead = self.dead or bool(self.cut_from and self.cut_from in data)
            cut = self.dead or (self.cut_every and self.chunks % self.cut_every == 0) or (
                self.cut_all_after is not None and self.chunks > self.cut_all_after
            )
            self.cuts += bool(cut)
            return bool(cut)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count and self._should_cut(data):
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
