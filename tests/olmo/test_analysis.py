"""Analysis: effective rank closed forms, layer similarity, and the CLI on a tiny checkpoint."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from olmo.analysis import (
    activation_coefficients,
    analyze,
    effective_rank,
    layer_similarity,
    validation_tokens,
    write_figures,
)
from olmo.checkpoint_io import load_checkpoint
from olmo.config import load_config

from .helpers import REPO, TEST_CONFIG, make_data


def test_effective_rank_closed_forms():
    for n in (1, 5, 16):
        assert effective_rank(torch.eye(n)) == pytest.approx(n)
    u, v = torch.randn(12, 1), torch.randn(1, 7)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    # Two equal singular values and the rest zero: erank 2; scale does not matter.
    assert effective_rank(5.0 * torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2.0)
    # Singular values (3, 1): p = (3/4, 1/4).
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(h))


def test_layer_similarity_of_identical_and_opposite_layers():
    h = torch.randn(3, 10, 16)
    sim = layer_similarity([h, h.clone(), -h])
    assert sim.shape == (3, 3)
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 0] == pytest.approx(1.0)
    assert sim[0, 2] == pytest.approx(-1.0)
    assert (sim == sim.T).all()


def make_checkpoint(tmp_path, activation="polynorm", hidden=48):
    """A save folder with config.yaml and step1/model_and_optim/ as the trainer lays it out."""
    from olmo_core.distributed.checkpoint import save_state_dict

    data = make_data(tmp_path)
    save = tmp_path / "run"
    cfg = load_config(TEST_CONFIG, [
        f"save_folder={save}", f"data.paths=[{data}/train*.npy]",
        "data.validation={val: [" + f"{data}/val*.npy" + "]}",
        # The OLMo tokenizer's vocabulary, so downstream tasks can run on this checkpoint too.
        "model.vocab_size=50280", "model.embedding_size=50304", "data.eos_token_id=50279",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.max_sequence_length=64", f"model.activation_type={activation}",
        f"model.mlp_hidden_size={hidden}", "model.moe_num_experts=4", "model.moe_top_k=2",
    ])
    torch.manual_seed(0)
    model = cfg.model.build()
    with torch.no_grad():  # trained-looking coefficients, distinct per layer
        for i, block in enumerate(model.blocks):
            if hasattr(block.ffn.act, "weight"):
                block.ffn.act.weight.add_(0.1 * (i + 1))
    save.mkdir(parents=True)
    (save / "config.yaml").write_text(cfg.to_yaml())
    save_state_dict(save / "step1" / "model_and_optim", {"model": model.state_dict()})
    return save, model


def test_load_checkpoint_and_analyze(tmp_path):
    save, model = make_checkpoint(tmp_path)
    loaded, cfg = load_checkpoint(save)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    ids = validation_tokens([str(tmp_path / "data" / "val*.npy")], 64, 4, np.uint16)
    assert ids.shape == (4, 64)
    result = analyze(loaded, ids, batch_size=2)
    assert set(result["effective_rank"]) == {"w1 (in)", "w2 (out)"}
    for per_layer in result["effective_rank"].values():
        assert len(per_layer) == 2 and all(len(r) == 4 for r in per_layer)
        assert all(1.0 <= x <= 32 for r in per_layer for x in r)
    sim = result["layer_similarity"]
    assert len(sim) == 3 and all(sim[i][i] == pytest.approx(1.0) for i in range(3))
    assert all(abs(sum(row) - 1) < 1e-6 and len(row) == 4 for row in result["expert_load"])
    assert all(0 <= e <= math.log(4) + 1e-6 for e in result["routing_entropy"])
    coeffs = result["activation_coefficients"]
    assert coeffs[1]["weight"] == pytest.approx([1 / 3 + 0.2] * 3)


@pytest.mark.slow
def test_analyze_cli_writes_figures(tmp_path):
    save, _ = make_checkpoint(tmp_path, activation="swiglu", hidden=32)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/analyze.py"), str(save), "--sequences", "4",
         "--out", str(tmp_path / "an")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("effective_rank", "layer_similarity", "routing", "activation_coefficients"):
        assert (tmp_path / "an" / f"{name}.png").stat().st_size > 0
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert set(result["effective_rank"]) == {"w1 (gate)", "w3 (up)", "w2 (out)"}
    assert result["max_rank"] == {"w1 (gate)": 32, "w3 (up)": 32, "w2 (out)": 32}


def test_per_expert_coefficients_are_reported_and_plotted(tmp_path):
    from tests.moe_model.test_transformer import tiny_config

    torch.manual_seed(0)
    model = tiny_config("polynorm", moe_activation_per_expert=True).build()
    with torch.no_grad():
        for e, act in enumerate(model.blocks[1].ffn.act):
            act.weight.fill_(0.1 * e)
            act.bias.fill_(-0.2 * e)
    coeffs = activation_coefficients(model)
    assert len(coeffs[1]["weight_per_expert"]) == 4 and coeffs[1]["weight_per_expert"][3] == pytest.approx([0.3] * 3)
    assert coeffs[1]["weight"] == pytest.approx([0.15] * 3)  # mean over experts 0..3
    assert coeffs[1]["bias"] == pytest.approx([-0.3])
    assert coeffs[0]["weight"] == pytest.approx([1 / 3] * 3)
    result = analyze(model, torch.randint(0, 64, (2, 16)), batch_size=2)
    assert result["activation_coefficients"] == coeffs
    paths = write_figures(result, tmp_path / "figs")
    assert paths["coefficients"].stat().st_size > 0
