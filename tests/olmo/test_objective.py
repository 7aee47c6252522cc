"""olmo/objective.py: the loss that training and the benchmarks backpropagate."""

from __future__ import annotations

import pytest
import torch

from olmo.objective import objective


@pytest.mark.parametrize("num_micro", [1, 3])
def test_auxiliary_losses_are_divided_by_the_micro_batches_and_summed(num_micro):
    ce = torch.tensor(2.5, dtype=torch.float64)
    lb, z = torch.tensor(0.0125, dtype=torch.bfloat16), torch.tensor(0.003, dtype=torch.bfloat16)
    terms = objective(ce, lb, z, num_micro)
    assert terms.lb.dtype == terms.z.dtype == torch.float32  # never left in bf16
    assert terms.lb.item() == pytest.approx(float(lb) / num_micro, rel=1e-7)
    assert terms.z.item() == pytest.approx(float(z) / num_micro, rel=1e-7)
    assert terms.total.item() == pytest.approx(2.5 + (float(lb) + float(z)) / num_micro, rel=1e-7)


def test_every_term_reaches_the_gradient():
    ce, lb, z = (torch.tensor(v, requires_grad=True) for v in (1.0, 0.5, 0.25))
    objective(ce, lb, z, num_micro_batches=4).total.backward()
    assert (ce.grad.item(), lb.grad.item(), z.grad.item()) == (1.0, 0.25, 0.25)
