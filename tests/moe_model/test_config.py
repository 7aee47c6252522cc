"""ModelConfig: validation, parameter/FLOP counts. The YAML configs: tests/olmo/test_config_files.py."""

from __future__ import annotations

import pytest

from moe_model.activations import ACTIVATIONS
from moe_model.config import ConfigError, ModelConfig, equal_param_hidden_size


def meta_numel(config: ModelConfig) -> int:
    return sum(p.numel() for p in config.build("meta").parameters())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(
    "extra",
    [{}, {"block_type": "dense"}, {"qk_norm": False}, {"activation_order": 2}],
)
def test_num_params_equals_numel(activation, extra):
    config = ModelConfig(
        vocab_size=100, embedding_size=128, d_model=32, n_layers=3, n_heads=4,
        mlp_hidden_size=24, moe_num_experts=5, moe_top_k=2, activation_type=activation, **extra,
    )  # fmt: skip
    assert config.num_params() == meta_numel(config)
    assert config.num_active_params() < config.num_params() or extra.get("block_type") == "dense"


def test_active_params_and_flops():
    config = ModelConfig()
    expert = 3 * 2048 * 1024
    assert config.num_params() - config.num_active_params() == 16 * (64 - 8) * expert
    non_embedding_active = config.num_active_params() - 50304 * 2048
    assert config.num_flops_per_token(4096) == 6 * non_embedding_active + 12 * 16 * 2048 * 4096
    dense = ModelConfig(block_type="dense")
    assert dense.num_active_params() == dense.num_params()


def test_equal_param_hidden_size():
    assert equal_param_hidden_size(1024, "swiglu", "polynorm") == 1536
    assert equal_param_hidden_size(1536, "polynorm", "swiglu") == 1024
    assert equal_param_hidden_size(1536, "relu", "gelu") == 1536
    assert equal_param_hidden_size(1024, "swiglu", "swiglu") == 1024
    with pytest.raises(ConfigError, match="exact"):
        equal_param_hidden_size(1537, "relu", "swiglu")
    with pytest.raises(ConfigError, match="polynorm"):
        equal_param_hidden_size(1024, "swish", "relu")


def test_defaults_are_olmoe():
    config = ModelConfig()
    assert (config.vocab_size, config.embedding_size) == (50280, 50304)
    assert config.activation_type == "swiglu" and config.mlp_in_size == 2048
    assert config.moe_renormalize is False and config.qk_norm is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"moe_top_k": 9, "moe_num_experts": 8},
            "model.moe_top_k=9 must be <= model.moe_num_experts=8",
        ),
        ({"n_heads": 3}, "model.n_heads=3 must divide model.d_model=2048"),
        ({"d_model": 48, "n_heads": 16}, "head dim"),
        ({"d_model": 0}, "model.d_model=0 must be > 0"),
        ({"n_layers": -1}, "model.n_layers=-1 must be > 0"),
        ({"mlp_hidden_size": 0}, "model.mlp_hidden_size=0"),
        ({"moe_num_experts": 0, "moe_top_k": 0}, "must be > 0"),
        ({"vocab_size": 60000}, "model.embedding_size=50304 must be >= model.vocab_size=60000"),
        ({"init_std": 0.0}, "model.init_std"),
        ({"moe_loss_weight": -1.0}, "model.moe_loss_weight"),
        ({"block_type": "hybrid"}, "model.block_type"),
        ({"moe_expert_impl": "megablocks"}, "model.moe_expert_impl"),
        ({"moe_expert_impl": "grouped_mm", "mlp_hidden_size": 100}, "multiple of 8"),
        ({"d_model": 2048.0}, "model.d_model=2048.0 must be an int"),
        ({"qk_norm": "yes"}, "model.qk_norm"),
        ({"rope_theta": "big"}, "model.rope_theta"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_activation_lists_known_names():
    with pytest.raises(ConfigError) as err:
        ModelConfig(activation_type="swish")
    assert "model.activation_type='swish'" in str(err.value)
    for name in ACTIVATIONS:
        assert name in str(err.value)
    assert isinstance(err.value, ValueError)


def test_from_dict_and_types():
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"d_model": 64, "n_head": 4})
    # PyYAML reads 1e-5 (no dot) as a string; ints are fine for floats.
    config = ModelConfig(layer_norm_eps="1e-5", rope_theta=500000)
    assert config.layer_norm_eps == 1e-5 and isinstance(config.rope_theta, float)
    assert ModelConfig(activation_type="polynorm").activation_kwargs() == {
        "order": 3, "eps": 1e-6, "backend": "auto",
    }  # fmt: skip
    assert ModelConfig(activation_type="polyrelu").activation_kwargs() == {
        "order": 3, "backend": "auto",
    }  # fmt: skip
    assert ModelConfig(activation_type="relu2").activation_kwargs() == {}
