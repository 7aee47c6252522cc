"""Initialisation is the same whole, on meta then materialised, and sharded over 2 ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_model.init import trunc_normal_
from tests.moe_model.test_transformer import tiny_config
from tests.olmo.helpers import REPO, free_port

# Every option that adds tensors: dense first block, shared experts, the expert bias buffer.
ROUTING_VARIANTS = dict(n_layers=3, moe_first_dense_layers=1, moe_shared_experts=2,
                        moe_bias_update_rate=1e-3)


def test_trunc_normal_distribution_and_cutoff():
    torch.manual_seed(0)
    w = torch.empty(400, 500)
    trunc_normal_(w, std=0.02, cutoff_factor=3.0)
    assert w.abs().max() <= 0.06
    # std of N(0, s^2) truncated at +-3s is 0.98654 s.
    assert abs(w.std().item() - 0.02 * 0.98654) < 2e-4
    assert abs(w.mean().item()) < 2e-4


def test_trunc_normal_values_do_not_depend_on_the_dtype_or_tensor():
    torch.manual_seed(3)
    a = torch.empty(7, 5)
    trunc_normal_(a, std=0.5, cutoff_factor=2.0)
    torch.manual_seed(3)
    b = torch.zeros(7, 5, dtype=torch.float64)
    trunc_normal_(b, std=0.5, cutoff_factor=2.0)
    torch.testing.assert_close(b.float(), a, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [{}, ROUTING_VARIANTS])
def test_meta_build_then_init_equals_whole_build(extra):
    config = tiny_config("polynorm", **extra)
    torch.manual_seed(11)
    whole = config.build()
    model = config.build("meta")
    model.to_empty(device="cpu")
    torch.manual_seed(11)
    model.init_weights()
    for (name, p), (_, p_ref) in zip(model.state_dict().items(), whole.state_dict().items(),
                                     strict=True):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0, msg=name)


_SHARDED = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from tests.moe_model.test_transformer import tiny_config

    dist.init_process_group("gloo")
    config = tiny_config("polynorm", moe_num_experts=5)  # 5 experts: uneven shards
    torch.manual_seed(11)
    whole = config.build()
    model = config.build("meta")
    mesh = init_device_mesh("cpu", (2,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(11)
    model.init_weights()
    reference = dict(whole.named_parameters())
    for name, p in model.named_parameters():
        local, full = p.to_local(), p.full_tensor()
        if p.shape[0] > 1 and local.shape[0] >= p.shape[0]:
            sys.exit(f"{name}: not sharded ({tuple(local.shape)} of {tuple(p.shape)})")
        if not torch.equal(full, reference[name]):
            sys.exit(f"{name}: differs from the whole build")
    dist.destroy_process_group()
    print("ok")
    """
)


def test_sharded_init_equals_whole_build(tmp_path):
    """2 gloo ranks: each fills its own shards, and together they hold the whole-build weights."""
    script = tmp_path / "sharded_init.py"
    script.write_text(_SHARDED)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(script)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2
