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


def test_gated_polynomial_forms_have_swiglu_parameters_plus_coefficients():
    """polynorm_glu / polyrelu_glu: three expert matrices like SwiGLU (h = 1024 at OLMoE-1B-7B),
    plus PolyNorm's 4 coefficients per layer (16 layers), in the totals and the FLOPs."""
    swiglu = ModelConfig()
    for act in ("polynorm_glu", "polyrelu_glu"):
        assert equal_param_hidden_size(1024, "swiglu", act) == 1024
        assert equal_param_hidden_size(1536, "polynorm", act) == 1024
        assert equal_param_hidden_size(1024, act, "polynorm") == 1536
        gated = ModelConfig(activation_type=act, mlp_hidden_size=1024)
        assert gated.mlp_in_size == 2048
        assert gated.num_params() - swiglu.num_params() == 16 * 4
        assert gated.num_active_params() - swiglu.num_active_params() == 16 * 4
        assert gated.num_flops_per_token(4096) - swiglu.num_flops_per_token(4096) == 6 * 16 * 4
        # And exactly the non-gated PolyNorm at 1536 (same matrices, same coefficients).
        assert gated.num_params() == ModelConfig(activation_type="polynorm", mlp_hidden_size=1536).num_params()


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


# ---- routing and balancing variants -----------------------------------------------------------

VARIANT_OPTIONS = [
    {"moe_shared_experts": 1},
    {"moe_shared_experts": 2, "moe_shared_hidden_size": 40},
    {"moe_first_dense_layers": 1},
    {"moe_first_dense_layers": 2, "moe_first_dense_hidden_size": 56},
    {"moe_bias_update_rate": 1e-3},
    {"moe_router_score": "sigmoid", "moe_zloss_weight": 0.0, "moe_route_scale": 2.5},
    {"moe_capacity_factor": 1.25, "moe_lb_granularity": "sequence"},
    {"moe_shared_experts": 1, "moe_first_dense_layers": 1, "moe_activation_per_expert": True},
]


@pytest.mark.parametrize("activation", ["swiglu", "polynorm", "gelu"])
@pytest.mark.parametrize("extra", VARIANT_OPTIONS)
def test_variant_counts_equal_numel(activation, extra):
    config = ModelConfig(
        vocab_size=100, embedding_size=128, d_model=32, n_layers=3, n_heads=4,
        mlp_hidden_size=24, moe_num_experts=5, moe_top_k=2, activation_type=activation, **extra,
    )  # fmt: skip
    model = config.build("meta")
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    # Active: everything but the E-K unchosen routed experts of every MoE layer.
    expert = 32 * (48 if activation == "swiglu" else 24) + 24 * 32
    unchosen = (5 - 2) * expert * len(config.moe_layer_ids)
    if config.activation_sets_per_layer > 1:
        unchosen += (5 - 2) * 4 * len(config.moe_layer_ids)
    assert config.num_params() - config.num_active_params() == unchosen
    non_embedding = config.num_active_params() - 128 * 32
    assert config.num_flops_per_token(16) == 6 * non_embedding + 12 * 3 * 32 * 16


def test_shared_and_dense_sizes_in_the_counts():
    base = ModelConfig(d_model=64, n_heads=4, n_layers=4, mlp_hidden_size=32, moe_num_experts=8,
                       moe_top_k=2, activation_type="swiglu")
    swiglu_ffn = lambda h: 3 * 64 * h  # noqa: E731
    shared = base.replace(moe_shared_experts=2, moe_shared_hidden_size=16)
    assert shared.num_params() - base.num_params() == 4 * 2 * swiglu_ffn(16)
    assert shared.num_active_params() - base.num_active_params() == 4 * 2 * swiglu_ffn(16)
    dense = base.replace(moe_first_dense_layers=1)  # default width K * H = 64
    moe_layer = 64 * 8 + 8 * swiglu_ffn(32)
    assert base.num_params() - dense.num_params() == moe_layer - swiglu_ffn(64)
    # The dense FFN's default width makes its active weights the routed experts' (router aside).
    assert base.num_active_params() - dense.num_active_params() == 64 * 8
    assert dense.moe_layer_ids == [1, 2, 3] and dense.num_moe_layers == 3


