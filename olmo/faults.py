"""Fault injection for the reliability tests, off unless ``MOE_FAULT`` is set.

``MOE_FAULT="KIND@STEP[:RANK]"`` (several separated by commas) injects, during step STEP on
rank RANK (every rank when omitted):

- ``nan_loss``: the loss of the step becomes NaN (as an overflow would make it);
- ``sigterm`` / ``sigint``: the process sends itself SIGTERM (a scheduler's preemption) or
  SIGINT (Ctrl-C);
- ``exit``: the process dies at once with exit code 3, no clean-up (as a node failure does).

The real code paths then run: the non-finite check, the signal handler and checkpointing.
Nothing in the training code knows about faults: :class:`FaultInjectionCallback` does it all,
and the launcher adds it only when ``MOE_FAULT`` is set.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from olmo_core.train.callbacks import Callback

from moe_model.errors import ConfigError

ENV_VAR = "MOE_FAULT"
KINDS = ("nan_loss", "sigterm", "sigint", "exit")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None


def parse_faults(spec: str | None) -> list[Fault]:
    faults = []
    for item in filter(None, (spec or "").split(",")):
        try:
            kind, where = item.strip().split("@")
            step, _, rank = where.partition(":")
            fault = Fault(kind, int(step), int(rank) if rank else None)
        except ValueError:
            raise ConfigError(f"{ENV_VAR}={spec!r}: expected KIND@STEP[:RANK], e.g. nan_loss@3:1") from None
        if fault.kind not in KINDS:
            raise ConfigError(f"{ENV_VAR}: unknown fault {fault.kind!r}; expected one of {list(KINDS)}")
        faults.append(fault)
    return faults


@dataclass
class FaultInjectionCallback(Callback):
    """Injects the faults of ``MOE_FAULT`` at the start of their step, outside the training code.

    Registered by the launcher only when ``MOE_FAULT`` is set, so normal runs carry no trace of
    it. ``nan_loss`` makes the model's logits NaN for that step through a forward hook (so the
    loss, and the gradients, are NaN exactly as an overflow would make them); the signals and
    the hard exit happen in ``pre_step``, where a scheduler's would land between two steps.
    """

    faults: list[Fault] = field(default_factory=list)
    rank: int = 0
    _hook: Any = None

    def _due(self, kind: str) -> bool:
        step = self.trainer.global_step
        return any(
            f.kind == kind and f.step == step and f.rank in (None, self.rank) for f in self.faults
        )

    def pre_step(self, batch: dict[str, Any]):
        del batch
        if self._due("sigterm"):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._due("sigint"):
            os.kill(os.getpid(), signal.SIGINT)
        if self._due("exit"):
            os._exit(3)
        if self._due("nan_loss"):
            self._hook = self.trainer.train_module.model.register_forward_hook(_nan_logits)

    def post_train_batch(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _nan_logits(module, inputs, output):
    del module, inputs
    if output.logits is None:  # fused_lm_loss: per-token losses instead of logits
        return dataclasses.replace(output, ce_T=output.ce_T * float("nan"))
    return dataclasses.replace(output, logits=output.logits * float("nan"))


def fault_injection_callback(rank: int) -> FaultInjectionCallback | None:
    """The callback for ``MOE_FAULT`` (None when it is unset)."""
    faults = parse_faults(os.environ.get(ENV_VAR))
    return FaultInjectionCallback(faults=faults, rank=rank) if faults else None
