"""Test-wide settings."""

import os

import torch

# Tests use tiny tensors, where extra threads only add overhead on a small shared CPU; runs
# started as subprocesses get OMP_NUM_THREADS=1 from tests/olmo/helpers.py.
torch.set_num_threads(1)
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "hf_modules"))
