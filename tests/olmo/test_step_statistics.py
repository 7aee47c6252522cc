"""StepStatistics: micro-batch sums recorded once, in float64 so the sums are exact."""

from types import SimpleNamespace

import torch

from olmo import metric_names as names
from olmo.step_statistics import StepStatistics


def output(load_LE, entropy_L, dropped_L):
    return SimpleNamespace(tokens_per_expert_LE=load_LE, router_entropy_L=entropy_L, dropped_rows_L=dropped_L)


def recorder():
    metrics = {}

    def record_metric(name, value, reduce_type=None):
        assert name not in metrics, f"{name} recorded twice"
        metrics[name] = float(value)

    return metrics, record_metric


def test_sums_over_micro_batches_and_records_each_statistic_once():
    f64 = dict(dtype=torch.float64)
    stats = StepStatistics(*(torch.zeros((), **f64) for _ in range(3)))
    micro = [
        (output(torch.tensor([[3, 1], [0, 4]]), torch.tensor([0.5, 0.25], **f64), torch.tensor([1, 0])),
         torch.tensor([[2.0, 5, 6], [1, 1, 2]], **f64)),
        (output(torch.tensor([[1, 3], [2, 2]]), torch.tensor([0.25, 0.75], **f64), torch.tensor([2, 3])),
         torch.tensor([[1.0, 2, 2], [4, 3, 4]], **f64)),
    ]
    for i, (out, sources) in enumerate(micro):
        stats.add(out, ce=torch.tensor(1.0 + i, **f64), lb=torch.tensor(0.125, **f64),
                  z=torch.tensor(0.0625, **f64), num_micro=2, source_sums_N3=sources)  # fmt: skip
    metrics, record_metric = recorder()
    stats.record(record_metric, moe_layer_ids=[1, 3], source_names=["web", "code"])
    assert metrics[names.CE_LOSS] == 3.0 and metrics[names.LB_LOSS] == 0.25
    assert metrics[names.Z_LOSS] == 0.125 and metrics[names.TOTAL_LOSS] == 3.375
    assert [metrics[names.expert_count(3, e)] for e in (0, 1)] == [2.0, 6.0]
    assert metrics[names.expert_count(1, 0)] == 4.0
    assert metrics[names.layer_router_entropy(1)] == 0.375 and metrics[names.layer_router_entropy(3)] == 0.5
    assert metrics[names.dropped_count(1)] == 3.0 and metrics[names.dropped_count(3)] == 3.0
    assert metrics[names.source_sum("code", "tokens")] == 6.0
    assert metrics[names.source_sum("web", "loss_tokens")] == 7.0


def test_a_dense_model_records_only_the_losses():
    stats = StepStatistics.zeros(torch.device("cpu"))
    stats.add(output(torch.zeros(0, 4), None, None), ce=torch.tensor(2.0), lb=torch.tensor(0.0),
              z=torch.tensor(0.0), num_micro=1)  # fmt: skip
    metrics, record_metric = recorder()
    stats.record(record_metric, moe_layer_ids=[], source_names=[])
    assert metrics == {names.CE_LOSS: 2.0, names.LB_LOSS: 0.0, names.Z_LOSS: 0.0, names.TOTAL_LOSS: 2.0}
