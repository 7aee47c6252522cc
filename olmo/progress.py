"""Durations and progress lines for work a person waits on (validation, downstream evaluation)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``12s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Log lines ``{label}: {done}/{total} {unit}, {elapsed} elapsed`` for work that takes more
    than ``after`` seconds, at most one every ``every`` seconds, so that a long validation or
    evaluation is visibly alive; quick work prints nothing."""

    def __init__(self, label: str, total: int | None, unit: str = "batches",
                 after: float = 5.0, every: float = 10.0):
        self.label, self.total, self.unit = label, total, unit
        self.after, self.every = after, every
        self.start = time.monotonic()
        self._next = self.start + after

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        of = f"/{self.total}" if self.total else ""
        log.info(f"{self.label}: {done}{of} {self.unit}, {format_duration(now - self.start)} elapsed")
