"""Sparse upcycling (scripts/upcycle.py, moe_model/upcycle.py): what the MoE computes at step 0.

Every expert is the dense FFN f, so a token's MoE output is ``(sum_k w_k) * f(x)``. With
renormalised top-k weights that is f(x): the upcycled model equals the dense one. With OLMoE's
unnormalised weights it is f(x) scaled by the token's top-k router probability mass. Both are
checked in float64, block by block and through the whole model, against the combine weights
the layer used; those weights come from the router's fp32 softmax (by design), so they equal 1
or the top-k probability mass to fp32 rounding. (PolyNorm computes its powers and norms in fp32
by design, so its tolerance is fp32's; SwiGLU's, ReLU's and PolyReLU's are float64's.)
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_model.config import ModelConfig
from olmo import checkpoint_io
from olmo.config import load_config
from tests.olmo.helpers import TEST_CONFIG, make_data, read_metrics, run_train
from tests.scripts.helpers import assert_fails, no_leftovers, randomize_, run_script

VOCAB = 512
E, K = 4, 2


def dense_checkpoint(tmp_path, activation: str):
    """A dense model with O(1) weights, saved with tests/olmo/tiny_test.yaml's run settings."""
    cfg = load_config(TEST_CONFIG)
    # "loop": the reference per-expert matmuls, which also run in float64 (grouped_mm does not).
    cfg.model = cfg.model.replace(block_type="dense", activation_type=activation,
                                  moe_expert_impl="loop")
    model = randomize_(cfg.model.build().eval(), seed=0)
    path = checkpoint_io.save_unsharded(model.state_dict(), cfg.to_yaml(), tmp_path / "dense")
    return path, model.double()


def upcycle(tmp_path, dense, name: str, *flags: str):
    assert run_script("upcycle", [str(dense), str(tmp_path / name), "--num_experts", str(E),
                                  "--top_k", str(K), *flags]) == 0
    return checkpoint_io.load_model(tmp_path / name, dtype=torch.float64)


def topk_mass(x_TD: torch.Tensor, router_ED: torch.Tensor) -> torch.Tensor:
    """Sum of each token's K largest router softmax probabilities, independently in float64."""
    return (x_TD @ router_ED.T).softmax(dim=-1).topk(K, dim=-1).values.sum(dim=-1)


TOL = {"swiglu": 1e-10, "relu": 1e-10, "polyrelu": 1e-10, "polynorm": 1e-5,
       "polyrelu_glu": 1e-10, "polynorm_glu": 1e-5}


