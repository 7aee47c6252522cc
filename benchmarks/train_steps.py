"""Training steps through the real train module, for the step benchmarks.

The module is built as training builds it (olmo.launch.train: the model on the meta device,
materialised shard by shard inside MoETrainModule after seeding), and a step is what olmo-core's
Trainer runs per batch: ``train_batch`` (forward and backward of every micro-batch, with
olmo.objective's loss), then ``optim_step`` (clipping, the schedule, the update) and
``zero_grads``. So a change in the train module shows in the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from olmo_core.utils import seed_all

from olmo.config import TrainConfig
from olmo.train_module import MoETrainModule, train_module_config


class StepCounter:
    """What the train module reads from olmo-core's Trainer: the step counters and
    ``record_metric``. Metrics are dropped; the Trainer reduces them at its log interval, not
    inside the step."""

    def __init__(self) -> None:
        self.global_step = 0
        # A long run, so that the schedule's warm-up, not its end, sets the learning rate.
        self.max_steps = 10**9

    def record_metric(self, name, value, reduce_type=None, namespace=None, merge_strategy=None):
        pass


def build_train_module(cfg: TrainConfig, device: torch.device) -> MoETrainModule:
    seed_all(cfg.seed)
    module = MoETrainModule(cfg.model.build(init_device="meta"), train_module_config(cfg), device)
    module._attach_trainer(StepCounter())  # what olmo-core's Trainer does when it is built
    return module


def step_phases(module: MoETrainModule, batch: dict) -> Callable[[], list[Callable[[], None]]]:
    """A step as the harness's ``time_phases`` takes it: [train_batch, optim_step + zero_grads],
    the step counter advanced first as the Trainer does."""

    def phases():
        module.trainer.global_step += 1
        return [lambda: module.train_batch(dict(batch)), optimizer_step]

    def optimizer_step():
        module.optim_step()
        module.zero_grads()

    return phases


def whole_step(module: MoETrainModule, batch: dict) -> Callable[[], None]:
    """One training step as one call (for interleaved timing)."""
    phases = step_phases(module, batch)

    def step():
        for phase in phases():
            phase()

    return step
