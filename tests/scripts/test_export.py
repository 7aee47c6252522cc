"""Export to / import from Hugging Face, unsharding and generation: exact round trips.

Every activation: the exported model's logits equal the training model's (fp32), for a model
whose every weight is drawn at O(1) scale (so a transposed or misplaced tensor cannot hide behind
an init of ones and small weights). SwiGLU MoE models export as transformers' own
OlmoeForCausalLM (no remote code), the rest with remote code. Greedy ``generate`` with the KV
cache equals ``generate`` without it and the training model's own tokens. Trained (non-default)
PolyNorm and PolyReLU coefficients survive export and import -- the paper's HF path dropped them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (the hf extra; a missing install must fail, not skip)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from moe_model.activations import ACTIVATIONS  # noqa: E402
from moe_model.config import ModelConfig  # noqa: E402
from moe_model.errors import OutputExistsError  # noqa: E402
from moe_model.hf import FORMATS, export_hf, read_hf_dir  # noqa: E402
from moe_model.hf.files import SafetensorsSource  # noqa: E402
from moe_model.hf.layouts import PolyMoELayout  # noqa: E402
from moe_model.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID  # noqa: E402
from olmo import checkpoint_io  # noqa: E402
from olmo.config import TrainConfig  # noqa: E402
from tests.olmo.helpers import (  # noqa: E402
    TEST_CONFIG,
    make_data,
    read_metrics,
    run_train,
    tiny_overrides,
)
from tests.scripts.helpers import (  # noqa: E402
    assert_fails,
    load_script,
    no_leftovers,
    randomize_,
    run_script,
)

ACTS = ["relu", "gelu", "relu2", "swiglu", "polyrelu", "polynorm", "polyrelu_glu", "polynorm_glu"]
VOCAB = 512


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine idle OpenMP
    workers made each one take milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(activation: str, **changes) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB, embedding_size=VOCAB, d_model=32, n_layers=2, n_heads=2,
        max_sequence_length=32, mlp_hidden_size=48, moe_num_experts=4, moe_top_k=2,
        activation_type=activation, **changes,
    )


def tiny_model(activation: str, seed: int = 0, **changes):
    """A tiny model with every parameter drawn at O(1) scale (tests/scripts/helpers.py)."""
    return randomize_(tiny_config(activation, **changes).build().eval(), seed)


def load_hf(path: Path, remote_code: bool):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=remote_code, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    return model.eval()


def write_checkpoint(tmp_path: Path, model, name: str = "ckpt") -> Path:
    """The model as an unsharded checkpoint directory (model.safetensors + config.yaml)."""
    yaml = TrainConfig(model=model.config).to_yaml()
    return checkpoint_io.save_unsharded(model.state_dict(), yaml, tmp_path / name)


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
    native = activation == "swiglu" and block_type == "moe"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == ("olmoe" if native else "polymoe")
    assert native != any((tmp_path / "hf").glob("*.py"))  # native: no code shipped
    hf = load_hf(tmp_path / "hf", remote_code=not native)
    assert type(hf).__name__ == ("OlmoeForCausalLM" if native else "PolyMoEForCausalLM")
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 1.0  # O(1) weights give O(1)+ logits, not a near-constant
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # Greedy generate() with transformers' DynamicCache, without a cache, and the training
    # model's full recompute all give the same tokens.
    prompt = ids[:, :6]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                  eos_token_id=None, pad_token_id=None)
    cached = hf.generate(prompt, use_cache=True, **kwargs)
    uncached = hf.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy(model, prompt, 3))


def test_native_export_has_ai2_layout(tmp_path):
    """allenai/OLMoE-1B-7B-0924's key layout and config fields, tensors in Linear (out, in) form."""
    model = tiny_model("swiglu", seed=2)
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["OlmoeForCausalLM"] and "auto_map" not in config
    assert config["hidden_act"] == "silu" and config["num_key_value_heads"] == 2
    assert config["clip_qkv"] is None and config["rope_scaling"] is None
    assert config["vocab_size"] == VOCAB and config["eos_token_id"] == EOS_TOKEN_ID
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        h, state = 48, model.state_dict()
        w_in, w_out = state["blocks.1.ffn.w_in_EDH"], state["blocks.1.ffn.w_out_EHD"]
        for e in range(4):
            gate = f.get_tensor(f"model.layers.1.mlp.experts.{e}.gate_proj.weight")
            up = f.get_tensor(f"model.layers.1.mlp.experts.{e}.up_proj.weight")
            down = f.get_tensor(f"model.layers.1.mlp.experts.{e}.down_proj.weight")
            assert gate.shape == up.shape == (h, 32) and down.shape == (32, h)
            assert torch.equal(gate, w_in[e, :, :h].T) and torch.equal(up, w_in[e, :, h:].T)
            assert torch.equal(down, w_out[e].T)
        assert f.get_tensor("model.layers.0.self_attn.q_norm.weight").shape == (32,)  # full D
    per_layer = {k.split(".", 3)[3] for k in keys if k.startswith("model.layers.0.")}
    assert per_layer == {
        "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate.weight",
        *(f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
        *(f"mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")),
    }  # fmt: skip
    assert keys - {k for k in keys if k.startswith("model.layers.")} == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_remote_code_save_pretrained_round_trip(tmp_path):
    """transformers' own save_pretrained/from_pretrained of the remote-code model."""
    model = tiny_model("polynorm", seed=4)
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    hf = load_hf(tmp_path / "hf", remote_code=True)
    hf.save_pretrained(tmp_path / "resaved")
    again = load_hf(tmp_path / "resaved", remote_code=True)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    state, config = read_hf_dir(tmp_path / "resaved")
    assert config == model.config
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


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
BIAS_E = [0.4, -0.3, 0.1, -0.2]


