"""Reference math of the paper's activations (PolyCom): the formulas every kernel is tested against.

Plain PyTorch, differentiable by autograd, any device and dtype (fp32 inside; float64 stays
float64). The ``eager`` backend runs these; the ``compile`` backend compiles them; the fused and
Triton kernels (``polynorm_fused.py``, ``polynorm_triton.py``) implement the same math with
analytic backwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_model.precision import no_autocast, upcast

__all__ = [
    "poly_norm_eager",
    "poly_norm_glu_eager",
    "poly_relu_eager",
    "poly_relu_glu_eager",
    "rms_norm_no_gain",
    "split_gate_up",
]

# ---------------------------------------------------------------------------------------------
# Reference math of the paper's activations (PolyCom).
#
# Coefficient order follows the paper's released OLMoE code and Liger-Kernel: weight[0]
# multiplies the HIGHEST power. For order r, weight[i] multiplies power r - i:
#     PolyNorm(x) = w0*norm(x^3) + w1*norm(x^2) + w2*norm(x) + b          (r = 3)
# Beware two other snippets from the paper: the review thread's `_poly` indexes the weights the
# other way (weight[i] * x**(i+1)), and the README's "Using PolyNorm in Other Models" snippet
# calls torch.norm (a whole-tensor L2 norm, not a per-row RMS norm) with an undefined `weight`.
# With the default init (all weights 1/r) the first two orderings coincide, so the difference
# only shows once the coefficients train -- which is why checkpoints must agree on it.
# ---------------------------------------------------------------------------------------------


def rms_norm_no_gain(u: torch.Tensor, eps: float) -> torch.Tensor:
    """u * rsqrt(mean(u^2) + eps) per row over the last dim (no affine gain)."""
    return u * torch.rsqrt(u.pow(2).mean(dim=-1, keepdim=True) + eps)


def _poly_norm_acc(x_f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """PolyNorm of an already upcast tensor, left in its (fp32 or float64) dtype."""
    order = weight.numel()
    w_f = weight.to(x_f.dtype)
    y = bias.to(x_f.dtype).expand_as(x_f)
    for i in range(order):
        y = y + w_f[i] * rms_norm_no_gain(x_f.pow(order - i), eps)
    return y


def _poly_relu_acc(x_f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PolyReLU of an already upcast tensor, left in its (fp32 or float64) dtype."""
    order = weight.numel()
    r_f = F.relu(x_f)
    w_f = weight.to(r_f.dtype)
    y = bias.to(r_f.dtype).expand_as(r_f)
    for i in range(order):
        y = y + w_f[i] * r_f.pow(order - i)
    return y


def poly_norm_eager(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """PolyNorm: sum_i weight[i] * norm(x ** (r - i)) + bias, r = len(weight).

    Powers and norms run in fp32 and the result is cast back to ``x.dtype``: bf16 x**3 keeps
    only 8 mantissa bits and fp16 x**3 overflows for |x| > 40. In fp32, |x| up to 1e3 stays
    finite for r <= 4 (mean of x^8 ~ 1e24 << 3e38).
    """
    with no_autocast(x):
        return _poly_norm_acc(upcast(x), weight, bias, eps).to(x.dtype)


def poly_relu_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PolyReLU: sum_i weight[i] * relu(x) ** (r - i) + bias, r = len(weight); fp32 inside."""
    with no_autocast(x):
        return _poly_relu_acc(upcast(x), weight, bias).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Gated forms (Motif): act(gate) * up on the fused expert input [gate | up] of width 2H.
#
# Motif-2.6B's MLP is down_proj(PolyNorm(gate_proj(x)) * up_proj(x)) (vLLM's MotifMLP: the first
# half of its merged gate_up projection goes through PolyNorm, the second half multiplies), and
# Motif's training kernel ``FusedMulPolyNorm`` (Hugging Face ``Motif-Technologies/activation``)
# computes ``poly_norm(x) * mul`` with the product in fp32 and one downcast at the end. The
# PolyNorm is the paper's: order 3, weight[0] on the highest power, init 1/3 each, bias 0, the
# per-row RMS norm over the gate's H columns.
# ---------------------------------------------------------------------------------------------


def split_gate_up(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) halves of the fused input [gate | up] (..., 2H); ValueError on an odd width."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"a gated activation takes the fused input [gate | up] of even width 2H, got "
            f"shape {tuple(x.shape)} (a non-gated hidden size?)"
        )
    return x.chunk(2, dim=-1)


def poly_norm_glu_eager(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """PolyNorm(gate) * up on [gate | up] (..., 2H) -> (..., H); PolyNorm and product in fp32,
    one cast back to ``x.dtype`` (Motif's FusedMulPolyNorm)."""
    with no_autocast(x):
        gate, up = split_gate_up(upcast(x))
        return (_poly_norm_acc(gate, weight, bias, eps) * up).to(x.dtype)


def poly_relu_glu_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PolyReLU(gate) * up on [gate | up] (..., 2H) -> (..., H); fp32 inside, one cast back."""
    with no_autocast(x):
        gate, up = split_gate_up(upcast(x))
        return (_poly_relu_acc(gate, weight, bias) * up).to(x.dtype)
