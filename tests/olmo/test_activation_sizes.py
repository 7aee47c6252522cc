"""A gated activation switched on over a config file's non-gated hidden size is a one-line error
from load_config (and from the training CLI, exit 2), before anything is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from olmo.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
POLYNORM = str(REPO / "configs" / "olmoe-1b-7b-polynorm.yaml")  # polynorm at h = 1536
TINY = str(REPO / "configs" / "tiny.yaml")  # polynorm at h = 384


@pytest.mark.parametrize("path, act, size, equal", [
    (POLYNORM, "polynorm_glu", 1536, 1024),
    (POLYNORM, "polyrelu_glu", 1536, 1024),
    (TINY, "swiglu", 384, 256),
])  # fmt: skip
def test_gated_override_over_non_gated_size_is_refused(path, act, size, equal):
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"--model.activation_type={act}"])
    message = str(err.value)
    assert "\n" not in message
    assert f"model.activation_type={act!r} is gated" in message
    assert f"model.mlp_hidden_size={size} comes from {path}, sized for the non-gated 'polynorm'" in message
    assert f"--model.mlp_hidden_size={equal}" in message


def test_shared_expert_size_from_the_file_is_checked_too(tmp_path):
    cfg = tmp_path / "shared.yaml"
    cfg.write_text(
        f"base: {POLYNORM}\nmodel:\n  moe_shared_experts: 1\n  moe_shared_hidden_size: 768\n"
    )
    overrides = ["--model.activation_type=polynorm_glu", "--model.mlp_hidden_size=1024"]
    with pytest.raises(ConfigError, match=r"model.moe_shared_hidden_size=768 .*=512\)"):
        load_config(str(cfg), overrides)


@pytest.mark.parametrize("path, overrides, act, size", [
    # The size set on the command line too: the user's choice, at equal parameters or not.
    (POLYNORM, ["--model.activation_type=polynorm_glu", "--model.mlp_hidden_size=1024"], "polynorm_glu", 1024),
    (POLYNORM, ["--model.activation_type=polynorm_glu", "--model.mlp_hidden_size=1536"], "polynorm_glu", 1536),
    # The file's activation is gated already (OLMoE's SwiGLU at 1024): its size fits.
    (str(REPO / "configs" / "olmoe-1b-7b.yaml"), ["--model.activation_type=polynorm_glu"], "polynorm_glu", 1024),
    # No file: the defaults are SwiGLU's.
    (None, ["--model.activation_type=polyrelu_glu"], "polyrelu_glu", 1024),
    # Gated to non-gated is not this check's business (nor is non-gated to non-gated).
    (TINY, ["--model.activation_type=relu2"], "relu2", 384),
])  # fmt: skip
def test_allowed_overrides(path, overrides, act, size):
    model = load_config(path, overrides).model
    assert (model.activation_type, model.mlp_hidden_size) == (act, size)


@pytest.mark.slow
def test_train_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), TINY, "--model.activation_type=polynorm_glu",
         f"--save_folder={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is gated (three expert matrices)" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
