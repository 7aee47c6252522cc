"""One place where the command-line entry points turn the project's errors into one line.

Every script's ``main`` runs inside :func:`run_cli`: a :class:`~moe_model.errors.PolycomError`
(bad config, data, checkpoint, launch input, a diverged run) prints ``error: <message>`` and
exits with the error's ``exit_code``; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from moe_model.errors import PolycomError

__all__ = ["print_error", "run_cli"]


def print_error(err: BaseException) -> None:
    """``error: <message>`` on stderr in one write.

    With several ranks on one stderr pipe, print()'s separate write of the newline lets another
    rank's line land in between.
    """
    sys.stderr.write(f"error: {err}\n")
    sys.stderr.flush()


def run_cli(main: Callable[[], int | None]) -> int:
    """Run ``main()``; return its exit status, or the error's for a :class:`PolycomError`."""
    try:
        return main() or 0
    except PolycomError as err:
        print_error(err)
        return err.exit_code
