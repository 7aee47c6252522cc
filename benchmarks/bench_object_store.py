"""Object storage against local disk, on a local S3 API server (moto on 127.0.0.1).

Checkpoints (model + AdamW state, one process, olmo-core's DCP writer): the local save, and the
save to ``s3://`` split into what training waits for (staging the same files locally: the stall)
and the background upload until the checkpoint is complete (its marker written); then loading
each back the way a resume does (olmo-core's Checkpointer.load: ranged reads of the DCP files).
Token files: milliseconds per training batch from local memmaps, from the bucket by byte
ranges, and from the bucket through ``data.cache_dir`` (after the first pass copied them).

moto is a Python server holding objects in memory: its throughput is far below a real object
store's, so the s3 times are an upper bound of the protocol's cost here, not a cloud figure.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_common import REPO, Benchmark, Run, median, run_benchmark
from olmo import object_store
from tests.olmo.helpers import write_token_file
from tests.olmo.s3_server import moto_server

MODELS = {
    # name: TrainConfig overrides of configs/tiny.yaml
    "tiny": [],
    # Twice tiny's width: 33M parameters (the 50k-token embeddings dominate both).
    "medium": ["--model.d_model=256"],
}
QUICK_MODELS = {"tiny": []}


class StateHolder:
    """The part of olmo-core's TrainModule contract a Checkpointer uses: a model and its AdamW."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        # One step so the optimizer has its moments (what a real checkpoint holds).
        sum(p.sum() for p in model.parameters()).backward()
        self.optim.step()

    def state_dict_to_save(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optim)
        return {"model": model, "optim": optim}

    def state_dict_to_load(self, metadata, optim=None):
        del metadata, optim
        return self.state_dict_to_save()

    def load_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optim, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _model(overrides: list[str]):
    from olmo.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    torch.manual_seed(0)
    return cfg.model.build(init_device="cpu"), cfg


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _checkpoint_rows(run: Run, work: Path, name: str, overrides: list[str]):
    from olmo.remote_checkpoint import RemoteCheckpointer

    model, _ = _model(overrides)
    holder = StateHolder(model)
    params = sum(p.numel() for p in model.parameters())
    ckpt = RemoteCheckpointer(work_dir=work / f"work-{name}", save_overwrite=True)
    local = {"save": [], "load": []}
    remote = {"stall": [], "upload": [], "load": []}
    size = 0
    for i in range(run.iters):
        d = work / f"local-{name}-{i}"
        t0 = time.perf_counter()
        ckpt.save(d, holder, {"step": i})
        local["save"].append(time.perf_counter() - t0)
        size = _dir_bytes(d)
        t0 = time.perf_counter()
        ckpt.load(d, holder)
        local["load"].append(time.perf_counter() - t0)

        url = f"s3://bench/{name}/step{i}"
        t0 = time.perf_counter()
        future = ckpt.save_async(url, holder, {"step": i})
        remote["stall"].append(time.perf_counter() - t0)
        future.result()
        remote["upload"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.load(url, holder)
        remote["load"].append(time.perf_counter() - t0)
    common = {"case": f"checkpoint {name}", "params_M": params / 1e6, "size_MB": size / 1e6}
    yield {**common, "target": "local disk", "stall_s": median(local["save"]),
           "done_s": median(local["save"]), "load_s": median(local["load"])}  # fmt: skip
    yield {**common, "target": "s3 (moto)", "stall_s": median(remote["stall"]),
           "done_s": median(remote["upload"]), "load_s": median(remote["load"])}  # fmt: skip


def _data_rows(run: Run, work: Path, server):
    from olmo.data import REMOTE_READER_THREADS, DataConfig, build_train_loader

    n_tokens = 100_000 if run.quick else 400_000
    local = work / "tokens"
    for i in range(2):
        write_token_file(local / f"train-{i}.npy", n_tokens, vocab=50_000, seed=i)
    server.upload_dir(local, "s3://bench/tokens")
    seq, batch = 128, 16  # configs/tiny.yaml: 16 x 128 tokens per step
    n_batches = 10 if run.quick else 30
    remote = ["s3://bench/tokens/train-*.npy"]
    cases = {
        # source: (data config, reader threads; None: what build_train_loader picks)
        "local memmap": (DataConfig(paths=[f"{local}/train-*.npy"]), None),
        "s3 byte ranges, 4 threads": (DataConfig(paths=remote), 4),
        f"s3 byte ranges, {REMOTE_READER_THREADS} threads": (DataConfig(paths=remote), None),
        "s3 + cache_dir": (DataConfig(paths=remote, cache_dir=str(work / "cache")), None),
    }
    for source, (cfg, threads) in cases.items():
        loader = build_train_loader(cfg, sequence_length=seq, vocab_size=50_304, global_batch_size=batch,
                                    seed=0, work_dir=work / f"data-{source}")  # fmt: skip
        loader.num_threads = threads or loader.num_threads
        times = []
        for epoch in (1, 2):  # the first pass fills the cache; the second is what is timed
            loader.reshuffle(epoch=epoch)
            it = iter(loader)
            for _ in range(n_batches):
                t0 = time.perf_counter()
                next(it)
                if epoch == 2:
                    times.append(time.perf_counter() - t0)
            loader.reset()
        yield {"case": "token batch 16x128", "target": source, "batch_ms": 1e3 * median(times)}


def measure(run: Run):
    work = Path(tempfile.mkdtemp(prefix="bench-object-store-"))
    with moto_server() as server:
        for name, value in server.env().items():
            os.environ[name] = value
        os.environ["MOE_LOCAL_RUN_DIR"] = str(work / "node")
        server.make_bucket("bench")
        # A training process has its client long before its first checkpoint: build it untimed.
        object_store.list_objects("s3://bench/")
        for name, overrides in (QUICK_MODELS if run.quick else MODELS).items():
            yield from _checkpoint_rows(run, work, name, overrides)
        yield from _data_rows(run, work, server)


BENCH = Benchmark(
    name="object_store",
    doc=__doc__,
    measure=measure,
    columns=[
        ("case", "case", ""), ("target", "where", ""), ("params_M", "params (M)", ".1f"),
        ("size_MB", "checkpoint MB", ".1f"), ("stall_s", "training waits (s)", ".2f"),
        ("done_s", "complete after (s)", ".2f"), ("load_s", "load (s)", ".2f"),
        ("batch_ms", "ms / batch", ".1f"),
    ],  # fmt: skip
    progress=lambda r: f"{r['case']} {r['target']}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)),
    timing={"cuda": (0, 1), "cpu": (0, 1), "quick": (0, 1)},
    devices=("cpu",),
)

if __name__ == "__main__":
    raise SystemExit(run_benchmark(BENCH))
