"""The project's error family: every error a user can cause, reported as one line.

The command-line entry points catch :class:`PolycomError` in one place
(:func:`olmo.cli.run_cli`), print ``error: <message>`` and exit with the error's
``exit_code``; anything else is a bug and keeps its traceback. Subclasses also derive from
the builtin they refine (``ValueError``, ``FileNotFoundError``, ...), so callers that catch
the builtin keep working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "DataError",
    "LaunchError",
    "NonFiniteError",
    "ObjectStoreError",
    "OutputExistsError",
    "PolycomError",
    "TraceError",
    "project_error_behind",
]


class PolycomError(Exception):
    """Base of the errors a CLI prints as one line; the message names the key, file or value."""

    exit_code: int = 2
    """Process exit status when a CLI stops on this error (2: bad input, as argparse uses)."""


class ConfigError(PolycomError, ValueError):
    """An invalid configuration value; the message names the key."""


class DataError(PolycomError, ValueError):
    """A problem with the training data or its configuration, naming the file or key."""


class CheckpointError(PolycomError, FileNotFoundError):
    """A path that holds no readable checkpoint or config; the message says what was expected."""


class ConversionError(PolycomError, ValueError):
    """A model directory or checkpoint that cannot be converted (wrong architecture or shapes)."""


class OutputExistsError(PolycomError, FileExistsError):
    """An output path that already holds something a command would overwrite."""


class LaunchError(PolycomError, RuntimeError):
    """A problem with the run's inputs or save folder found before (or on resuming) training."""


class TraceError(PolycomError, ValueError):
    """A routing trace that is missing, unreadable, or from another model shape or sequence
    length than the model it is replayed on (olmo/routing_trace.py)."""


class NonFiniteError(PolycomError, RuntimeError):
    """A non-finite loss or gradient norm; raised on every rank before the optimizer update."""

    exit_code = 1  # the inputs were fine; the run itself diverged


class ObjectStoreError(PolycomError, OSError):
    """An object-storage URL that cannot be read or written (credentials, bucket, permission,
    network after retries); the message names the URL and the cause."""


def project_error_behind(err: BaseException) -> PolycomError | None:
    """The first project error behind ``err``: itself, in its cause/context chain or, for DCP's
    CheckpointException, among the per-rank failures it collected (errors raised in worker
    threads reach the caller wrapped this way)."""
    stack, seen = [err], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PolycomError):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
        stack += [e.__context__, e.__cause__]
    return None