@pytest.mark.parametrize("variant", list(ROUTING_VARIANTS))
@pytest.mark.parametrize("activation", ["polynorm", "swiglu"])
def test_routing_variants_export_and_import(tmp_path, variant, activation):
    """The remote-code model computes what the training model computes (evaluation: dropless)
    for every routing variant, with a trained (non-zero) expert bias kept fp32 in a bf16
    export; import restores every tensor exactly."""
    model = tiny_model(activation, seed=4, **ROUTING_VARIANTS[variant])
    with torch.no_grad():
        for layer in model.moe_layers():
            if layer.expert_bias_E is not None:
                layer.expert_bias_E.copy_(torch.tensor(BIAS_E))
    export_hf(model.state_dict(), model.config, tmp_path / "hf16", tokenizer_json=None,
              dtype=torch.bfloat16)
    exported = load_file(tmp_path / "hf16" / "model.safetensors")
    biases = [k for k in exported if k.endswith("e_score_correction_bias")]
    assert len(biases) == (2 if model.config.moe_bias_update_rate else 0)
    assert all(exported[k].dtype == torch.float32 for k in biases)
    assert exported["lm_head.weight"].dtype == torch.bfloat16

    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    hf = load_hf(tmp_path / "hf", remote_code=True)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    prompt = ids[:, :6]
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                      do_sample=False, eos_token_id=None, pad_token_id=None)
    assert torch.equal(out, greedy(model, prompt, 3))
    if biases:  # the bias matters: without it the choice, and the logits, differ
        with torch.no_grad():
            for buffer in (b for n, b in hf.named_buffers() if "e_score_correction" in n):
                buffer.zero_()
            assert (hf(ids).logits - model(ids).logits).abs().max() > 1e-2

    state, config = read_hf_dir(tmp_path / "hf")
    assert config == model.config
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("option, value", [
    ("moe_router_score", "sigmoid"), ("moe_route_scale", 2.5), ("moe_bias_update_rate", 1e-3),
    ("moe_shared_experts", 1), ("moe_first_dense_layers", 1),
])  # fmt: skip
def test_native_export_refuses_routing_olmoe_cannot_represent(tmp_path, capsys, option, value):
    extra = {"moe_zloss_weight": 0.0} if option == "moe_router_score" else {}
    model = tiny_model("swiglu", **{option: value}, **extra)
    assert PolyMoELayout().unsupported(model.config) is None
    assert FORMATS["olmoe"].unsupported(model.config) is not None
    ckpt = write_checkpoint(tmp_path, model)
    assert_fails(capsys, "convert_to_hf", [str(ckpt), str(tmp_path / "hf"), "--format", "olmoe"],
                 f"model.{option}=", "--format polymoe")
    assert no_leftovers(tmp_path, "hf")
    # auto picks the remote-code format for them.
    export_hf(model.state_dict(), model.config, tmp_path / "auto", tokenizer_json=None)
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["model_type"] == "polymoe"


