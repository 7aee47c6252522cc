"""The project's errors reach the user as one line with their exit status; bugs keep tracebacks."""

import os
import subprocess
import sys

import pytest

from moe_model.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteError,
    PolycomError,
)
from olmo.cli import run_cli

from .helpers import REPO


@pytest.mark.parametrize(
    ("error", "status"),
    [(ConfigError("model.d_model=0 must be > 0"), 2), (DataError("data.paths is empty"), 2),
     (CheckpointError("no checkpoint"), 2), (NonFiniteError("step 3: non-finite loss"), 1)],
)
def test_project_errors_print_one_line(capsys, error, status):
    def main():
        raise error

    assert run_cli(main) == status
    assert capsys.readouterr().err == f"error: {error}\n"


def test_errors_keep_their_builtin_bases():
    # Callers catching the builtin keep working.
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(CheckpointError, FileNotFoundError)
    assert all(issubclass(e, PolycomError) for e in (ConfigError, DataError, CheckpointError))


def test_other_exceptions_are_not_swallowed():
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(main)


def test_exit_status_of_a_normal_return():
    assert run_cli(lambda: None) == 0
    assert run_cli(lambda: 3) == 3


def test_olmo_core_import_adds_no_line_before_an_error():
    """olmo-core's attention module logs `transformer_engine unavailable` when imported without
    TransformerEngine; that line came before the one-line error of every CLI failure that
    imports olmo-core (e.g. the save-folder check). The olmo package drops it at its logger."""
    code = (
        "import olmo.run_files, sys\n"
        "olmo.run_files.find_checkpoints('/nonexistent')  # imports olmo_core.train.checkpoint\n"
        "assert 'olmo_core.nn.attention.te_attn_api' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
