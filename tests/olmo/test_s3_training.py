"""Training on token files in a bucket and checkpointing to a bucket (issue #26), on a real S3
API server (moto on 127.0.0.1, tests/olmo/s3_server.py), 1 and 2 gloo processes.

Each s3 run is compared with the same run on local disk: the same losses step for step, the
same weights. Faults: a process killed while uploading a checkpoint (``MOE_FAULT_UPLOAD``), a
proxy that cuts connections now and then (survived) or for good from a checkpoint's first
upload on (reported, and that checkpoint never becomes visible).
"""

from __future__ import annotations

import pytest
import torch

from olmo.checkpoint_io import load_model_config, load_state_dict
from olmo.launch import main
from olmo.run_files import find_checkpoints, remote_steps

from .helpers import TEST_CONFIG, make_data, read_metrics, run_train, tiny_overrides
from .s3_server import CuttingProxy, moto_server

CE = "train/CrossEntropyLoss"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with moto_server() as s:
        s.make_bucket("tokens")
        s.make_bucket("ckpt")
        s.upload_dir(make_data(tmp_path_factory.mktemp("s3data")), "s3://tokens/data")
        yield s


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("localdata"))


def _s3_args(save_folder: str, **extra) -> list[str]:
    opts = {
        "save_folder": save_folder,
        "data.paths": "[s3://tokens/data/train*.npy]",
        "data.validation": "{val: [s3://tokens/data/val*.npy]}",
        **extra,
    }
    return [TEST_CONFIG, *[f"--{k}={v}" for k, v in opts.items()]]


def _env(server, tmp_path, endpoint=None, **extra) -> dict:
    return {**server.env(endpoint=endpoint), "MOE_LOCAL_RUN_DIR": str(tmp_path / "node"),
            "OBJECT_STORE_ATTEMPTS": "3", "OBJECT_STORE_RETRY_DELAY": "0.05", **extra}  # fmt: skip


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses_at(folder) -> list[tuple[int, float]]:
    return [(m["step"], m[CE]) for m in read_metrics(folder) if CE in m]


def _remote_losses(server, run: str, tmp_path) -> list[tuple[int, float]]:
    dest = tmp_path / f"metrics-{run}"
    dest.mkdir()
    server.client().download_file("ckpt", f"{run}/metrics.jsonl", str(dest / "metrics.jsonl"))
    return _losses_at(dest)


@pytest.fixture(scope="module")
def local1(tmp_path_factory, local_data):
    save = tmp_path_factory.mktemp("local") / "one"
    _ok(run_train([TEST_CONFIG, *tiny_overrides(save, local_data)]))
    return save


@pytest.fixture(scope="module")
def local2(tmp_path_factory, local_data):
    save = tmp_path_factory.mktemp("local") / "two"
    _ok(run_train([TEST_CONFIG, *tiny_overrides(save, local_data)], nproc=2))
    return save


def _use_server(monkeypatch, server, tmp_path):
    for k, v in _env(server, tmp_path).items():
        monkeypatch.setenv(k, v)