@pytest.mark.parametrize("activation", ["swiglu", "relu", "polyrelu", "polynorm", "polyrelu_glu", "polynorm_glu"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_upcycled_model_at_step_zero(tmp_path, activation, renormalize):
    dense_path, dense = dense_checkpoint(tmp_path, activation)
    flags = ["--renormalize"] if renormalize else []
    moe = upcycle(tmp_path, dense_path, "moe", *flags)
    cfg = moe.config
    assert (cfg.block_type, cfg.moe_num_experts, cfg.moe_top_k) == ("moe", E, K)
    assert cfg.moe_renormalize == renormalize
    assert cfg == dense.config.replace(block_type="moe", moe_num_experts=E, moe_top_k=K,
                                       moe_renormalize=renormalize)
    d_state, m_state = dense.state_dict(), moe.state_dict()
    for i in range(cfg.n_layers):
        w_in, w_out = d_state[f"blocks.{i}.ffn.w_in.weight"], d_state[f"blocks.{i}.ffn.w_out.weight"]
        for e in range(E):
            assert torch.equal(m_state[f"blocks.{i}.ffn.w_in_EDH"][e], w_in.T)
            assert torch.equal(m_state[f"blocks.{i}.ffn.w_out_EHD"][e], w_out.T)
    for key, value in d_state.items():
        if ".ffn.w_" not in key:
            assert torch.equal(m_state[key], value), key  # coefficients, attention, embeddings

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    tol = TOL[activation]
    # Block by block: the same FFN input gives the dense output times the top-k mass (1 when
    # renormalised; for OLMoE's weights below 1, as E > K).
    inputs = []
    hooks = [b.ffn.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
             for b in moe.blocks]
    with torch.no_grad():
        moe_logits = moe(ids).logits
    for h in hooks:
        h.remove()
    for i, x in enumerate(inputs):
        x_TD = x.reshape(-1, cfg.d_model)
        with torch.no_grad():
            y_moe, _ = moe.blocks[i].ffn(x_TD)
            y_dense, _ = dense.blocks[i].ffn(x_TD)
            # The combine weights the layer used (its router runs in fp32 by design).
            weights_TK = moe.blocks[i].ffn.route(x_TD).weights_TK
        scale_T = weights_TK.double().sum(dim=-1)
        torch.testing.assert_close(y_moe, scale_T[:, None] * y_dense, rtol=tol, atol=tol)
        # ... and that scale is 1 (renormalised) or the top-k probability mass, to fp32 rounding.
        mass_T = topk_mass(x_TD, m_state[f"blocks.{i}.ffn.router.weight"])
        expected_T = torch.ones_like(mass_T) if renormalize else mass_T
        torch.testing.assert_close(scale_T, expected_T, rtol=1e-6, atol=0)
        if not renormalize:
            assert mass_T.max() < 1 - 1e-3  # the scaling is real, not a no-op

    # Whole model: the dense model with each FFN output scaled as above gives the MoE's logits.
    def scaled(i):
        def hook(module, args, out):
            x_TD = args[0].reshape(-1, cfg.d_model)
            scale_T = moe.blocks[i].ffn.route(x_TD).weights_TK.double().sum(dim=-1)
            return out[0] * scale_T.reshape(out[0].shape[:-1] + (1,)), out[1]
        return hook

    hooks = [b.ffn.register_forward_hook(scaled(i)) for i, b in enumerate(dense.blocks)]
    with torch.no_grad():
        dense_logits = dense(ids).logits
    for h in hooks:
        h.remove()
    assert moe_logits.abs().max() > 1.0
    torch.testing.assert_close(moe_logits, dense_logits, rtol=tol, atol=tol * 10)
    if renormalize:  # the plain dense model, to the fp32 rounding of the routing weights
        with torch.no_grad():
            torch.testing.assert_close(moe_logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_router_is_fresh_and_seeded(tmp_path):
    dense_path, _ = dense_checkpoint(tmp_path, "polynorm")
    a = upcycle(tmp_path, dense_path, "a", "--seed", "3").state_dict()
    b = upcycle(tmp_path, dense_path, "b", "--seed", "3").state_dict()
    c = upcycle(tmp_path, dense_path, "c", "--seed", "4", "--activation_per_expert").state_dict()
    router = "blocks.0.ffn.router.weight"
    assert torch.equal(a[router], b[router]) and not torch.equal(a[router], c[router])
    cfg = ModelConfig()  # training's router init: truncated normal, std init_std, cut at 3 std
    assert a[router].abs().max() <= cfg.init_std * cfg.init_cutoff_factor
    assert 0.5 * cfg.init_std < a[router].std() < 1.5 * cfg.init_std
    for e in range(E):  # per-expert coefficient sets: each a copy of the dense one
        assert torch.equal(c[f"blocks.1.ffn.act.{e}.weight"], a["blocks.1.ffn.act.weight"])


def test_upcycle_refuses_an_moe_checkpoint(tmp_path, capsys):
    dense_path, _ = dense_checkpoint(tmp_path, "swiglu")
    upcycle(tmp_path, dense_path, "moe")
    assert_fails(capsys, "upcycle", [str(tmp_path / "moe"), str(tmp_path / "again"),
                                     "--num_experts", "8", "--top_k", "2"],
                 "model.block_type='moe'", "dense")
    assert_fails(capsys, "upcycle", [str(dense_path), str(tmp_path / "bad"), "--num_experts", "2",
                                     "--top_k", "3"], "moe_top_k=3")
    assert no_leftovers(tmp_path, "again") and no_leftovers(tmp_path, "bad")


def upcycle_args(src, out) -> list[str]:
    return [str(src), str(out), "--num_experts", str(E), "--top_k", str(K)]


def test_upcycle_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_fails(capsys, "upcycle", upcycle_args(tmp_path / "empty", tmp_path / "out"),
                 f"{str(tmp_path / 'empty')!r} holds no checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert list((tmp_path / "empty").iterdir()) == []


def test_upcycle_refuses_a_truncated_checkpoint(tmp_path, capsys):
    dense_path, _ = dense_checkpoint(tmp_path, "polyrelu")
    weights = dense_path / checkpoint_io.WEIGHTS_FNAME
    full = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(full // 2)
    assert_fails(capsys, "upcycle", upcycle_args(dense_path, tmp_path / "a" / "out"),
                 f"{str(weights)!r} is truncated: {full // 2} bytes",
                 f"tensor data up to byte {full}")
    assert not (tmp_path / "a").exists()


def test_upcycle_refuses_weights_that_do_not_match_the_config(tmp_path, capsys):
    dense_path, _ = dense_checkpoint(tmp_path, "relu")
    yaml = (dense_path / "config.yaml").read_text()
    assert "mlp_hidden_size: 48\n" in yaml
    (dense_path / "config.yaml").write_text(yaml.replace("mlp_hidden_size: 48\n", "mlp_hidden_size: 40\n"))
    assert_fails(capsys, "upcycle", upcycle_args(dense_path, tmp_path / "out"),
                 "the dense checkpoint: tensor 'blocks.0.ffn.w_in.weight' has shape (48, 32)",
                 "expects (40, 32)")
    assert no_leftovers(tmp_path, "out")


@pytest.mark.slow
def test_training_continues_from_upcycled_model(tmp_path):
    dense_path, dense = dense_checkpoint(tmp_path, "polynorm")
    upcycle(tmp_path, dense_path, "moe", "--renormalize")
    data = make_data(tmp_path)
    save = tmp_path / "run"
    proc = run_train([str(tmp_path / "moe" / "config.yaml"), f"--save_folder={save}",
                      f"--data.paths=[{data}/train*.npy]", "--max_duration=4",
                      "--save_interval=4", "--eval_interval=100"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(save)
    assert any("checkpoint/load_duration_s" in m for m in metrics if m["step"] == 0)
    # Started from the dense model's O(1)-scale weights, far from a fresh init's ln(512).
    assert next(m for m in metrics if m["step"] == 1)["train/CrossEntropyLoss"] > math.log(VOCAB) + 1
    trained = checkpoint_io.load_state_dict(save)
    assert trained["blocks.0.ffn.w_in_EDH"].shape == (E, 32, 48)
    assert not torch.equal(trained["blocks.0.ffn.w_in_EDH"][0], trained["blocks.0.ffn.w_in_EDH"][1])
