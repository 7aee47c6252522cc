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
    collect,
    effective_rank,
    expert_matrices,
    layer_similarity,
    validation_tokens,
    write_figures,
)
from olmo.checkpoint_io import load_checkpoint
from olmo.config import load_config

from .helpers import REPO, TEST_CONFIG, assert_png_drawn, make_data


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


def entropy_rank(s: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)) written from the definition, for known singular values."""
    p = s.double() / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def set_known_spectra(model) -> dict[str, list[list[float]]]:
    """Give every expert matrix chosen singular values (random rotations around them) and
    return the effective ranks they imply, [layer][expert] per matrix name."""
    gen = torch.Generator().manual_seed(0)
    expected: dict[str, list[list[float]]] = {"w1 (in)": [], "w2 (out)": []}
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            for name, w_EXY in (("w1 (in)", block.ffn.w_in_EDH), ("w2 (out)", block.ffn.w_out_EHD)):
                row = []
                for e in range(w_EXY.shape[0]):
                    rows, cols = w_EXY.shape[1:]
                    n = min(rows, cols)
                    # w1: 4 * layer + e + 1 equal values; w2: a geometric decay per expert.
                    if name == "w1 (in)":
                        s = (torch.arange(n) < 4 * layer + e + 1).double()
                    else:
                        s = (0.5 + 0.1 * e) ** torch.arange(n, dtype=torch.float64)
                    u, _ = torch.linalg.qr(torch.randn(rows, n, generator=gen, dtype=torch.float64))
                    v, _ = torch.linalg.qr(torch.randn(cols, n, generator=gen, dtype=torch.float64))
                    w_EXY[e] = (0.1 * u * s @ v.T).float()
                    row.append(entropy_rank(s))
                expected[name].append(row)
    return expected


def test_load_checkpoint_and_analyze(tmp_path):
    save, model = make_checkpoint(tmp_path)
    loaded, cfg = load_checkpoint(save)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    ids = validation_tokens([str(tmp_path / "data" / "val*.npy")], 64, 4, np.uint16)
    assert ids.shape == (4, 64)

    expected_rank = set_known_spectra(loaded)
    with torch.no_grad():
        loaded.blocks[0].ffn.router.weight.zero_()  # a uniform router: entropy log(E) exactly
    # What each layer's router sees, and each block's output, captured here in one pass.
    moe_in, hidden = [], [loaded.embedding(ids).double()]
    hooks = [b.ffn.register_forward_pre_hook(lambda m, i: moe_in.append(i[0].detach()))
             for b in loaded.blocks]
    hooks += [b.register_forward_hook(lambda m, i, o: hidden.append(o[0].detach().double()))
              for b in loaded.blocks]
    with torch.no_grad():
        loaded(ids)
    for h in hooks:
        h.remove()

    result = analyze(loaded, ids, batch_size=2)
    assert set(result["effective_rank"]) == {"w1 (in)", "w2 (out)"}
    # fp32 storage leaves the zero singular values at ~1e-8, which adds that much entropy.
    for name, per_layer in expected_rank.items():
        assert result["effective_rank"][name] == [pytest.approx(r, rel=2e-5) for r in per_layer]

    assert result["routing_entropy"][0] == pytest.approx(math.log(4), rel=1e-6)
    for layer, (x, block) in enumerate(zip(moe_in, loaded.blocks)):
        logits = x.reshape(-1, x.shape[-1]) @ block.ffn.router.weight.T
        probs = logits.double().softmax(-1)
        entropy = -(probs * probs.log()).sum(-1).mean().item()
        assert result["routing_entropy"][layer] == pytest.approx(entropy, rel=1e-5), layer
        if layer > 0:  # a uniform router's top-k is a tie-break, not a choice
            counts = torch.bincount(logits.float().softmax(-1).topk(2).indices.flatten(), minlength=4)
            assert result["expert_load"][layer] == pytest.approx((counts / counts.sum()).tolist())
    assert result["routing_entropy"][1] < math.log(4) - 1e-3  # the trained-looking router

    flat = [torch.nn.functional.normalize(h.reshape(-1, h.shape[-1]), dim=-1) for h in hidden]
    cosines = [[(a * b).sum(-1).mean().item() for b in flat] for a in flat]
    assert result["layer_similarity"] == [pytest.approx(row, abs=1e-5) for row in cosines]
    coeffs = result["activation_coefficients"]
    assert coeffs[1]["weight"] == pytest.approx([1 / 3 + 0.2] * 3)


def test_gated_poly_checkpoint_splits_gate_and_up_and_reports_coefficients(tmp_path):
    save, _ = make_checkpoint(tmp_path, activation="polynorm_glu", hidden=32)
    loaded, _ = load_checkpoint(save)
    ffn = loaded.blocks[0].ffn
    matrices = expert_matrices(ffn)
    assert set(matrices) == {"w1 (gate)", "w3 (up)", "w2 (out)"}
    assert torch.equal(matrices["w1 (gate)"], ffn.w_in_EDH.detach()[..., :32])
    assert torch.equal(matrices["w3 (up)"], ffn.w_in_EDH.detach()[..., 32:])
    ids = validation_tokens([str(tmp_path / "data" / "val*.npy")], 64, 2, np.uint16)
    result = analyze(loaded, ids, batch_size=2)
    assert result["activation"] == "polynorm_glu"
    assert set(result["effective_rank"]) == {"w1 (gate)", "w3 (up)", "w2 (out)"}
    # make_checkpoint adds 0.1 * (layer + 1) to the default 1/3 of every coefficient.
    assert [c["weight"] for c in result["activation_coefficients"]] == [
        pytest.approx([1 / 3 + 0.1 * (i + 1)] * 3) for i in range(2)
    ]


@pytest.mark.slow
def test_analyze_cli_writes_figures(tmp_path):
    save, _ = make_checkpoint(tmp_path, activation="swiglu", hidden=32)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/analyze.py"), str(save), "--sequences", "4",
         "--out", str(tmp_path / "an")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("effective_rank", "layer_similarity", "routing", "activation_coefficients"):
        assert_png_drawn(tmp_path / "an" / f"{name}.png")
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert set(result["effective_rank"]) == {"w1 (gate)", "w3 (up)", "w2 (out)"}
    assert result["max_rank"] == {"w1 (gate)": 32, "w3 (up)": 32, "w2 (out)": 32}
    # The same numbers as the analysis run here on the checkpoint and the config's validation
    # set (the script's default data), first 4 sequences.
    model, _ = load_checkpoint(save)
    ids = validation_tokens([str(tmp_path / "data" / "val*.npy")], 64, 4, np.uint16)
    expected = json.loads(json.dumps(analyze(model, ids, batch_size=8)))
    assert str(save / "step1") in result.pop("checkpoint")
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == _approx_nested(value), key


def _approx_nested(value):
    """pytest.approx through nested lists and dicts of floats."""
    if isinstance(value, dict):
        return {k: _approx_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_approx_nested(v) for v in value]
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-6, abs=1e-6)
    return value


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
    assert_png_drawn(paths["coefficients"])
    assert json.loads(paths["json"].read_text())["activation_coefficients"] == coeffs


def test_routing_variants_are_analysed_by_block(tmp_path):
    """A dense first block, shared experts, a sigmoid router with a trained bias: the routing
    statistics name their blocks and follow the biased choice; shared experts get ranks and
    coefficients of their own; the figures draw."""
    from tests.moe_model.test_transformer import tiny_config

    torch.manual_seed(0)
    model = tiny_config(
        "polynorm", n_layers=3, moe_first_dense_layers=1, moe_shared_experts=2,
        moe_router_score="sigmoid", moe_zloss_weight=0.0, moe_bias_update_rate=1e-3,
    ).build()  # fmt: skip
    with torch.no_grad():
        model.blocks[2].ffn.expert_bias_E.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))
        model.blocks[2].ffn.shared_experts[1].act.bias.fill_(0.7)
    ids = torch.randint(0, 64, (2, 16))
    result = analyze(model, ids, batch_size=2)
    assert result["moe_layers"] == [1, 2]
    assert result["expert_bias"] == [[0.0] * 4, [5.0, 5.0, 0.0, 0.0]]
    # A bias of 5 against sigmoid scores in (0, 1): experts 0 and 1 take every token.
    assert result["expert_load"][1] == [0.5, 0.5, 0.0, 0.0]
    assert len(result["routing_entropy"]) == 2
    ranks = result["effective_rank"]
    assert {"w1 (in)", "w2 (out)", "shared w1 (in)", "shared w2 (out)"} == set(ranks)
    assert [len(row) for row in ranks["shared w1 (in)"]] == [2, 2]
    shared = model.blocks[1].ffn.shared_experts[0].w_out.weight.T
    assert ranks["shared w2 (out)"][0][0] == pytest.approx(
        entropy_rank(torch.linalg.svdvals(shared.double())), rel=1e-6)
    coeffs = result["activation_coefficients"]
    assert "shared" not in coeffs[0] and coeffs[2]["shared"][1]["bias"] == pytest.approx([0.7])
    paths = write_figures(result, tmp_path / "figs")
    for name in ("routing", "effective_rank", "coefficients"):
        assert_png_drawn(paths[name])


def test_collect_routes_each_token_once(monkeypatch):
    """The routing statistics come from the forward's own output: the router runs once per MoE
    layer per batch (no second pass in a hook), and the counts are the ones ModelOutput holds."""
    from moe_model.moe import MoELayer
    from tests.moe_model.test_transformer import tiny_config

    torch.manual_seed(0)
    model = tiny_config("relu", n_layers=3, moe_first_dense_layers=1).build()
    ids = torch.randint(0, 64, (3, 16))
    calls = []
    route = MoELayer.route
    monkeypatch.setattr(MoELayer, "route", lambda self, x, *rest: calls.append(x.shape) or route(self, x, *rest))
    stats = collect(model, ids, batch_size=2)
    assert len(calls) == 2 * 2  # two batches (2 + 1 sequences), two MoE layers
    model.eval()
    counts_LE = model(ids[:2]).tokens_per_expert_LE + model(ids[2:]).tokens_per_expert_LE
    assert stats["moe_layers"] == [1, 2]
    assert stats["expert_load"] == [(c / c.sum()).tolist() for c in counts_LE]


@pytest.mark.slow
def test_routing_trace_load_and_figure(tmp_path):
    """Two ranks' traces of one step: counts summed, overload factor = max / mean by hand, and
    scripts/analyze.py --routing-trace draws it."""
    from moe_model.config import ModelConfig
    from olmo.analysis import trace_load
    from olmo.routing_trace import RoutingRecorder, load_trace

    cfg = ModelConfig(vocab_size=64, embedding_size=64, d_model=16, n_layers=2, n_heads=2,
                      max_sequence_length=8, mlp_hidden_size=8, moe_num_experts=4, moe_top_k=2)  # fmt: skip
    torch.manual_seed(0)
    model = cfg.build().eval()
    paths = []
    for rank in (0, 1):
        recorder = RoutingRecorder(cfg)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            recorder.add(ids, None, model(ids).routes)
        paths.append(recorder.save(tmp_path, 5, rank, world_size=2))
    assert [p.name for p in paths] == ["step5-rank0.pt", "step5-rank1.pt"]
    traces = [load_trace(p) for p in paths]
    result = trace_load(traces)
    counts = (traces[0].counts + traces[1].counts).double()
    assert counts.sum(-1).tolist() == [2 * 2 * 8 * 2] * 2  # ranks x batch x seq x top-k
    assert result["overload_factor"] == pytest.approx((counts.max(-1).values / counts.mean(-1)).tolist())
    assert np.allclose(np.array(result["expert_load"]).sum(-1), 1.0)
    assert result["moe_layers"] == [0, 1] and result["ranks"] == [0, 1]

    proc = subprocess.run([sys.executable, str(REPO / "scripts/analyze.py"), "--routing-trace",
                           str(paths[0]), "--routing-trace", str(paths[1])],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overload" in proc.stdout
    assert_png_drawn(tmp_path / "routing" / "routing_trace_step5.png")  # beside the traces
    assert json.loads((tmp_path / "routing" / "routing_trace_step5.json").read_text()) == result