def _assert_same_weights(url: str, local_dir, monkeypatch, server, tmp_path):
    _use_server(monkeypatch, server, tmp_path)
    a, b = load_state_dict(url), load_state_dict(local_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_during_upload_resumes_from_last_complete_checkpoint(
    tmp_path, server, local1, local2, monkeypatch, nproc
):
    run = f"killed{nproc}"
    save = f"s3://ckpt/{run}"
    # Every rank dies after uploading the first file of step4: step4 is partly there.
    args = [*_s3_args(save), "--wandb.mode=offline"]
    proc = run_train(args, nproc=nproc, env=_env(server, tmp_path, MOE_FAULT_UPLOAD="4"))
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    # The run ended where the fault was injected, not earlier for another reason.
    assert "MOE_FAULT_UPLOAD: rank" in proc.stderr, output
    assert proc.returncode != 0
    wandb_id = (tmp_path / "node" / "s3" / "ckpt" / run / "wandb_run_id").read_text()
    _use_server(monkeypatch, server, tmp_path)
    assert remote_steps(save, complete=False) == [0, 4]
    assert find_checkpoints(save) == [f"{save}/step0"]
    assert len([k for k in server.keys("ckpt", run) if k.startswith(f"{run}/step4/")]) >= nproc
    # The resumed run, on another node (a fresh local run dir), loads step0 (the last complete
    # one), clears the partial step4 and ends where the uninterrupted local run does, loss for
    # loss and weight for weight; it continues the same W&B run, whose files reach the bucket.
    other_node = {"MOE_LOCAL_RUN_DIR": str(tmp_path / "node2")}
    _ok(run_train(args, nproc=nproc, env={**_env(server, tmp_path), **other_node}))
    wandb_keys = [k for k in server.keys("ckpt", f"{run}/wandb/")]
    assert any(k.endswith(f"/run-{wandb_id}.wandb") and "/offline-run-" in k for k in wandb_keys), wandb_keys
    assert (tmp_path / "node2" / "s3" / "ckpt" / run / "wandb_run_id").read_text() == wandb_id
    local = local1 if nproc == 1 else local2
    assert _remote_losses(server, run, tmp_path) == _losses_at(local)
    assert find_checkpoints(save) == [f"{save}/step0", f"{save}/step4", f"{save}/step8"]
    _assert_same_weights(f"{save}/step8", local / "step8", monkeypatch, server, tmp_path)
    # The checkpoint readers (HF export, generation) take the save folder's URL: its newest
    # complete step and the run's config, fetched once.
    assert load_model_config(save) == load_model_config(local)
    config = server.client().get_object(Bucket="ckpt", Key=f"{run}/config.yaml")["Body"].read().decode()
    assert "s3://tokens/data/train*.npy" in config


@pytest.mark.slow
def test_keep_last_k_deletes_remotely_and_survives_cut_connections(tmp_path, server, local1, monkeypatch):
    run, port = "flaky", int(server.endpoint.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_every=25)
    try:
        proc = run_train(_s3_args(f"s3://ckpt/{run}", save_interval=2, save_num_checkpoints_to_keep=2),
                         env=_env(server, tmp_path, endpoint=proxy.endpoint))  # fmt: skip
    finally:
        proxy.close()
    _ok(proc)
    assert proxy.cuts > 0  # requests were lost, retried, and the run still matches
    assert _remote_losses(server, run, tmp_path) == _losses_at(local1)
    _use_server(monkeypatch, server, tmp_path)
    present = remote_steps(f"s3://ckpt/{run}", complete=False)
    complete = remote_steps(f"s3://ckpt/{run}", complete=True)
    # Deleted checkpoints are gone whole (no objects left); exactly the newest k remain, each
    # deleted only once a newer one was complete.
    assert present == complete == [6, 8]


def test_upload_that_keeps_failing_is_reported_and_never_visible(tmp_path, server):
    run, port = "dead", int(server.endpoint.rsplit(":", 1)[1])
    # From step 4's first upload request on, every connection through the proxy is cut. The
    # token files are read as r2:// (OLMo-core's R2 convention: its own endpoint variable)
    # straight from the server, so it is the upload that fails.
    proxy = CuttingProxy(port, cut_from=f"PUT /ckpt/{run}/step4/".encode())
    args = _s3_args(f"s3://ckpt/{run}", **{"data.paths": "[r2://tokens/data/train*.npy]",
                                           "data.validation": "{val: [r2://tokens/data/val*.npy]}"})
    try:
        proc = run_train(args, env=_env(server, tmp_path, endpoint=proxy.endpoint, R2_ENDPOINT_URL=server.endpoint))
    finally:
        proxy.close()
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert errors[0].startswith(f"error: s3://ckpt/{run}/step4/") and "upload failed after 3 attempts" in errors[0]
    keys = server.keys("ckpt", f"{run}/")
    assert f"{run}/step0/.metadata.json" in keys
    assert f"{run}/step4/.metadata.json" not in keys  # whatever got through, step4 is not a checkpoint


ONE_LINE_ERRORS = {
    # name: (what to change, the whole error line)
    "missing bucket": ({"save_folder": "s3://no-such-bucket/run"},
                       "error: save_folder 's3://no-such-bucket/run': bucket does not exist"),
    "wrong secret": ({"creds": "wrong-secret"},
                     "error: data.paths 's3://tokens/data/train*.npy': credentials rejected (wrong secret key)"),
    "read-only user": ({"creds": "ro"},
                       "error: save_folder 's3://ckpt/ro': access denied (no permission for this operation)"),
    "data bucket missing": ({"data.paths": "[s3://nope-bucket/train*.npy]"},
                            "error: data.paths 's3://nope-bucket/train*.npy': bucket does not exist"),
    "load_path not complete": ({"load_path": "s3://ckpt/nothing/step4"},
                               "error: load_path 's3://ckpt/nothing/step4' is not a complete checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ONE_LINE_ERRORS))
def test_preflight_errors_are_one_line(tmp_path, server, monkeypatch, capsys, name):
    change, line = ONE_LINE_ERRORS[name]
    _use_server(monkeypatch, server, tmp_path)
    creds = change.get("creds")
    if creds == "ro":
        for k, v in server.ro.items():
            monkeypatch.setenv(k, v)
    elif creds == "wrong-secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    opts = {"save_folder": "s3://ckpt/ro" if creds == "ro" else f"s3://ckpt/pre-{len(name)}"}
    opts.update({k: v for k, v in change.items() if k != "creds"})
    code = main(_s3_args(**opts))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(line), lines[0]
    assert "Traceback" not in err


@pytest.mark.slow
def test_load_path_url_and_hf_export_between_buckets(tmp_path, server, local1, local_data, monkeypatch, capsys):
    from tests.scripts.helpers import run_script

    # A complete checkpoint in a bucket (the local run's step4 and config, uploaded as is).
    server.upload_dir(local1 / "step4", "s3://ckpt/uploaded/step4")
    server.client().upload_file(str(local1 / "config.yaml"), "ckpt", "uploaded/config.yaml")
    url = "s3://ckpt/uploaded/step4"
    # Training from it (load_path a URL, local save folder) goes on where the local run went on.
    save = tmp_path / "from-url"
    _ok(run_train([TEST_CONFIG, *tiny_overrides(save, local_data, load_path=url)],
                  env=_env(server, tmp_path)))  # fmt: skip
    assert _losses_at(save) == [(s, loss) for s, loss in _losses_at(local1) if s > 4]
    # Export from the bucket to the bucket: the same files, byte for byte, as a local export of
    # the local checkpoint.
    _use_server(monkeypatch, server, tmp_path)
    assert run_script("convert_to_hf", [str(local1 / "step4"), str(tmp_path / "hf"), "--tokenizer=none"]) == 0
    assert run_script("convert_to_hf", [url, "s3://ckpt/uploaded-hf", "--tokenizer=none"]) == 0, capsys.readouterr().err
    local_files = sorted(str(p.relative_to(tmp_path / "hf")) for p in (tmp_path / "hf").rglob("*") if p.is_file())
    assert server.keys("ckpt", "uploaded-hf/") == [f"uploaded-hf/{f}" for f in local_files]
    for f in local_files:
        body = server.client().get_object(Bucket="ckpt", Key=f"uploaded-hf/{f}")["Body"].read()
        assert body == (tmp_path / "hf" / f).read_bytes(), f
    # A prefix that already holds objects is refused before any work, in one line.
    capsys.readouterr()
    assert run_script("convert_to_hf", [url, "s3://ckpt/uploaded-hf", "--tokenizer=none"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: output 's3://ckpt/uploaded-hf' already holds objects; pick a new one"
    )
