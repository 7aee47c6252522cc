"""Shared helpers of the script tests: run a script's main as the CLI does, O(1) weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from olmo.cli import run_cli
from tests.olmo.helpers import REPO


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, args: list[str]) -> int:
    """A script's main through the CLI wrapper, as `python scripts/<name>.py` runs it."""
    return run_cli(lambda: load_script(name).main(args))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at O(1) scale: norm gains around 1, matrices with unit-variance
    outputs times 2 (so routing margins and activations are O(1)), PolyNorm/PolyReLU
    coefficients away from their 1/r, 0 init. A transposed or misplaced tensor then changes the
    output, which an init of ones and 0.02-scale weights could hide."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if ".act." in name:
            p.copy_(0.5 * noise + 0.3)
        elif p.ndim == 1:
            p.copy_(1.0 + 0.5 * noise)
        else:
            p.copy_(2.0 * noise / p.shape[-1] ** 0.5)
    return model


def assert_fails(capsys, script: str, args: list[str], *needles: str) -> str:
    """The script exits 2 with one ``error: ...`` line containing every needle."""
    capsys.readouterr()
    assert run_script(script, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def no_leftovers(parent: Path, name: str) -> bool:
    """Neither ``parent/name`` nor a temporary sibling of it exists."""
    return not any(p.name == name or p.name.startswith(f".{name}.partial") for p in parent.iterdir())
