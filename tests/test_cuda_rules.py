"""tests/cuda_rules.py catches what syncs on CUDA (so the step tests cannot pass by seeing
nothing), lets the fixed-shape forms through, and names the project function that ran the op."""

from __future__ import annotations

import pytest
import torch

import moe_model.moe as moe
from moe_model.config import ModelConfig
from moe_model.routing import count_per_expert
from tests.cuda_rules import record_cuda_syncs

x = torch.tensor([0.5, -1.0, 2.0, -0.25])
idx = torch.tensor([2, 0, 2, 1])
mask = x > 0

SYNCING = {
    "bincount": (lambda: torch.bincount(idx, minlength=4), "bincount"),
    "nonzero": (lambda: mask.nonzero(), "nonzero"),
    "torch.where(mask)": (lambda: torch.where(mask), "nonzero"),
    "bool mask read": (lambda: x[mask], "index"),
    "bool mask write": (lambda: x.clone().__setitem__(mask, 0.0), "index_put_"),
    "masked_select": (lambda: x.masked_select(mask), "masked_select"),
    "unique": (lambda: idx.unique(), "_unique2"),
    "unique_consecutive": (lambda: idx.unique_consecutive(), "unique_consecutive"),
    "repeat_interleave": (lambda: torch.repeat_interleave(idx), "repeat_interleave"),
    "repeat_interleave(x, t)": (lambda: x.repeat_interleave(idx), "repeat_interleave"),
    "item": (lambda: x.sum().item(), "_local_scalar_dense"),
    "bool()": (lambda: bool(x.sum() > 0), "_local_scalar_dense"),
    "int()": (lambda: int(idx.sum()), "_local_scalar_dense"),
    "tolist": (lambda: idx.tolist(), "Tensor.tolist"),
    "cpu": (lambda: x.cpu(), "Tensor.cpu"),
    "numpy": (lambda: x.numpy(), "Tensor.numpy"),
    "histc without range": (lambda: torch.histc(x, bins=4), "histc"),
    "equal": (lambda: torch.equal(x, x), "equal"),
}

SYNC_FREE = {
    "scatter_add count": lambda: torch.zeros(4, dtype=torch.long).scatter_add_(
        0, idx, torch.ones_like(idx)
    ),
    "repeat_interleave with output_size": lambda: x.repeat_interleave(idx, output_size=5),
    "histc with range": lambda: torch.histc(x, bins=4, min=-1, max=3),
    "long index": lambda: x[idx],
    "where(mask, a, b)": lambda: torch.where(mask, x, 0.0),
    "masked_fill": lambda: x.masked_fill(mask, 0.0),
    "topk, argsort, cumsum": lambda: (x.topk(2), x.argsort(stable=True), idx.cumsum(0)),
}


@pytest.mark.parametrize("case", SYNCING)
def test_records_each_syncing_op_with_its_caller(case):
    fn, op = SYNCING[case]
    with record_cuda_syncs() as syncs:
        fn()
    assert [s.op for s in syncs] == [op]
    # Called from no project module: the innermost frame that ran it (here or torch's wrapper).
    assert syncs[0].where.split("::")[0] in ("tests/test_cuda_rules.py", "torch/functional.py")


@pytest.mark.parametrize("case", SYNC_FREE)
def test_fixed_shape_forms_are_not_recorded(case):
    with record_cuda_syncs() as syncs:
        SYNC_FREE[case]()
    assert syncs == []


def test_records_syncs_in_backward():
    w = x.clone().requires_grad_()
    y = w[mask].sum()  # forward: index with a mask; backward: index_put with the same mask
    with record_cuda_syncs() as syncs:
        y.backward()
    assert [s.op for s in syncs] == ["index_put"]


def moe_layer(**changes) -> moe.MoELayer:
    torch.manual_seed(0)
    config = ModelConfig(**{
        "vocab_size": 64, "embedding_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2,
        "mlp_hidden_size": 8, "moe_num_experts": 4, "moe_top_k": 2, "activation_type": "relu",
        **changes,
    })  # fmt: skip
    return moe.MoELayer(config.moe_layer_config())


@pytest.mark.parametrize("changes", [{}, {"moe_capacity_factor": 0.5}], ids=["dropless", "capacity"])
def test_the_moe_layer_counts_without_a_sync_and_a_bincount_would_show(changes, monkeypatch):
    """The layer's forward and backward record nothing; counting with bincount again (the
    code before this check existed) is caught, in the function that calls it."""
    layer = moe_layer(**changes)
    x_TD = torch.randn(12, 16)
    with record_cuda_syncs() as syncs:
        y, aux = layer(x_TD)
        (y.sum() + aux.lb_loss).backward()
    assert syncs == []

    def bincount_counts(experts_TK, num_experts):
        return torch.bincount(experts_TK.reshape(-1), minlength=num_experts)

    monkeypatch.setattr(moe, "count_per_expert", bincount_counts)
    with record_cuda_syncs() as syncs:
        layer(x_TD)
    assert [s.op for s in syncs] == ["bincount"]
    assert syncs[0].where.startswith("moe_model/moe.py::route > ")


def test_count_per_expert_is_bincount():
    gen = torch.Generator().manual_seed(0)
    experts_TK = torch.randint(0, 7, (50, 3), generator=gen)
    experts_TK[:, 0] = 2  # a crowded expert; expert 6 may be empty
    want = torch.bincount(experts_TK.reshape(-1), minlength=9)
    assert torch.equal(count_per_expert(experts_TK, 9), want)
