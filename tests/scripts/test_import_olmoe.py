"""Native OLMoE interop: transformers' own OlmoeForCausalLM directories in and out.

A small OlmoeForCausalLM is built and saved by transformers itself (as AI2's checkpoints are
laid out; no hub access), imported with scripts/convert_from_hf.py, compared by logits with the
training model, exported again with scripts/convert_to_hf.py (bitwise the same tensors), and
trained from. OLMoE config fields map onto ModelConfig field by field; what this model cannot
represent is refused with the field named.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (the hf extra; a missing install must fail, not skip)
from safetensors.torch import load_file  # noqa: E402

from moe_model.config import ModelConfig  # noqa: E402
from moe_model.hf import open_hf_dir  # noqa: E402
from moe_model.hf.layouts import OlmoeLayout  # noqa: E402
from moe_model.tokenizer import EMBEDDING_SIZE, VOCAB_SIZE, default_tokenizer_path  # noqa: E402
from olmo import checkpoint_io  # noqa: E402
from tests.olmo.helpers import TEST_CONFIG, make_data, read_metrics, run_train  # noqa: E402
from tests.scripts.helpers import assert_fails, no_leftovers, randomize_, run_script  # noqa: E402

VOCAB = 512

# allenai/OLMoE-1B-7B-0924's config.json as published (transformers 4.43 spelling).
AI2_CONFIG = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
    "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
}  # fmt: skip


def olmoe_dir(path: Path, dtype=torch.float32, seed: int = 0, **overrides):
    """A small OlmoeForCausalLM with O(1) weights, saved by transformers into ``path``."""
    config = transformers.OlmoeConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64, **overrides,
    })  # fmt: skip
    model = randomize_(transformers.OlmoeForCausalLM(config), seed).to(dtype).eval()
    model.save_pretrained(path)
    return model


CASES = {
    "olmoe-defaults": {},
    # Renormalised top-k, another RoPE base and norm epsilon, top-3: each must reach ModelConfig.
    "renormalized": {"norm_topk_prob": True, "num_experts_per_tok": 3, "rms_norm_eps": 1e-6,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_matches_and_reexport_is_bitwise(tmp_path, case, dtype):
    hf = olmoe_dir(tmp_path / "olmoe", dtype, **CASES[case])
    assert run_script("convert_from_hf", [str(tmp_path / "olmoe"), str(tmp_path / "imp")]) == 0
    ours = checkpoint_io.load_model(tmp_path / "imp")
    cfg = ours.config
    assert (cfg.activation_type, cfg.block_type, cfg.mlp_hidden_size) == ("swiglu", "moe", 48)
    assert cfg.moe_renormalize == hf.config.norm_topk_prob
    assert cfg.moe_top_k == hf.config.num_experts_per_tok
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert cfg.layer_norm_eps == hf.config.rms_norm_eps
    assert all(p.dtype == torch.float32 for p in ours.parameters())  # training's master weights

    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    # transformers' model, loaded in fp32 (casting the bf16 model would keep its RoPE
    # frequency buffer rounded to bf16).
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "olmoe", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(ids).logits
        mine = ours(ids).logits
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)

    # Back to HF in the original dtype: the same tensors, bit for bit, as transformers wrote.
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert run_script("convert_to_hf", [str(tmp_path / "imp"), str(tmp_path / "again"),
                                        "--tokenizer", "none", "--dtype", name]) == 0
    original = load_file(tmp_path / "olmoe" / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert original.keys() == again.keys()
    for key, value in original.items():
        assert value.dtype == again[key].dtype == dtype and torch.equal(value, again[key]), key
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "again", dtype=dtype, output_loading_info=True)
    assert not any(info.values()), info
    assert type(reloaded).__name__ == "OlmoeForCausalLM"
    for key in ("norm_topk_prob", "num_experts_per_tok", "rms_norm_eps", "rope_parameters",
                "vocab_size", "hidden_size", "intermediate_size", "num_experts"):
        assert getattr(reloaded.config, key) == getattr(hf.config, key), key


def test_ai2_olmoe_config_maps_to_the_olmoe_1b_7b_defaults(tmp_path):
    """AI2's config.json plus the OLMo tokenizer -> ModelConfig() (OLMoE-1B-7B, SwiGLU) with the
    tokenizer's 50280 ids and 50304 embedding rows; and our export writes AI2's fields back."""
    shutil.copyfile(default_tokenizer_path(), tmp_path / "tokenizer.json")
    config = OlmoeLayout().model_config(AI2_CONFIG, tmp_path)
    assert config == ModelConfig()
    assert (config.vocab_size, config.embedding_size) == (VOCAB_SIZE, EMBEDDING_SIZE)
    written = OlmoeLayout().config_json(config, torch.bfloat16)
    for key, value in AI2_CONFIG.items():
        if key != "transformers_version":
            assert written[key] == value, key
    # Without a tokenizer every embedding row counts as a token id.
    (tmp_path / "tokenizer.json").unlink()
    assert OlmoeLayout().model_config(AI2_CONFIG, tmp_path).vocab_size == EMBEDDING_SIZE


@pytest.mark.parametrize("field, value, needle", [
    ("clip_qkv", 8.0, "clip_qkv=8.0"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling="),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_type='yarn'"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("num_key_value_heads", 4, "num_key_value_heads=4"),
    ("sliding_window", 1024, "'sliding_window' is unknown"),
])  # fmt: skip
def test_import_refuses_what_the_model_cannot_represent(tmp_path, capsys, field, value, needle):
    olmoe_dir(tmp_path / "olmoe")
    path = tmp_path / "olmoe" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    assert_fails(capsys, "convert_from_hf", [str(tmp_path / "olmoe"), str(tmp_path / "out")],
                 needle, "config.json")
    assert no_leftovers(tmp_path, "out")


def test_open_hf_dir_reads_sharded_olmoe(tmp_path):
    hf = olmoe_dir(tmp_path / "o", seed=1)
    shutil.rmtree(tmp_path / "o")
    hf.save_pretrained(tmp_path / "o", max_shard_size="20KB")
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()
    layout, config, source = open_hf_dir(tmp_path / "o")
    assert layout.name == "olmoe" and config.moe_num_experts == 4
    assert set(source.keys()) == set(hf.state_dict().keys()) - {
        k for k in hf.state_dict() if ".mlp.experts." in k} | {
        f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
        for i in range(2) for e in range(4) for p in ("gate", "up", "down")}


def test_training_continues_from_imported_olmoe(tmp_path):
    """OLMoE dir -> import (with the test run's settings) -> train 4 steps from it."""
    hf = olmoe_dir(tmp_path / "olmoe", seed=3)
    assert run_script("convert_from_hf", [str(tmp_path / "olmoe"), str(tmp_path / "imp"),
                                          "--base_config", TEST_CONFIG]) == 0
    data = make_data(tmp_path)
    save = tmp_path / "run"
    proc = run_train([str(tmp_path / "imp" / "config.yaml"), f"--save_folder={save}",
                      f"--data.paths=[{data}/train*.npy]",
                      "--max_duration=4", "--save_interval=4", "--eval_interval=100"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(save)
    assert any("checkpoint/load_duration_s" in m for m in metrics if m["step"] == 0)
    trained = checkpoint_io.load_state_dict(save)
    router = hf.state_dict()["model.layers.0.mlp.gate.weight"]
    assert not torch.equal(trained["blocks.0.ffn.router.weight"], router)
    # The run started from the imported O(1)-scale weights, whose loss is far above a fresh
    # init's ln(512) = 6.2.
    first = next(m for m in metrics if m["step"] == 1)["train/CrossEntropyLoss"]
    assert math.log(VOCAB) + 1.0 < first < float("inf")
