"""Document masking for packed sequences: document ids from EOS, per-document positions, and
the attention backends that keep each token inside its own document.

Training sequences are fixed-length windows cut from a token stream in which every document
ends with EOS, so one window packs several documents. With ``model.document_masking`` a token
attends only to the earlier tokens of its own document and its RoPE position counts from that
document's first token: each packed document is then computed exactly as if it were alone
(OLMoE attended across boundaries, with positions running through the window; that stays the
default).

Boundaries come from the tokens themselves (:func:`document_ids`, the EOS id of the data
config): one cumulative sum on the device, identical for training and validation batches, for
any dataset, with nothing extra to load, collate or shard.

Backends, chosen by ``model.document_masking_backend`` from :data:`DOCUMENT_MASK_BACKENDS`:

- ``sdpa``: a dense (B, 1, S, S) boolean mask into ``F.scaled_dot_product_attention``. Any
  device and dtype, forward and backward; costs the full causal S x S work whatever the
  document lengths.
- ``flex``: FlexAttention with a ``BlockMask``; 128 x 128 tiles that lie entirely outside every
  document are skipped, so short documents cost less. Compiled, and so is the mask builder:
  uncompiled, ``create_block_mask`` evaluates the rule into a dense B x S x S boolean tensor
  every forward (256 MiB at 16 x 4096) before reducing it to tiles; compiled, the rule is
  fused into the tile reduction and only (B, S/128, S/128) tile tables are written. Torch runs
  FlexAttention's backward on CUDA only.
- ``auto``: ``flex`` on CUDA, ``sdpa`` elsewhere.

Shape suffixes: B batch, S sequence, N heads, Dh head dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moe_model.errors import ConfigError

__all__ = [
    "DOCUMENT_MASK_BACKENDS",
    "DocumentMask",
    "build_document_mask",
    "check_flex_trainable",
    "compiled_create_block_mask",
    "document_ids",
    "document_positions",
    "resolve_document_mask_backend",
]


def document_ids(input_ids_BS: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the document each token belongs to, counting from 0 in each row (long, B x S).

    An EOS token belongs to the document it ends; the token after it starts the next one.
    """
    eos_BS = (input_ids_BS == eos_token_id).long()
    return eos_BS.cumsum(-1) - eos_BS


def document_positions(doc_BS: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (0 at the document's first token), B x S."""
    s = doc_BS.shape[-1]
    idx_BS = torch.arange(s, device=doc_BS.device).expand_as(doc_BS)
    starts_BS = torch.ones_like(doc_BS, dtype=torch.bool)
    starts_BS[..., 1:] = doc_BS[..., 1:] != doc_BS[..., :-1]
    first_BS = torch.where(starts_BS, idx_BS, 0).cummax(-1).values
    return idx_BS - first_BS


class SdpaDocumentMask:
    """Dense boolean mask: causal and same document."""

    def build(self, doc_BS: torch.Tensor) -> torch.Tensor:
        s = doc_BS.shape[-1]
        causal_SS = torch.ones(s, s, dtype=torch.bool, device=doc_BS.device).tril()
        same_doc_BSS = doc_BS.unsqueeze(-1) == doc_BS.unsqueeze(-2)
        return (same_doc_BSS & causal_SS).unsqueeze(1)

    def attend(self, q_BNSDh, k_BNSDh, v_BNSDh, mask_B1SS: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_BNSDh, k_BNSDh, v_BNSDh, attn_mask=mask_B1SS)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, flex_attention materialises the full score matrix; compiled, it generates a
    # kernel that skips the masked tiles, which is the point of this backend.
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def compiled_create_block_mask():
    """``create_block_mask`` compiled once per process: it never materialises the dense mask.

    The mask rule closes over each batch's document ids; Dynamo treats them as an input, so new
    batches of the same shape reuse one graph (no recompilation per forward)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=False)


def check_flex_trainable(device_type: str) -> None:
    """ConfigError where FlexAttention cannot train: torch implements its backward on CUDA only."""
    if device_type == "cpu":
        raise ConfigError(
            "model.document_masking_backend='flex' cannot train on device 'cpu' (torch "
            "implements FlexAttention's backward on CUDA only); use 'sdpa' or 'auto'"
        )


class FlexDocumentMask:
    """FlexAttention block mask: tiles outside every document are never computed."""

    def build(self, doc_BS: torch.Tensor) -> Any:
        if torch.is_grad_enabled():
            check_flex_trainable(doc_BS.device.type)
        b, s = doc_BS.shape
        return compiled_create_block_mask()(self.mask_mod(doc_BS), b, None, s, s, device=doc_BS.device)

    @staticmethod
    def mask_mod(doc_BS: torch.Tensor):
        """FlexAttention's per-element rule: causal and same document."""

        def same_document_causal(b_idx, h_idx, q_idx, kv_idx):
            del h_idx
            return (q_idx >= kv_idx) & (doc_BS[b_idx, q_idx] == doc_BS[b_idx, kv_idx])

        return same_document_causal

    def attend(self, q_BNSDh, k_BNSDh, v_BNSDh, block_mask: Any) -> torch.Tensor:
        return _compiled_flex_attention()(q_BNSDh, k_BNSDh, v_BNSDh, block_mask=block_mask)


DOCUMENT_MASK_BACKENDS: dict[str, Any] = {"sdpa": SdpaDocumentMask(), "flex": FlexDocumentMask()}
"""Attention backends for document masking, by name (``auto`` picks one per device). Stateless
instances, shared by every forward, so compiled blocks see the same object each step."""


def resolve_document_mask_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name not in DOCUMENT_MASK_BACKENDS:
        raise ValueError(
            f"unknown document mask backend {name!r}; expected 'auto' or one of "
            f"{sorted(DOCUMENT_MASK_BACKENDS)}"
        )
    return name


@dataclass
class DocumentMask:
    """What every attention layer of one forward needs to stay inside documents."""

    positions_BS: torch.Tensor
    """RoPE position of each token, counted from its document's first token (long)."""
    mask: Any
    """The backend's mask (a boolean tensor for sdpa, a BlockMask for flex)."""
    backend: Any
    """The backend instance that built ``mask`` and attends with it."""

    def attend(self, q_BNSDh, k_BNSDh, v_BNSDh) -> torch.Tensor:
        return self.backend.attend(q_BNSDh, k_BNSDh, v_BNSDh, self.mask)


def build_document_mask(doc_BS: torch.Tensor, backend: str = "auto") -> DocumentMask:
    """The mask and positions for document ids ``doc_BS``, built once per forward."""
    impl = DOCUMENT_MASK_BACKENDS[resolve_document_mask_backend(backend, doc_BS.device)]
    return DocumentMask(positions_BS=document_positions(doc_BS), mask=impl.build(doc_BS), backend=impl)
