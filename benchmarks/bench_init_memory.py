#!/usr/bin/env python
"""Peak host memory per rank to materialise a model for FSDP training: whole vs shard by shard.

``whole``: every rank builds and initialises the full model on the CPU, then FSDP2 shards it
(what olmo/launch.py did before). ``sharded``: build on the meta device, ``fully_shard``,
``to_empty``, ``init_weights`` (what it does now; moe_model/init.py holds one full parameter at a
time). Each mode runs as its own torchrun job of gloo ranks on this CPU, since a process's peak
RSS only grows. Prints a table and writes benchmarks/results/init_memory_cpu.json (``--name``).

    python -m benchmarks.bench_init_memory [--config configs/olmoe-1b-7b-polynorm.yaml] \\
        [--nproc 2] [--key=value ...]          # e.g. --model.n_layers=2 to fit a small machine
    python -m benchmarks.bench_init_memory --quick  # smoke test: configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_common import REPO, Benchmark, Run, repo_relative, run_benchmark

MODES = ("whole", "sharded")
GIB = 2**30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(mode: str, config: str, overrides: list[str], result: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from olmo.config import load_config

    model_cfg = load_config(config, overrides).model
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    base_rss = _rss_bytes()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = model_cfg.build(init_device="cpu" if mode == "whole" else "meta")
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if mode == "sharded":
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
    seconds = time.perf_counter() - start
    peak_rss = _peak_rss_bytes()
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    # A checksum of every full parameter shows both modes made the same weights.
    with torch.no_grad():
        checksum = float(sum(p.full_tensor().double().sum() for p in model.parameters()))
    row = {
        "rank": dist.get_rank(),
        "peak_rss_over_start_gib": (peak_rss - base_rss) / GIB,
        "local_param_gib": local_bytes / GIB,
        "seconds": seconds,
        "checksum": checksum,
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps({"params": model_cfg.num_params(), "ranks": rows}))
    # Both ranks leave together: a gloo peer torn down while the other still reads from it has
    # aborted the survivor ("terminate called without an active exception") once here.
    dist.barrier()
    dist.destroy_process_group()


def worker_main(argv: list[str]) -> int:
    """One torchrun rank (started by ``measure``), not a command for people."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=MODES, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    worker(args.worker, args.config, overrides, args.result)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--config", default=None,
                   help="default configs/olmoe-1b-7b-polynorm.yaml (--quick: configs/tiny.yaml)")  # fmt: skip
    p.add_argument("--nproc", type=int, default=2)


def setup(run: Run) -> None:
    default = "tiny.yaml" if run.quick else "olmoe-1b-7b-polynorm.yaml"
    run.args.config = run.args.config or str(REPO / "configs" / default)
    run.settings.update(
        config=repo_relative(run.args.config), overrides=run.overrides, nproc=run.args.nproc
    )


def measure(run: Run):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            result = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={run.args.nproc}",
                   f"--master_port={_free_port()}", "--module", __spec__.name, "--worker", mode, "--result", str(result),
                   "--config", run.args.config, *run.overrides]  # fmt: skip
            subprocess.run(cmd, cwd=REPO, env=env, check=True)
            data = json.loads(result.read_text())
            ranks = data["ranks"]
            yield {
                "mode": mode,
                "ranks": run.args.nproc,
                "params": data["params"],
                "model_fp32_gib": data["params"] * 4 / GIB,
                "local_param_gib": max(r["local_param_gib"] for r in ranks),
                "peak_rss_gib": max(r["peak_rss_over_start_gib"] for r in ranks),
                "seconds": max(r["seconds"] for r in ranks),
                "checksum": ranks[0]["checksum"],
            }


def finish(run: Run, rows: list[dict]) -> None:
    same = len({r["checksum"] for r in rows}) == 1
    run.extra["same_weights"] = same
    print(f"same weights in both modes (checksum): {same}")
    if not same:
        run.fail("the whole and the sharded build made different weights")


BENCHMARK = Benchmark(
    name="init_memory",
    result_name="init_memory_cpu",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    finish=finish,
    columns=[
        ("mode", "mode", ""),
        ("ranks", "ranks", "d"),
        ("params", "params", ",d"),
        ("model_fp32_gib", "fp32 model GiB", ".2f"),
        ("local_param_gib", "shard GiB / rank", ".2f"),
        ("peak_rss_gib", "peak RSS over start GiB / rank (max)", ".2f"),
        ("seconds", "materialise s (max rank)", ".1f"),
    ],  # fmt: skip
    devices=("cpu",),
    timing=None,  # one materialisation per mode and process: peak RSS only grows
    config_overrides=True,
)

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(worker_main(argv) if "--worker" in argv else run_benchmark(BENCHMARK, argv))