def test_fine_grained_experts_at_equal_parameters():
    """64 experts of H/4, top-8 against 16 of H, top-2: the same total and active counts; the
    equal-parameter PolyNorm size of the fine-grained SwiGLU expert."""
    coarse = ModelConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=128,
                         moe_num_experts=16, moe_top_k=2, activation_type="swiglu")
    fine = coarse.replace(mlp_hidden_size=32, moe_num_experts=64, moe_top_k=8)
    router = 2 * 64 * (64 - 16)
    assert fine.num_params() - coarse.num_params() == router
    assert fine.num_active_params() - coarse.num_active_params() == router
    h = equal_param_hidden_size(32, "swiglu", "polynorm")
    poly = fine.replace(activation_type="polynorm", mlp_hidden_size=h)
    assert h == 48 and poly.num_params() - fine.num_params() == 2 * 4  # coefficients only
    assert poly.num_params() == sum(p.numel() for p in poly.build("meta").parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"moe_router_score": "tanh"}, "model.moe_router_score='tanh' must be one of"),
        ({"moe_lb_granularity": "batch"}, "model.moe_lb_granularity='batch' must be one of"),
        ({"moe_shared_experts": 1, "moe_shared_hidden_size": 0}, "model.moe_shared_hidden_size=0"),
        ({"moe_shared_hidden_size": 64}, "is unused: model.moe_shared_experts is 0"),
        ({"moe_shared_experts": -1}, "model.moe_shared_experts=-1 must be >= 0"),
        ({"moe_first_dense_layers": 16}, "model.moe_first_dense_layers=16 must be < model.n_layers=16"),
        ({"moe_first_dense_hidden_size": 64}, "is unused: model.moe_first_dense_layers is 0"),
        ({"moe_capacity_factor": 0.0}, "model.moe_capacity_factor=0.0 must be > 0"),
        ({"moe_bias_update_rate": -1e-3}, "model.moe_bias_update_rate=-0.001 must be > 0"),
        ({"moe_route_scale": 0}, "model.moe_route_scale=0.0 must be > 0"),
        ({"moe_router_score": "sigmoid"}, "model.moe_zloss_weight=0.001 is the softmax router's"),
        ({"moe_renormalize": True, "moe_top_k": 1},
         "model.moe_renormalize=true with model.moe_top_k=1 makes every combine weight 1, so the "
         "router gets no gradient from the LM loss; set model.moe_renormalize=false or "
         "model.moe_top_k > 1"),
        ({"moe_lb_granularity": "sequence", "moe_loss_weight": 0.0}, "has no effect"),
        ({"block_type": "dense", "moe_shared_experts": 1}, "needs model.block_type='moe'"),
        ({"block_type": "dense", "moe_capacity_factor": 1.0}, "model.moe_capacity_factor=1.0 needs"),
        ({"moe_capacity_factor": "big"}, "model.moe_capacity_factor='big' must be a number"),
        ({"moe_shared_experts": 1.5}, "model.moe_shared_experts=1.5 must be an int"),
    ],
)
def test_variant_validation_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"moe_shared_experts": 1, "moe_shared_hidden_size": "64"},
         "model.moe_shared_hidden_size='64' must be an int"),
        ({"moe_first_dense_layers": 1, "moe_first_dense_hidden_size": 2.5},
         "model.moe_first_dense_hidden_size=2.5 must be an int"),
        ({"activation_backend": "cuda"}, "model.activation_backend='cuda' must be one of ['auto'"),
        ({"document_masking_backend": "xformers"},
         "model.document_masking_backend='xformers' must be one of ['auto', 'sdpa', 'flex']"),
        ({"block_type": 1}, "model.block_type=1 must be one of ['moe', 'dense']"),
    ],
)  # fmt: skip
def test_optional_and_literal_fields_are_checked(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_validator_reads_typing_forms():
    """Optional[int] (typing.Union) and int | None check alike; a Literal lists its values; an
    annotation without a rule is a programming error, not a silently unchecked field."""
    from typing import Literal, Optional

    from moe_model.config import _checked

    for kind in (Optional[int], int | None):  # noqa: UP045 (the older spelling on purpose)
        assert _checked("k", None, kind) is None
        assert _checked("k", 3, kind) == 3
        with pytest.raises(ConfigError, match=r"^k='3' must be an int$"):
            _checked("k", "3", kind)
    assert _checked("k", "1e-5", float | None) == 1e-5
    with pytest.raises(ConfigError, match=r"^k='c' must be one of \['a', 'b'\]$"):
        _checked("k", "c", Literal["a", "b"])
    with pytest.raises(TypeError, match="no check"):
        _checked("k", [1], list[int])
