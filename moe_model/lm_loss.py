"""The LM head fused with its cross-entropy: per-token losses without the (tokens, vocab) logits.

``torch.nn.functional.linear_cross_entropy`` with chunking options computes the head's logits a
slice of tokens at a time (each slice's logits about half the size of the input, by torch's
``aspect_ratio:2`` rule) and never keeps them: the backward recomputes each slice. At OLMoE's
micro-batch (4 x 4096 tokens, 50304 rows) that drops the bf16 logits, their fp32 copy and the
fp32 log-softmax that backward keeps (about 4.7 GiB per rank) for one extra LM-head GEMM in
backward.

Both operands stay in the compute dtype (bf16 on GPUs: an fp32 LM head would cost more GEMM time
than the rest of an OLMoE micro-batch); the op accumulates the logits, their log-sum-exp and the
gradients in fp32 and rounds only each token's loss to bf16 (relative error 2^-9: about 0.006
at a loss of 3, where the unfused path's bf16 logits of magnitude ~10 each carry 0.02).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn import LinearCrossEntropyOptions

from moe_model.precision import upcast

IGNORE_INDEX = -100
"""Labels that add no loss (olmo-core's label_ignore_index)."""

CHUNKED = LinearCrossEntropyOptions()
"""torch's per-device choice: chunks whose logits are half the input's size (``aspect_ratio:2``)."""


def fused_lm_cross_entropy(
    h_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of ``h_TD @ weight_VD.T`` against ``labels_T`` per token (fp32, or float64
    for a float64 model; 0 where the label is IGNORE_INDEX), without materialising the logits.
    ``h_TD`` is cast to the weight's dtype (under CPU autocast a norm may return fp32)."""
    ce_T = F.linear_cross_entropy(
        h_TD.to(weight_VD.dtype), weight_VD, labels_T, reduction="none",
        ignore_index=IGNORE_INDEX, options=CHUNKED,
    )  # fmt: skip
    return upcast(ce_T)
