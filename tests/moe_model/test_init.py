"""The truncated-normal sampler against independent references, and initialisation the same
whole, on meta then materialised, and sharded over 2 ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_model.init import _DRAW_CHUNK, draw_on, trunc_normal_
from tests.moe_model.test_transformer import tiny_config
from tests.olmo.helpers import REPO, free_port

pytestmark = pytest.mark.numerics

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


def test_trunc_normal_takes_each_value_from_the_first_whole_draw_inside_the_cut():
    """Reference: whole N(0, std^2) draws from the same seed, stacked; each position keeps the
    first that lies inside the cut. A 2-std cut redraws 4.6% of the values, a few of them 3 times."""
    n, std, factor = 300_000, 0.02, 2.0
    cut = torch.tensor(factor * std, dtype=torch.float32)
    torch.manual_seed(7)
    draws = torch.stack([torch.empty(n).normal_(0.0, std) for _ in range(8)])
    inside = draws.abs() <= cut
    assert inside.any(0).all()
    assert (~inside[:3]).all(0).any(), "no value needed 4 draws: the test would be weaker"
    expected = draws.gather(0, inside.int().argmax(0, keepdim=True))[0]
    torch.manual_seed(7)
    w = torch.empty(n)
    trunc_normal_(w, std=std, cutoff_factor=factor)
    assert torch.equal(w, expected)


@pytest.mark.skipif(torch.__version__.split("+")[0] != "2.13.0",
                    reason="torch 2.13's nn.init.trunc_normal_ drew the weights of earlier runs")
@pytest.mark.parametrize("shape,std,factor", [((_DRAW_CHUNK + 1000,), 0.02, 3.0),
                                              ((7, 5), 0.5, 2.0), ((64, 48, 32), 1.0, 1.0)])
def test_trunc_normal_keeps_the_weights_runs_drew_with_torch_2_13(shape, std, factor):
    torch.manual_seed(5)
    ours = torch.empty(shape)
    trunc_normal_(ours, std=std, cutoff_factor=factor)
    torch.manual_seed(5)
    theirs = torch.empty(shape)
    for piece in theirs.view(-1).split(_DRAW_CHUNK):  # the pieces moe_model/init.py drew
        torch.nn.init.trunc_normal_(piece, std=std, a=-factor * std, b=factor * std)
    assert torch.equal(ours, theirs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_draw_on_gpu_is_seeded_truncated_and_fills_cpu_or_gpu_tensors():
    shape = (3, 2048, 1536)  # more than one piece
    torch.manual_seed(3)
    on_cpu = torch.empty(shape)
    with draw_on("cuda"):
        trunc_normal_(on_cpu, std=0.02, cutoff_factor=3.0)
    torch.manual_seed(3)
    on_gpu = torch.empty(shape, device="cuda")
    with draw_on("cuda"):
        trunc_normal_(on_gpu, std=0.02, cutoff_factor=3.0)
    assert torch.equal(on_cpu, on_gpu.cpu())
    assert on_cpu.abs().max() <= 0.06
    assert abs(on_cpu.std().item() - 0.02 * 0.98654) < 1e-4
    torch.manual_seed(3)
    cpu_draw = torch.empty(shape)
    trunc_normal_(cpu_draw, std=0.02, cutoff_factor=3.0)  # back on the CPU outside the block
    assert not torch.equal(cpu_draw, on_cpu)


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


@pytest.mark.slow
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
