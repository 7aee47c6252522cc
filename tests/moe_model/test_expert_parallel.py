"""Expert parallelism in the MoE layer: the all-to-all dispatcher and sharded experts.

The distributed checks run in gloo processes (``ep_dispatch_worker.py``) against the single-rank
layer on the same tokens; the row regrouping is checked here against a loop.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moe_model.expert_parallel import _sender_major_to_expert_major
from tests.olmo.helpers import REPO, free_port


def regroup_by_loop(counts_PX: torch.Tensor) -> list[int]:
    """Row indices of (sender, expert) blocks listed expert-major, one block at a time."""
    starts, start = {}, 0
    for j in range(counts_PX.shape[0]):
        for e in range(counts_PX.shape[1]):
            starts[j, e] = start
            start += int(counts_PX[j, e])
    return [
        starts[j, e] + i
        for e in range(counts_PX.shape[1])
        for j in range(counts_PX.shape[0])
        for i in range(int(counts_PX[j, e]))
    ]


@pytest.mark.parametrize("shape", [(1, 3), (2, 2), (3, 4), (4, 1)])
def test_regroup_orders_rows_by_expert_then_sender(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    counts_PX = torch.randint(0, 4, shape, generator=gen)
    counts_PX[0, 0] = 0  # an empty block
    total = int(counts_PX.sum())
    assert _sender_major_to_expert_major(counts_PX, total).tolist() == regroup_by_loop(counts_PX)


def run_worker(
    nproc: int, ep: int, module: str = "tests.moe_model.ep_dispatch_worker"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         f"--master_port={free_port()}", "-m", module, str(ep)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_expert_parallel_layer_matches_the_whole_layer():
    """2 gloo ranks, one EP group: dispatch/combine round trip (random routing, and every row to
    one rank), then MoE layers (shared and per-expert PolyNorm sets, SwiGLU with a rank that
    receives no rows): outputs, auxiliary losses, load counts and every gradient equal the whole
    layer's on the same tokens. (Several EP groups: tests/olmo/test_train_module.py, 4 ranks.)"""
    proc = run_worker(nproc=2, ep=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok") == 2
