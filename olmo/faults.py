"""Fault injection for the reliability tests, off unless ``MOE_FAULT`` is set.

``MOE_FAULT="KIND@STEP[:RANK]"`` (several separated by commas) injects, during step STEP on
rank RANK (every rank when omitted):

- ``nan_loss``: the loss of the step becomes NaN (as an overflow would make it);
- ``sigterm`` / ``sigint``: the process sends itself SIGTERM (a scheduler's preemption) or
  SIGINT (Ctrl-C);
- ``exit``: the process dies at once with exit code 3, no clean-up (as a node failure does).

The real code paths then run: the non-finite check, the signal handler and checkpointing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

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
            raise ValueError(f"{ENV_VAR}={spec!r}: expected KIND@STEP[:RANK], e.g. nan_loss@3:1") from None
        if fault.kind not in KINDS:
            raise ValueError(f"{ENV_VAR}: unknown fault {fault.kind!r}; expected one of {list(KINDS)}")
        faults.append(fault)
    return faults


class FaultInjector:
    def __init__(self, rank: int, spec: str | None = None):
        self.rank = rank
        self.faults = parse_faults(spec if spec is not None else os.environ.get(ENV_VAR))

    def _due(self, kind: str, step: int) -> bool:
        return any(
            f.kind == kind and f.step == step and f.rank in (None, self.rank) for f in self.faults
        )

    def loss_scale(self, step: int) -> float:
        """1.0, or NaN when a nan_loss fault is due (multiply the loss by it)."""
        return float("nan") if self._due("nan_loss", step) else 1.0

    def maybe_signal(self, step: int) -> None:
        if self._due("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._due("sigint", step):
            os.kill(os.getpid(), signal.SIGINT)
        if self._due("exit", step):
            os._exit(3)
