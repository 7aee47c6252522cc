"""The shipped YAML configs: the overlays resolve to the full files they replaced, and the
OLMoE-1B-7B configs have the published and equal parameter counts."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from olmo.config import load_config

from .helpers import REPO, run_train

CONFIGS = REPO / "configs"
OLMOE_ACTIVATIONS = ["swiglu", "polynorm", "polyrelu", "relu2", "gelu", "relu"]

# configs/olmoe-1b-7b-swiglu.yaml as a full file, before it became an overlay of olmoe-1b-7b.yaml
# (git 731131e); the other five full files differed only in run_name, activation_type and
# mlp_hidden_size.
OLD_OLMOE_SWIGLU = {
    "run_name": "olmoe-1b-7b-swiglu",
    "seed": 6198,
    "save_folder": "runs/${run_name}",
    "save_interval": 1000,
    "save_num_checkpoints_to_keep": 3,
    "max_duration": "2e11T",
    "global_train_batch_size": 1024,
    "device_train_microbatch_size": 4,
    "max_grad_norm": 1.0,
    "precision": "auto",
    "eval_interval": 1000,
    "console_log_interval": 10,
    "optimizer": {"learning_rate": 4.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.1,
                  "decay_norm_and_bias": True, "decay_embeddings": True},
    "scheduler": {"name": "cosine_with_warmup", "t_warmup": 2000, "alpha_f": 0.1},
    "data": {"paths": ["data/olmoe-mix/*.npy"], "validation": {}},
    "wandb": {"mode": "offline", "project": "moe-polycom", "group": "olmoe-1b-7b"},
    "model": {
        "vocab_size": 50280, "embedding_size": 50304, "d_model": 2048, "n_layers": 16,
        "n_heads": 16, "max_sequence_length": 4096, "rope_theta": 10000.0, "qk_norm": True,
        "layer_norm_eps": 1.0e-5, "block_type": "moe", "activation_type": "swiglu",
        "activation_order": 3, "activation_eps": 1.0e-6, "activation_backend": "auto",
        "mlp_hidden_size": 1024, "moe_num_experts": 64, "moe_top_k": 8, "moe_loss_weight": 0.01,
        "moe_zloss_weight": 0.001, "moe_renormalize": False, "moe_expert_impl": "auto",
        "init_std": 0.02, "init_cutoff_factor": 3.0,
    },
}  # fmt: skip

# configs/small-gpu-swiglu.yaml as it was (git 731131e); small-gpu-polynorm.yaml was the same
# file with run_name, activation_type and mlp_hidden_size changed.
OLD_SMALL_GPU_SWIGLU = {
    "run_name": "small-gpu-swiglu",
    "seed": 6198,
    "save_folder": "runs/${run_name}",
    "save_interval": 1000,
    "save_num_checkpoints_to_keep": 2,
    "max_duration": "5e9T",
    "global_train_batch_size": 128,
    "device_train_microbatch_size": 16,
    "max_grad_norm": 1.0,
    "precision": "auto",
    "eval_interval": 500,
    "console_log_interval": 10,
    "model": {
        "vocab_size": 50280, "embedding_size": 50304, "d_model": 512, "n_layers": 12,
        "n_heads": 8, "max_sequence_length": 2048, "activation_type": "swiglu",
        "mlp_hidden_size": 256, "moe_num_experts": 32, "moe_top_k": 4, "moe_loss_weight": 0.01,
        "moe_zloss_weight": 0.001,
    },
    "optimizer": {"learning_rate": 1.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.1},
    "scheduler": {"name": "cosine_with_warmup", "t_warmup": 1000, "alpha_f": 0.1},
    "data": {"paths": ["data/olmoe-mix/*.npy"], "validation": {}},
    "wandb": {"mode": "offline", "project": "moe-polycom", "group": "small-gpu"},
}  # fmt: skip


def old_full_file(name: str) -> dict:
    """The full YAML that configs/<name>.yaml was before it became an overlay."""
    family, _, activation = name.rpartition("-")
    old = copy.deepcopy(
        {"olmoe-1b-7b": OLD_OLMOE_SWIGLU, "small-gpu": OLD_SMALL_GPU_SWIGLU}[family]
    )
    old["run_name"] = name
    old["model"]["activation_type"] = activation
    if activation != "swiglu":
        old["model"]["mlp_hidden_size"] = old["model"]["mlp_hidden_size"] * 3 // 2
    if family == "olmoe-1b-7b":
        # The one change since: turned on by the memory plan (README "Plan a run").
        old["activation_checkpointing"] = True
    return old


OVERLAYS = [f"olmoe-1b-7b-{a}" for a in OLMOE_ACTIVATIONS] + ["small-gpu-polynorm"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_resolves_to_the_full_file_it_replaced(name, tmp_path):
    overlay = CONFIGS / f"{name}.yaml"
    assert "base" in yaml.safe_load(overlay.read_text()), f"{name}.yaml is meant to be an overlay"
    old = tmp_path / f"{name}.yaml"
    old.write_text(yaml.safe_dump(old_full_file(name), sort_keys=False))
    assert load_config(overlay).to_dict() == load_config(old).to_dict()


def test_small_gpu_swiglu_is_unchanged(tmp_path):
    old = tmp_path / "small-gpu-swiglu.yaml"
    old.write_text(yaml.safe_dump(OLD_SMALL_GPU_SWIGLU, sort_keys=False))
    assert load_config(CONFIGS / "small-gpu-swiglu.yaml").to_dict() == load_config(old).to_dict()


# README's table: OLMoE-1B-7B as published ("6.9B total, 1.3B active", allenai/OLMoE-1B-7B-0924)
# for SwiGLU; the 64 extra of PolyNorm/PolyReLU are 16 layers x 4 coefficients.
OLMOE_COUNTS = {
    "swiglu": (6_919_161_856, 1_282_017_280),
    "polynorm": (6_919_161_920, 1_282_017_344),
    "polyrelu": (6_919_161_920, 1_282_017_344),
    "relu2": (6_919_161_856, 1_282_017_280),
    "gelu": (6_919_161_856, 1_282_017_280),
    "relu": (6_919_161_856, 1_282_017_280),
}


@pytest.mark.parametrize("activation", OLMOE_ACTIVATIONS)
def test_olmoe_configs_have_the_published_counts(activation):
    model = load_config(CONFIGS / f"olmoe-1b-7b-{activation}.yaml").model
    assert model.activation_type == activation
    assert (model.d_model, model.n_layers, model.n_heads) == (2048, 16, 16)
    assert (model.moe_num_experts, model.moe_top_k) == (64, 8)
    assert model.mlp_hidden_size == (1024 if activation == "swiglu" else 1536)
    assert (model.num_params(), model.num_active_params()) == OLMOE_COUNTS[activation]


@pytest.mark.parametrize("activation", ["polynorm_glu", "polyrelu_glu"])
def test_olmoe_gated_poly_configs_have_swiglu_sizes(activation):
    """The gated forms keep SwiGLU's three matrices at H = 1024: the PolyNorm count exactly."""
    model = load_config(CONFIGS / f"olmoe-1b-7b-{activation}.yaml").model
    swiglu = load_config(CONFIGS / "olmoe-1b-7b-swiglu.yaml").model
    assert model.replace(activation_type="swiglu") == swiglu
    assert model.activation_type == activation and model.mlp_hidden_size == 1024
    assert (model.num_params(), model.num_active_params()) == OLMOE_COUNTS["polynorm"]


def test_olmoe_swiglu_count_written_out():
    d, v, layers, e, h = 2048, 50304, 16, 64, 1024
    per_layer = 4 * d * d + 4 * d + d * e + e * 3 * d * h  # attention, 2 norms, router, experts
    assert 2 * v * d + layers * per_layer + d == OLMOE_COUNTS["swiglu"][0]


@pytest.mark.slow
def test_dry_run_of_an_overlay_prints_the_merged_config_and_counts():
    proc = run_train([str(CONFIGS / "olmoe-1b-7b-polynorm.yaml"), "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    *resolved, counts = proc.stdout.splitlines()
    counts = json.loads(counts)
    assert (counts["total_params"], counts["active_params"]) == OLMOE_COUNTS["polynorm"]
    config = yaml.safe_load("\n".join(resolved))
    assert "base" not in config
    assert config["run_name"] == "olmoe-1b-7b-polynorm"
    assert config["save_folder"] == "runs/olmoe-1b-7b-polynorm"
    assert config["model"]["mlp_hidden_size"] == 1536 and config["model"]["moe_num_experts"] == 64
