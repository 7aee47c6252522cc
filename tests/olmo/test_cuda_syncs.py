"""A whole training step (``train_batch`` + ``optim_step``) runs without an op that would make the
host wait for a CUDA device (tests/cuda_rules.py), for every routing option, on one process and
with expert parallelism on 2 gloo ranks.

A sync in the forward stalls the host once per layer and micro-batch (twice with activation
checkpointing): the GPU drains its queue while the CPU waits to launch the next kernel. The few
that remain are listed in ``ALLOWED`` with the reason each is worth its cost.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moe_model.config import ModelConfig
from olmo.config import TrainConfig
from olmo.data import BatchCollator, DataConfig
from olmo.metric_names import layer_router_entropy
from olmo.plan_memory import force_balance as plan_force_balance
from olmo.train_module import MoETrainModule, train_module_config
from tests.cuda_rules import record_cuda_syncs, unexpected

from .helpers import REPO, free_port

ALLOWED: dict[tuple[str, str], str] = {
    ("Tensor.tolist", "olmo/train_module.py::optim_step"): (
        "nonfinite_policy: stop or skip is decided on the host before the update, once per "
        "step, after forward and backward are queued"
    ),
    ("_local_scalar_dense", "olmo/train_module.py::optim_step > torch/optim/optimizer.py::_get_value"): (
        "AdamW (not capturable) reads its step count with .item(); torch keeps that count on "
        "the host even for CUDA parameters, so no device sync"
    ),
    ("Tensor.tolist", "moe_model/moe.py::activate"): (
        "moe_activation_per_expert: one coefficient set per expert runs on its rows, split by "
        "host counts (documented cost of the option)"
    ),
}
"""(op, project function) -> why the step may keep it."""

EP_ALLOWED = {
    **ALLOWED,
    ("Tensor.tolist", "moe_model/expert_parallel.py::dispatch"): (
        "expert parallelism's one split-size exchange per layer: all_to_all_single takes the "
        "split sizes as Python ints"
    ),
}

VOCAB, SEQ = 64, 16

VARIANTS: dict[str, dict] = {
    "dropless softmax (OLMoE)": {},
    "sigmoid, renormalised, route scale": dict(
        moe_router_score="sigmoid", moe_renormalize=True, moe_route_scale=2.5, moe_zloss_weight=0.0
    ),
    "aux-free bias, global-batch lb": dict(
        moe_bias_update_rate=1e-3, moe_lb_granularity="global_batch"
    ),
    "capacity drops, sequence lb": dict(moe_capacity_factor=0.5, moe_lb_granularity="sequence"),
    "shared experts, dense first block": dict(moe_shared_experts=1, moe_first_dense_layers=1),
    "swiglu, document masking": dict(
        activation_type="swiglu", mlp_hidden_size=16, document_masking=True
    ),
    "per-expert activation sets": dict(moe_activation_per_expert=True),
    "forced balance (benchmarks, planner)": dict(force_balance=True),
}


class TrainerStandIn:
    """What train_batch/optim_step read from olmo-core's Trainer; metrics kept as recorded
    (device tensors stay tensors: reading them here would be a sync of the test's own)."""

    def __init__(self):
        self.global_step, self.max_steps = 1, 4
        self.metrics: dict[str, object] = {}

    def record_metric(self, name, value, reduce_type=None, namespace=None, merge_strategy=None):
        self.metrics[name] = value


def build_module(force_balance: bool = False, **changes) -> MoETrainModule:
    torch.manual_seed(0)
    config = ModelConfig(**{
        "vocab_size": VOCAB, "embedding_size": VOCAB, "d_model": 32, "n_layers": 2,
        "n_heads": 2, "max_sequence_length": SEQ, "activation_type": "polynorm",
        "mlp_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2, **changes,
    })  # fmt: skip
    sources = {n: {"paths": ["unused.npy"], "fraction": 0.5} for n in ("web", "code")}
    cfg = TrainConfig(
        model=config, precision="fp32", global_train_batch_size=4,
        device_train_microbatch_size=2, console_log_interval=1,
        data=DataConfig(sources=sources, eos_token_id=VOCAB - 1),
    )  # fmt: skip
    if force_balance:
        cfg = plan_force_balance(cfg)  # as the planner runs it: TrainConfig refuses the key
    module = MoETrainModule(cfg.model.build(), train_module_config(cfg), torch.device("cpu"))
    module._attach_trainer(TrainerStandIn())
    return module


def batch(document_ids: bool = False) -> dict[str, torch.Tensor]:
    """A mixture batch as the loader collates it (with each token's document for masking)."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (4, SEQ), generator=gen)
    input_ids[:, 5] = VOCAB - 1  # a document boundary in every row
    collate = BatchCollator(pad_token_id=1, vocab_size=VOCAB, with_source=True,
                            eos_token_id=VOCAB - 1 if document_ids else None)  # fmt: skip
    return collate([{"input_ids": row, "source": s} for row, s in zip(input_ids, (0, 1, 1, 0))])


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_has_no_cuda_sync(variant):
    module = build_module(**VARIANTS[variant])
    # Outside the recorder: the loader's work, not the step's.
    step_batch = batch(document_ids=module.config.model.document_masking)
    with record_cuda_syncs() as syncs:
        module.train_batch(step_batch)
        module.optim_step()
    bad = unexpected(syncs, ALLOWED)
    assert not bad, "ops that sync on CUDA in the training step:\n" + "\n".join(map(str, bad))
    # The step ran what it claims to: the console-interval metrics were recorded.
    assert layer_router_entropy(module.moe_layer_ids[0]) in module.trainer.metrics


def test_forced_balance_reads_no_row_counts_from_the_device():
    """Under forced balance (benchmarks, the planner) the row counts follow from the shapes and
    are known on the host: even per-expert activation sets split their rows without a sync, so
    the step's only syncs are the optimizer's (expert parallelism: cuda_sync_worker.py)."""
    module = build_module(force_balance=True, moe_activation_per_expert=True)
    step_batch = batch()
    with record_cuda_syncs() as syncs:
        module.train_batch(step_batch)
        module.optim_step()
    optimizer_only = {key: why for key, why in ALLOWED.items() if "optim_step" in key[1]}
    bad = unexpected(syncs, optimizer_only)
    assert not bad, "syncs under forced balance:\n" + "\n".join(map(str, bad))


@pytest.mark.slow
def test_expert_parallel_training_step_has_no_cuda_sync():
    """2 gloo ranks, EP degree 2 under FSDP: dropless, capacity drops with a shared expert, the
    auxiliary-loss-free bias with global-batch balancing, per-expert activation sets, and forced
    balance (no split-size exchange at all)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "-m", "tests.olmo.cuda_sync_worker"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines().count("ok") == 2
