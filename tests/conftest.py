"""Test-wide settings."""

import multiprocessing
import os

import pytest
import torch

# Tests use tiny tensors, where extra threads only add overhead on a small shared CPU; runs
# started as subprocesses get OMP_NUM_THREADS=1 from tests/olmo/helpers.py.
torch.set_num_threads(1)
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "hf_modules"))


@pytest.fixture(autouse=True)
def _process_state_restored():
    """Puts back what a training run inside the test process changes for the whole process:
    olmo-core's prepare_training_environment sets the default device (a global torch function
    mode every later torch call would pass through, whose frames stack-reading tests would see)
    and the multiprocessing start method."""
    start_method = multiprocessing.get_start_method(allow_none=True)
    yield
    torch.set_default_device(None)
    if multiprocessing.get_start_method(allow_none=True) != start_method:
        multiprocessing.set_start_method(start_method, force=True)
