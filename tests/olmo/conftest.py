"""Fixtures shared by the training tests: the uninterrupted 1- and 2-process runs of
tests/olmo/tiny_test.yaml, which test_train.py and test_reliability.py both compare against,
trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import TEST_CONFIG, make_data, run_train, tiny_overrides


@pytest.fixture(scope="session")
def straight_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("straight")


@pytest.fixture(scope="session")
def tiny_data(straight_folder) -> Path:
    """The synthetic token files the straight runs train on (``straight_folder/data``)."""
    return make_data(straight_folder)


def _train_straight(folder: Path, data: Path, nproc: int) -> Path:
    save = folder / f"straight{nproc}"
    proc = run_train([TEST_CONFIG, *tiny_overrides(save, data)], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return save


@pytest.fixture(scope="session")
def straight1(straight_folder, tiny_data) -> Path:
    """The save folder of the uninterrupted 1-process run (8 steps, checkpoints every 4)."""
    return _train_straight(straight_folder, tiny_data, 1)


@pytest.fixture(scope="session")
def straight2(straight_folder, tiny_data) -> Path:
    """The same run in 2 gloo processes (FSDP2)."""
    return _train_straight(straight_folder, tiny_data, 2)


@pytest.fixture(scope="session")
def straight_runs(straight1, straight2) -> dict[int, Path]:
    """Number of processes -> save folder of the straight run."""
    return {1: straight1, 2: straight2}
