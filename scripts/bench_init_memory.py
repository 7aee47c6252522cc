#!/usr/bin/env python
"""Peak host memory per rank to materialise a model for FSDP training: whole vs shard by shard.

``whole``: every rank builds and initialises the full model on the CPU, then FSDP2 shards it
(what olmo/launch.py did before). ``sharded``: build on the meta device, ``fully_shard``,
``to_empty``, ``init_weights`` (what it does now; moe_model/init.py holds one full parameter at a
time). Each mode runs as its own torchrun job of gloo ranks on this CPU, since a process's peak
RSS only grows. Prints a table and writes benchmarks/results/<--name>.json.

    python scripts/bench_init_memory.py [--config configs/olmoe-1b-7b-polynorm.yaml] \\
        [--nproc 2] [--key=value ...]          # e.g. --model.n_layers=2 to fit a small machine
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_common import REPO, environment, format_table, write_json  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "olmoe-1b-7b-polynorm.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--name", default="init_memory_cpu", help="results file name (no .json)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker:
        worker(args.worker, args.config, overrides, args.result)
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            result = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                   f"--master_port={_free_port()}", __file__, "--worker", mode, "--result", str(result),
                   "--config", args.config, *overrides]
            subprocess.run(cmd, cwd=REPO, env=env, check=True)
            data = json.loads(result.read_text())
            ranks = data["ranks"]
            rows.append({
                "mode": mode,
                "ranks": args.nproc,
                "params": data["params"],
                "model_fp32_gib": data["params"] * 4 / GIB,
                "local_param_gib": max(r["local_param_gib"] for r in ranks),
                "peak_rss_gib": max(r["peak_rss_over_start_gib"] for r in ranks),
                "seconds": max(r["seconds"] for r in ranks),
                "checksum": ranks[0]["checksum"],
            })
    columns = [
        ("mode", "mode", ""), ("ranks", "ranks", "d"), ("params", "params", ",d"),
        ("model_fp32_gib", "fp32 model GiB", ".2f"), ("local_param_gib", "shard GiB / rank", ".2f"),
        ("peak_rss_gib", "peak RSS over start GiB / rank (max)", ".2f"),
        ("seconds", "materialise s (max rank)", ".1f"),
    ]
    print(format_table(rows, columns))
    same = rows[0]["checksum"] == rows[1]["checksum"]
    print(f"same weights in both modes (checksum): {same}")
    path = write_json(args.name, {
        "environment": environment(torch.device("cpu")),
        "config": args.config, "overrides": overrides, "rows": rows, "same_weights": same,
    })
    print(f"wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
