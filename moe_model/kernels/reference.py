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

__all__ = ["poly_norm_eager", "poly_relu_eager", "rms_norm_no_gain"]

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


def poly_norm_eager(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """PolyNorm: sum_i weight[i] * norm(x ** (r - i)) + bias, r = len(weight).

    Powers and norms run in fp32 and the result is cast back to ``x.dtype``: bf16 x**3 keeps
    only 8 mantissa bits and fp16 x**3 overflows for |x| > 40. In fp32, |x| up to 1e3 stays
    finite for r <= 4 (mean of x^8 ~ 1e24 << 3e38).
    """
    with no_autocast(x):
        order = weight.numel()
        x_f = upcast(x)
        w_f = weight.to(x_f.dtype)
        y = bias.to(x_f.dtype).expand_as(x_f)
        for i in range(order):
            y = y + w_f[i] * rms_norm_no_gain(x_f.pow(order - i), eps)
        return y.to(x.dtype)


def poly_relu_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PolyReLU: sum_i weight[i] * relu(x) ** (r - i) + bias, r = len(weight); fp32 inside."""
    with no_autocast(x):
        order = weight.numel()
        r_f = F.relu(upcast(x))
        w_f = weight.to(r_f.dtype)
        y = bias.to(r_f.dtype).expand_as(r_f)
        for i in range(order):
            y = y + w_f[i] * r_f.pow(order - i)
        return y.to(x.dtype)
