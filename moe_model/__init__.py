"""OLMoE-architecture MoE language model with configurable expert activations."""

from moe_model.activations import (
    ACTIVATIONS,
    GELU,
    PolyNorm,
    PolyNormGLU,
    PolyReLU,
    PolyReLUGLU,
    ReLU,
    ReLU2,
    SwiGLU,
    build_activation,
    poly_norm_eager,
    poly_relu_eager,
)
from moe_model.config import ConfigError, ModelConfig, equal_param_hidden_size
from moe_model.moe import MoEAux, MoELayer
from moe_model.transformer import ModelOutput, MoETransformer

__all__ = [
    "ACTIVATIONS",
    "GELU",
    "ConfigError",
    "ModelConfig",
    "ModelOutput",
    "MoEAux",
    "MoELayer",
    "MoETransformer",
    "PolyNorm",
    "PolyNormGLU",
    "PolyReLU",
    "PolyReLUGLU",
    "ReLU",
    "ReLU2",
    "SwiGLU",
    "build_activation",
    "equal_param_hidden_size",
    "poly_norm_eager",
    "poly_relu_eager",
]
