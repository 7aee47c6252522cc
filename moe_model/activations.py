"""Expert activations, one registry by name.

Every activation is an ``nn.Module`` with class attributes ``gated`` and ``has_coefficients``
(trainable coefficient parameters: one set per MoE layer or expert, kept out of weight decay).
``gated``:

* non-gated (ReLU, GELU, ReLU2, PolyReLU, PolyNorm) map ``(..., H) -> (..., H)``;
* gated (SwiGLU, PolyNormGLU, PolyReLUGLU) take the fused input ``(..., 2H)`` -- first half
  the gate input (w1), second half the up input (w3) -- and return ``(..., H)``.

The gated polynomial forms are Motif's (Motif-2.6B, arXiv 2508.09148; Motif-2-12.7B, arXiv
2511.07464): ``PolyNorm(gate) * up``, with the paper's PolyNorm on the gate half and the product
in fp32 (vLLM's ``MotifMLP``, and ``FusedMulPolyNorm`` in the Hugging Face kernel repository
``Motif-Technologies/activation``); README "Gated PolyNorm" has the sources and where they differ.

``options`` lists the constructor keywords a class accepts, so a config can hand each class
exactly the settings it understands (see ``ModelConfig.activation_kwargs``).

Adding an activation: one class here, one ``ACTIVATIONS`` entry, its tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_model.kernels.dispatch import poly_norm, poly_norm_glu, poly_relu, poly_relu_glu
from moe_model.kernels.reference import poly_norm_eager, poly_relu_eager

__all__ = [
    "ACTIVATIONS",
    "GELU",
    "PolyNorm",
    "PolyNormGLU",
    "PolyReLU",
    "PolyReLUGLU",
    "ReLU",
    "ReLU2",
    "SwiGLU",
    "build_activation",
    "poly_norm_eager",
    "poly_relu_eager",
]


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class ReLU(nn.Module):
    """relu(x)."""

    gated = False
    has_coefficients = False
    options: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class GELU(nn.Module):
    """gelu(x); exact erf form by default (``approximate="tanh"`` for the tanh form)."""

    gated = False
    has_coefficients = False
    options: tuple[str, ...] = ("approximate",)

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class ReLU2(nn.Module):
    """Squared ReLU, relu(x)^2 (Primer)."""

    gated = False
    has_coefficients = False
    options: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class SwiGLU(nn.Module):
    """silu(a) * b on the fused input [a | b] of last dim 2H (a from w1, b from w3)."""

    gated = True
    has_coefficients = False
    options: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class _Polynomial(nn.Module):
    """Shared parameters of PolyReLU/PolyNorm: ``weight`` (order,) and ``bias`` (1,).

    The parameters are created, with their init values, in ``__init__`` -- the paper's MoE code
    only handed the coefficients to the experts inside ``reset_parameters``, so models built on
    the meta device or loaded without init silently ran defaults. Here they are ordinary
    registered parameters: they move with ``to_empty``, FSDP and ``state_dict``.
    """

    gated = False
    has_coefficients = True

    def __init__(self, order: int = 3, backend: str = "auto"):
        super().__init__()
        if order < 1:
            raise ValueError(f"{type(self).__name__} order must be >= 1, got {order}")
        self.order = order
        self.backend = backend
        self.weight = nn.Parameter(torch.full((order,), 1.0 / order))
        self.bias = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: weight = 1/order each, bias = 0."""
        self.weight.fill_(1.0 / self.order)
        self.bias.zero_()


class PolyReLU(_Polynomial):
    """PolyReLU(x) = sum_i weight[i] * relu(x)^(order - i) + bias."""

    options: tuple[str, ...] = ("order", "backend")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return poly_relu(x, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return f"order={self.order}, backend={self.backend!r}"


class PolyNorm(_Polynomial):
    """PolyNorm(x) = sum_i weight[i] * norm(x^(order - i)) + bias, norm = per-row RMS norm."""

    options: tuple[str, ...] = ("order", "eps", "backend")

    def __init__(self, order: int = 3, eps: float = 1e-6, backend: str = "auto"):
        super().__init__(order=order, backend=backend)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return poly_norm(x, self.weight, self.bias, self.eps, self.backend)

    def extra_repr(self) -> str:
        return f"order={self.order}, eps={self.eps}, backend={self.backend!r}"


class PolyReLUGLU(PolyReLU):
    """PolyReLU(a) * b on the fused input [a | b] of last dim 2H (a from w1, b from w3); one
    coefficient set, as PolyReLU's. By analogy with PolyNormGLU: no Motif model uses it."""

    gated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return poly_relu_glu(x, self.weight, self.bias, self.backend)


class PolyNormGLU(PolyNorm):
    """PolyNorm(a) * b on the fused input [a | b] of last dim 2H (a from w1, b from w3): Motif's
    gated PolyNorm. The norm runs over the gate's H columns; PolyNorm and product in fp32."""

    gated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return poly_norm_glu(x, self.weight, self.bias, self.eps, self.backend)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": ReLU,
    "gelu": GELU,
    "relu2": ReLU2,
    "swiglu": SwiGLU,
    "polyrelu": PolyReLU,
    "polynorm": PolyNorm,
    "polyrelu_glu": PolyReLUGLU,
    "polynorm_glu": PolyNormGLU,
}


def get_activation_class(name: str) -> type[nn.Module]:
    """The registered class for ``name``; ValueError listing the known names otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; known activations: {sorted(ACTIVATIONS)}"
        ) from None


def build_activation(name: str, **kwargs) -> nn.Module:
    """Build the activation registered as ``name`` with constructor ``kwargs``."""
    cls = get_activation_class(name)
    unknown = sorted(set(kwargs) - set(cls.options))
    if unknown:
        raise ValueError(
            f"activation {name!r} does not take {unknown}; it accepts {list(cls.options)}"
        )
    return cls(**kwargs)
