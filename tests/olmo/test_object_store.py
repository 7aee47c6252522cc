"""olmo/object_store.py and olmo/token_files.py against a real S3 API server (moto, 127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_model.errors import DataError, ObjectStoreError, project_error_behind
from olmo import object_store
from olmo.data import DataConfig, build_train_loader, resolve_paths, validate_data

from .helpers import write_token_file
from .s3_server import CuttingProxy, moto_server


@pytest.fixture(scope="module")
def server():
    with moto_server() as s:
        s.make_bucket("tokens")
        yield s


@pytest.fixture
def env(server, monkeypatch):
    """This process talks to the server as the read-write user, fast retries."""
    for name in ("AWS_PROFILE", "S3_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**server.env(), "OBJECT_STORE_ATTEMPTS": "3", "OBJECT_STORE_RETRY_DELAY": "0.01"}.items():
        monkeypatch.setenv(name, value)
    return server


def test_url_parsing_and_schemes():
    u = object_store.ObjectURL.parse("s3://bkt/a/b.npy")
    assert (u.scheme, u.bucket, u.key) == ("s3", "bkt", "a/b.npy")
    assert object_store.is_remote("r2://x/y") and object_store.is_remote("weka://x/y")
    assert not object_store.is_remote("data/x.npy") and not object_store.is_remote("gs://x/y")
    assert object_store.join("s3://b/run/", "step4", ".metadata.json") == "s3://b/run/step4/.metadata.json"
    with pytest.raises(ObjectStoreError, match="not an object-storage URL"):
        object_store.ObjectURL.parse("gs://b/k")


def test_r2_needs_its_endpoint(env, monkeypatch):
    monkeypatch.delenv("R2_ENDPOINT_URL", raising=False)
    with pytest.raises(ObjectStoreError) as err:
        object_store.check_access("r2://tokens/x", write=False, what="data.paths")
    assert str(err.value) == "data.paths 'r2://tokens/x': R2_ENDPOINT_URL is not set (the endpoint of r2:// URLs)"
    # r2:// with its endpoint set reaches the same server (OLMo-core's convention).
    monkeypatch.setenv("R2_ENDPOINT_URL", env.endpoint)
    object_store.check_access("r2://tokens/x", write=True, what="data.paths")


def test_glob_lists_like_a_shell(env):
    c = env.client()
    for key in ("g/x-1.npy", "g/x-0.npy", "g/sub/y.npy", "g/z.txt", "gx/w.npy"):
        c.put_object(Bucket="tokens", Key=key, Body=b"abcd")
    names = lambda pattern: [o.url for o in object_store.glob_objects(pattern)]  # noqa: E731
    assert names("s3://tokens/g/*.npy") == ["s3://tokens/g/x-0.npy", "s3://tokens/g/x-1.npy"]
    assert names("s3://tokens/g/**/*.npy") == ["s3://tokens/g/sub/y.npy", "s3://tokens/g/x-0.npy", "s3://tokens/g/x-1.npy"]
    assert names("s3://tokens/g/x-[1].npy") == ["s3://tokens/g/x-1.npy"]
    assert names("s3://tokens/g/z.txt") == ["s3://tokens/g/z.txt"]
    assert names("s3://tokens/g/none.npy") == []
    info = object_store.stat("s3://tokens/g/z.txt")
    assert info.size == 4 and info.etag == c.head_object(Bucket="tokens", Key="g/z.txt")["ETag"].strip('"')


def test_ranged_reads_and_etag_guard(env):
    payload = bytes(range(256)) * 40
    env.client().put_object(Bucket="tokens", Key="r/blob", Body=payload)
    url = "s3://tokens/r/blob"
    assert object_store.read_range(url, 1000, 300) == payload[1000:1300]
    etag = object_store.stat(url).etag
    assert object_store.read_range(url, 5, 3, if_match=etag) == payload[5:8]
    env.client().put_object(Bucket="tokens", Key="r/blob", Body=payload[::-1])
    with pytest.raises(ObjectStoreError, match="object changed since it was listed"):
        object_store.read_range(url, 5, 3, if_match=etag)


BAD_ACCESS = {
    # name: (credentials, url, write, the whole error line)
    "wrong access key": ({"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": "x"},
                         "s3://tokens/run", True,
                         "save_folder 's3://tokens/run': credentials rejected (unknown access key)"),
    "wrong secret": ("rw-wrong-secret", "s3://tokens/run", True,
                     "save_folder 's3://tokens/run': credentials rejected (wrong secret key)"),
    "missing bucket": (None, "s3://no-such-bucket/run", True,
                       "save_folder 's3://no-such-bucket/run': bucket does not exist"),
    "read-only user": ("ro", "s3://tokens/run", True,
                       "save_folder 's3://tokens/run': access denied (no permission for this operation)"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_ACCESS))
def test_access_errors_are_one_line_naming_url_and_cause(env, monkeypatch, name):
    creds, url, write, line = BAD_ACCESS[name]
    if creds == "ro":
        creds = env.ro
    elif creds == "rw-wrong-secret":
        creds = {**env.rw, "AWS_SECRET_ACCESS_KEY": "wrong"}
    for k, v in (creds or {}).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ObjectStoreError) as err:
        object_store.check_access(url, write=write, what="save_folder")
    assert str(err.value) == line
    # The read-only user may still read: a load_path / data check passes.
    if name == "read-only user":
        object_store.check_access(url, write=False, what="load_path")


def test_missing_credentials(env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ObjectStoreError) as err:
        object_store.check_access("s3://tokens/run", write=True, what="save_folder")
    assert str(err.value) == (
        "save_folder 's3://tokens/run': no credentials found (set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or S3_PROFILE)"
    )


def test_cut_connections_are_retried_and_a_dead_link_is_reported(env, monkeypatch):
    port = int(env.endpoint.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_every=4)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        blobs = {f"flaky/{i}": bytes([i]) * (1000 + i) for i in range(12)}
        for key, body in blobs.items():
            object_store.put_bytes(f"s3://tokens/{key}", body)
        for key, body in blobs.items():
            assert object_store.read_range(f"s3://tokens/{key}", 10, 500) == body[10:510]
        assert proxy.cuts > 0  # the proxy did cut, and every operation still completed
        proxy.cut_all_after = proxy.chunks
        with pytest.raises(ObjectStoreError) as err:
            object_store.put_bytes("s3://tokens/flaky/dead", b"x")
        assert str(err.value).startswith("s3://tokens/flaky/dead: put failed after 3 attempts: ")
    finally:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", env.endpoint)
    assert not object_store.exists("s3://tokens/flaky/dead")


def test_delete_prefix_removes_the_marker_first(env, monkeypatch):
    for name in ("model_and_optim/.metadata", ".metadata.json", "train/rank0.pt", ".uploaded/rank0"):
        object_store.put_bytes(f"s3://tokens/del/step4/{name}", b"x")
    object_store.put_bytes("s3://tokens/del/step40/.metadata.json", b"x")  # a sibling, not inside
    order = []
    real = object_store.delete_object
    monkeypatch.setattr(object_store, "delete_object", lambda url: (order.append(url), real(url)))
    assert object_store.delete_prefix("s3://tokens/del/step4", first=(".metadata.json",)) == 4
    assert order[0] == "s3://tokens/del/step4/.metadata.json"
    assert env.keys("tokens", "del/") == ["del/step40/.metadata.json"]


# ---- token files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory, server):
    local = tmp_path_factory.mktemp("tokens")
    write_token_file(local / "train-0.npy", 6_000, seed=0)
    write_token_file(local / "train-1.npy", 5_000, seed=2)
    server.upload_dir(local, "s3://tokens/data")
    return local


def _cfg(paths, **extra) -> DataConfig:
    return DataConfig(paths=paths, eos_token_id=511, **extra)


def test_training_batches_from_a_bucket_equal_local_ones(env, token_dir, tmp_path):
    def batches(paths, work, **extra):
        loader = build_train_loader(_cfg(paths, **extra), sequence_length=32, vocab_size=512,
                                    global_batch_size=8, seed=3, work_dir=tmp_path / work)  # fmt: skip
        loader.reshuffle(epoch=1)
        out = [b["input_ids"].clone() for _, b in zip(range(5), loader)]
        loader.reset()
        return out, loader

    local, _ = batches([f"{token_dir}/train-*.npy"], "local")
    remote, loader = batches(["s3://tokens/data/train-*.npy"], "remote")
    cached, _ = batches(["s3://tokens/data/train-*.npy"], "cached", cache_dir=str(tmp_path / "cache"))
    for a, b, c in zip(local, remote, cached):
        assert np.array_equal(a.numpy(), b.numpy()) and np.array_equal(a.numpy(), c.numpy())
    assert len(list((tmp_path / "cache").rglob("*.npy.*"))) == 2  # one copy per object, named by ETag
    # A resume onto an object rewritten with the same size is refused, naming what changed.
    state = loader.state_dict()
    assert state["data_files"][0][:2] == ["train-0.npy", 12_000] and len(state["data_files"][0][2]) == 32
    body = np.fromfile(token_dir / "train-1.npy", dtype=np.uint16)[::-1].copy()
    env.client().put_object(Bucket="tokens", Key="data/train-1.npy", Body=body.tobytes())
    _, fresh = batches(["s3://tokens/data/train-*.npy"], "fresh")
    with pytest.raises(DataError, match=r"1 object\(s\) rewritten \(e.g. train-1.npy: ETag "):
        fresh.load_state_dict(state)
    # The loader built before the rewrite reads only the version it started on.
    # (Raised in a reader thread, it arrives wrapped; the launcher unwraps it the same way.)
    loader.reshuffle(epoch=1)
    with pytest.raises(Exception) as err:
        for _ in loader:
            pass
    behind = project_error_behind(err.value)
    assert isinstance(behind, DataError)
    assert "data/train-1.npy: the object changed during the run (ETag is no longer " in str(behind)
    env.client().upload_file(str(token_dir / "train-1.npy"), "tokens", "data/train-1.npy")  # as it was


def test_data_errors_name_the_url(env, token_dir, tmp_path):
    with pytest.raises(DataError) as err:
        resolve_paths(["s3://tokens/data/nothing-*.npy"])
    assert str(err.value).startswith("data.paths: 's3://tokens/data/nothing-*.npy' matches no files")
    with pytest.raises(DataError) as err:
        resolve_paths(["s3://tokens/data"])
    assert str(err.value) == (
        "data.paths: 's3://tokens/data' is a prefix; expected objects or a glob such as 's3://tokens/data/*.npy'"
    )
    with pytest.raises(DataError) as err:
        resolve_paths(["s3://no-such-bucket/data/*.npy"])
    assert str(err.value) == "data.paths 's3://no-such-bucket/data/*.npy': bucket does not exist"
    # Token ids are sampled by ranged reads: a vocabulary too small for the file is caught.
    bad = write_token_file(tmp_path / "wide.npy", 3_000, vocab=2_000, seed=5)
    env.client().upload_file(str(bad), "tokens", "bad/wide.npy")
    with pytest.raises(DataError, match=r"'s3://tokens/bad/wide.npy' has token id [\d,]+ at position"):
        validate_data(_cfg(["s3://tokens/bad/wide.npy"]), vocab_size=512, sequence_length=32,
                      global_batch_size=8)  # fmt: skip


def test_mixture_sources_from_a_bucket_equal_local_ones(env, token_dir, tmp_path):
    def first_batches(prefix: str, work: str):
        sources = {
            "a": {"paths": [f"{prefix}/train-0.npy"], "fraction": 0.5},
            "b": {"paths": [f"{prefix}/train-1.npy"], "fraction": 0.5},
        }
        loader = build_train_loader(DataConfig(sources=sources, eos_token_id=511), sequence_length=32,
                                    vocab_size=512, global_batch_size=8, seed=3, work_dir=tmp_path / work)  # fmt: skip
        loader.reshuffle(epoch=1)
        out = [(b["input_ids"].clone(), b["source"].clone()) for _, b in zip(range(3), loader)]
        loader.reset()
        return out

    for (ids_l, src_l), (ids_r, src_r) in zip(first_batches(str(token_dir), "l"), first_batches("s3://tokens/data", "r")):
        assert np.array_equal(ids_l.numpy(), ids_r.numpy()) and np.array_equal(src_l.numpy(), src_r.numpy())