def test_training_only_options_keep_the_native_format(tmp_path):
    """A capacity factor and a balance-loss granularity change training only: the SwiGLU model
    still exports as OlmoeForCausalLM, and comes back with them."""
    model = tiny_model("swiglu", moe_capacity_factor=1.25, moe_lb_granularity="global_batch")
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "olmoe"
    assert read_hf_dir(tmp_path / "hf")[1] == model.config


def test_left_padded_batch_generation_matches_unpadded(tmp_path):
    model = tiny_model("polynorm")
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    hf = load_hf(tmp_path / "hf", remote_code=True)
    short, long = torch.randint(0, VOCAB, (1, 3)), torch.randint(0, VOCAB, (1, 7))
    batch = torch.cat([torch.cat([torch.full((1, 4), 1), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 3)], 1), torch.ones(1, 7)]).long()
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                      eos_token_id=None, pad_token_id=1)
    assert torch.equal(out[0, 4:], greedy(model, short, 8)[0])
    assert torch.equal(out[1], greedy(model, long, 8)[0])


@pytest.mark.parametrize("activation", ["polynorm", "polyrelu", "polynorm_glu", "polyrelu_glu"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_trained_coefficients_survive_export_and_import(tmp_path, activation, per_expert):
    model = tiny_model(activation, seed=3, moe_activation_per_expert=per_expert)
    trained = act_params(model.state_dict())
    sets = model.config.moe_num_experts if per_expert else 1
    assert len(trained) == 2 * model.config.n_layers * sets
    default = torch.full((model.config.activation_order,), 1.0 / model.config.activation_order)
    assert not any(torch.equal(v, default) for k, v in trained.items() if k.endswith("weight"))

    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    hf = load_hf(tmp_path / "hf", remote_code=True)
    back_names = {PolyMoELayout.renamer.from_hf(k): v for k, v in hf.state_dict().items()}
    assert act_params(back_names).keys() == trained.keys()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    for key, value in act_params(back_names).items():
        assert torch.equal(value, trained[key]), key

    assert run_script("convert_from_hf", [str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
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
    # Small shards: the sharded form (index + several files) goes through the round trip too.
    export_hf(model.state_dict(), model.config, first, tokenizer_json=None, max_shard_size="20KB")
    assert (first / "model.safetensors.index.json").is_file()
    assert run_script("convert_from_hf", [str(first), str(tmp_path / "imported")]) == 0
    second = tmp_path / "hf2"
    assert run_script("convert_to_hf", [str(tmp_path / "imported"), str(second), "--tokenizer",
                                        "none", "--max_shard_size", "20KB"]) == 0
    for f in first.iterdir():
        assert (second / f.name).read_bytes() == f.read_bytes(), f.name  # weights and config
    state, config = read_hf_dir(second)
    assert config == model.config
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


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
    (tmp_path / "run" / "config.yaml").write_text(TrainConfig(model=model.config).to_yaml())
    assert run_script("unshard", [str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    unsharded = load_file(tmp_path / "out" / "model.safetensors")
    expected = model.state_dict()
    assert unsharded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(unsharded[key], value), key
    assert checkpoint_io.load_model_config(tmp_path / "out") == model.config


@pytest.mark.slow
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

    assert run_script("unshard", [str(save), str(tmp_path / "unsharded")]) == 0
    unsharded = load_file(tmp_path / "unsharded" / "model.safetensors")
    assert unsharded.keys() == sharded.keys()
    assert all(torch.equal(unsharded[k], v) for k, v in sharded.items())

    assert run_script("convert_to_hf", [str(save), str(tmp_path / "hf"), "--verify"]) == 0
    generate = load_script("generate")
    ids_by_source = []
    for source in (save, tmp_path / "unsharded", tmp_path / "hf"):
        capsys.readouterr()
        assert generate.main([str(source), "--prompt_ids", "5,17,300,2", "--max_new_tokens", "10",
                              "--print_ids", "--quiet", "--ignore_eos"]) == 0
        ids_by_source.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert ids_by_source[0].startswith("ids: ") and len(ids_by_source[0].split()) == 11
    assert ids_by_source[0] == ids_by_source[1] == ids_by_source[2]


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_exported_tokenizer_loads_with_autotokenizer(tmp_path, activation):
    model = tiny_model(activation)
    export_hf(model.state_dict(), model.config, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(
        tmp_path / "hf", trust_remote_code=activation != "swiglu"
    )
    assert tok.eos_token_id == EOS_TOKEN_ID and tok.pad_token_id == PAD_TOKEN_ID
    text = "To be, or not to be: that is the question."
    assert tok.decode(tok(text).input_ids) == text
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == EOS_TOKEN_ID


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
    # Every activation has a format that holds it, and auto picks native OLMoE for SwiGLU MoE.
    for act in ACTS:
        assert any(f.unsupported(tiny_config(act)) is None for f in FORMATS.values())


# ---- bad input: one line naming the cause, nothing written ----------------------------------


def test_polynorm_model_refuses_native_export(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path, tiny_model("polynorm"))
    assert_fails(capsys, "convert_to_hf", [str(ckpt), str(tmp_path / "hf"), "--format", "olmoe"],
                 "model.activation_type='polynorm'", "--format polymoe")
    assert no_leftovers(tmp_path, "hf")


def test_import_rejects_what_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_fails(capsys, "convert_from_hf", [str(tmp_path / "empty"), str(tmp_path / "out")],
                 "no config.json")
    assert_fails(capsys, "convert_from_hf", [str(tmp_path / "nowhere"), str(tmp_path / "out")],
                 "is not a directory")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_fails(capsys, "convert_from_hf", [str(tmp_path / "llama"), str(tmp_path / "out")],
                 "model_type='llama' is not supported")
    assert no_leftovers(tmp_path, "out")


def test_import_rejects_mismatched_shapes(tmp_path, capsys):
    model = tiny_model("swiglu")
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    assert_fails(capsys, "convert_from_hf", [str(tmp_path / "hf"), str(tmp_path / "out")],
                 "mlp.experts.0.gate_proj.weight", "(48, 32)", "(40, 32)")
    assert no_leftovers(tmp_path, "out")


def test_export_rejects_checkpoint_that_does_not_match_its_config(tmp_path, capsys):
    model = tiny_model("relu")
    yaml = TrainConfig(model=model.config.replace(mlp_hidden_size=40)).to_yaml()
    ckpt = checkpoint_io.save_unsharded(model.state_dict(), yaml, tmp_path / "ckpt")
    assert_fails(capsys, "convert_to_hf", [str(ckpt), str(tmp_path / "hf")],
                 "blocks.0.ffn.w_in_EDH", "(4, 32, 48)", "(4, 32, 40)")
    assert no_leftovers(tmp_path, "hf")


def test_export_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_fails(capsys, "convert_to_hf", [str(tmp_path / "empty"), str(tmp_path / "hf")],
                 f"{str(tmp_path / 'empty')!r} holds no checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert list((tmp_path / "empty").iterdir()) == []


def truncate_half(path: Path) -> tuple[int, int]:
    """Cut ``path`` to half its size; (old size, new size)."""
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full // 2)
    return full, full // 2


def test_truncated_weights_are_one_line(tmp_path, capsys):
    model = tiny_model("swiglu")
    ckpt = write_checkpoint(tmp_path, model)
    assert run_script("convert_to_hf", [str(ckpt), str(tmp_path / "hf"), "--tokenizer", "none"]) == 0
    weights = tmp_path / "hf" / "model.safetensors"
    full, cut = truncate_half(weights)
    assert_fails(capsys, "convert_from_hf", [str(tmp_path / "hf"), str(tmp_path / "out")],
                 f"{str(weights)!r} is truncated: {cut} bytes", f"tensor data up to byte {full}")
    assert no_leftovers(tmp_path, "out")
    full, cut = truncate_half(ckpt / checkpoint_io.WEIGHTS_FNAME)
    assert_fails(capsys, "convert_to_hf", [str(ckpt), str(tmp_path / "hf2")],
                 f"{str(ckpt / checkpoint_io.WEIGHTS_FNAME)!r} is truncated: {cut} bytes")
    assert no_leftovers(tmp_path, "hf2")


def test_file_cut_during_conversion_is_one_line(tmp_path, capsys, monkeypatch):
    """A file cut after it was opened fails inside the writers -- DCP's for import, which wraps
    the error in its own exception -- and is still one line, with nothing left behind."""
    model = tiny_model("swiglu")
    ckpt = write_checkpoint(tmp_path, model)
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    opened = SafetensorsSource.__init__

    def open_then_cut(self, files):
        opened(self, files)
        for path in files:
            truncate_half(path)

    monkeypatch.setattr(SafetensorsSource, "__init__", open_then_cut)
    assert_fails(capsys, "convert_from_hf", [str(tmp_path / "hf"), str(tmp_path / "a" / "b" / "out")],
                 "hf/model.safetensors ends inside tensor", "(truncated file)")
    assert_fails(capsys, "convert_to_hf", [str(ckpt), str(tmp_path / "a" / "b" / "hf"),
                                           "--tokenizer", "none"],
                 "ckpt/model.safetensors ends inside tensor", "(truncated file)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_bad_tokenizer_refused_before_writing(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path, tiny_model("relu"))
    missing = tmp_path / "nope" / "tokenizer.json"
    assert_fails(capsys, "convert_to_hf", [str(ckpt), str(tmp_path / "a" / "b" / "hf"),
                                           "--tokenizer", str(missing)],
                 f"tokenizer file {str(missing)!r} does not exist")
    (tmp_path / "bad.json").write_text('{"model": {"type": "Nope"}}')
    assert_fails(capsys, "convert_to_hf", [str(ckpt), str(tmp_path / "a" / "b" / "hf"),
                                           "--tokenizer", str(tmp_path / "bad.json")],
                 f"tokenizer file {str(tmp_path / 'bad.json')!r} does not load")
    (tmp_path / "trunc.json").write_text('{"model": ')
    assert_fails(capsys, "convert_to_hf", [str(ckpt), str(tmp_path / "a" / "b" / "hf"),
                                           "--tokenizer", str(tmp_path / "trunc.json")],
                 f"tokenizer file {str(tmp_path / 'trunc.json')!r} is not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "ckpt", "trunc.json"]


def test_failed_export_leaves_nothing_behind(tmp_path):
    model = tiny_model("swiglu")
    source = checkpoint_io.open_checkpoint(write_checkpoint(tmp_path, model))
    reads = []

    class Failing:
        def keys(self):
            return source.keys()

        def meta(self, key):
            return source.meta(key)

        def get(self, key):
            reads.append(key)
            if len(reads) == 5:
                raise OSError("disk went away")
            return source.get(key)

    with pytest.raises(OSError, match="disk went away"):
        export_hf(Failing(), model.config, tmp_path / "hf", tokenizer_json=None,
                  max_shard_size="20KB")
    assert len(reads) == 5 and no_leftovers(tmp_path, "hf")
    reads.clear()  # into new parent directories: they go too
    with pytest.raises(OSError, match="disk went away"):
        export_hf(Failing(), model.config, tmp_path / "a" / "b" / "hf", tokenizer_json=None)
    assert len(reads) == 5 and not (tmp_path / "a").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists and is not empty"):
        export_hf(model.state_dict(), model.config, tmp_path / "taken", tokenizer_json=None)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_training_continues_from_imported_model(tmp_path):
    """HF -> import -> train with load_path: weights loaded strictly, fresh optimizer, warm-up."""
    model = tiny_model("polynorm", seed=11)
    export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_json=None)
    assert run_script("convert_from_hf", [str(tmp_path / "hf"), str(tmp_path / "imp")]) == 0
    save = tmp_path / "continued"
    proc = run_train(train_args(save, make_data(tmp_path), load_path=str(tmp_path / "imp" / "model")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(save)
    assert any("checkpoint/load_duration_s" in m for m in metrics if m["step"] == 0)
    first = next(m for m in metrics if m["step"] == 1)
    # Step 1 of a fresh warm-up (peak 3e-3 over t_warmup=2 steps), not the saved run's LR.
    assert first["optim/LR"] == pytest.approx(3.0e-3 / 2, rel=1e-6)
    trained = checkpoint_io.load_state_dict(save)
    assert not torch.equal(trained["blocks.0.ffn.act.weight"], model.state_dict()["blocks.0.ffn.act.weight"])
