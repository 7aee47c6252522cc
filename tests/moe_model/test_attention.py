"""Document masking: document ids and positions from EOS, and the backends' masks."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from moe_model.attention import (
    FlexDocumentMask,
    SdpaDocumentMask,
    build_document_mask,
    document_ids,
    document_positions,
    resolve_document_mask_backend,
)
from moe_model.errors import ConfigError
from tests.cpu_capability import INDUCTOR_CPU

EOS = 9


def test_document_ids_and_positions_written_out():
    ids = torch.tensor([
        [4, 5, EOS, 6, EOS, EOS, 7, 8],   # docs: [4 5 EOS] [6 EOS] [EOS] [7 8 ...
        [EOS, 1, 2, 3, 4, 5, 6, 7],       # a window starting right after a boundary
    ])  # fmt: skip
    assert document_ids(ids, EOS).tolist() == [
        [0, 0, 0, 1, 1, 2, 3, 3],
        [0, 1, 1, 1, 1, 1, 1, 1],
    ]
    assert document_positions(document_ids(ids, EOS)).tolist() == [
        [0, 1, 2, 0, 1, 0, 0, 1],
        [0, 0, 1, 2, 3, 4, 5, 6],
    ]


def _reference_mask(doc_BS: torch.Tensor) -> torch.Tensor:
    """Token i sees token j iff j <= i and both lie in the same document, element by element."""
    b, s = doc_BS.shape
    out = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        for i in range(s):
            for j in range(i + 1):
                out[r, 0, i, j] = bool(doc_BS[r, i] == doc_BS[r, j])
    return out


def test_backend_masks_match_the_definition():
    from torch.nn.attention.flex_attention import create_mask

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (3, 20), generator=gen)
    ids[0, 5] = ids[0, 6] = EOS  # adjacent boundaries: a one-token document
    doc = document_ids(ids, EOS)
    expected = _reference_mask(doc)
    assert torch.equal(SdpaDocumentMask().build(doc), expected)
    flex_dense = create_mask(FlexDocumentMask.mask_mod(doc), 3, 1, 20, 20, device="cpu")
    assert torch.equal(flex_dense, expected)


def _tile_table(num_blocks_BHQ: torch.Tensor, indices_BHQK: torch.Tensor) -> torch.Tensor:
    """A BlockMask's (num_blocks, indices) pair as a (B, Q tiles, KV tiles) boolean table."""
    b, _, q_tiles, kv_tiles = indices_BHQK.shape
    table = torch.zeros(b, q_tiles, kv_tiles, dtype=torch.bool)
    for r in range(b):
        for q in range(q_tiles):
            table[r, q, indices_BHQK[r, 0, q, : num_blocks_BHQ[r, 0, q]]] = True
    return table


@pytest.mark.slow
@INDUCTOR_CPU  # the block mask is built by a compiled function
def test_flex_block_mask_is_built_compiled_and_never_dense():
    """The flex backend's mask comes from compiled code whose every buffer is a tile table:
    nothing of B x S x S (nor one S x S) is allocated. Its tiles are those of the dense
    definition: full where every element attends, partial where some do, absent otherwise."""
    from torch._inductor.utils import run_and_get_code

    b, s, tile = 2, 512, 128
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, EOS, (b, s), generator=gen)
    ids[0, 300] = EOS  # row 0: a 301-token document (full tiles) and the rest of a second one
    ids[1, torch.randint(0, s, (20,), generator=gen)] = EOS  # row 1: short documents
    doc = document_ids(ids, EOS)
    with torch.no_grad():  # flex runs on CPU forward-only
        block_mask, codes = run_and_get_code(lambda: FlexDocumentMask().build(doc))
    shapes = [
        tuple(int(d) for d in m.split(",") if d.strip())
        for code in codes
        for m in re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)
    ]
    # No generated code (an uncompiled builder) or no allocation found would pass vacuously.
    assert shapes, "the mask was not built by compiled code"
    largest = max(math.prod(shape) for shape in shapes)
    assert largest < s * s, f"compiled mask builder allocates {largest} elements (S*S = {s * s})"

    dense_BSS = SdpaDocumentMask().build(doc)[:, 0]
    tiles = dense_BSS.reshape(b, s // tile, tile, s // tile, tile)
    full, some = tiles.all(4).all(2), tiles.any(4).any(2)
    assert full.any() and (some & ~full).any()  # both kinds of tile occur
    assert torch.equal(_tile_table(block_mask.full_kv_num_blocks, block_mask.full_kv_indices), full)
    assert torch.equal(_tile_table(block_mask.kv_num_blocks, block_mask.kv_indices), some & ~full)


def test_one_document_equals_plain_causal_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen) for _ in range(3))
    doc = torch.zeros(2, 16, dtype=torch.long)
    mask = build_document_mask(doc, "sdpa")
    assert torch.equal(mask.positions_BS, torch.arange(16).expand(2, 16))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(mask.attend(q, k, v), expected, rtol=1e-6, atol=1e-6)


def test_backend_names():
    assert resolve_document_mask_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_document_mask_backend("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="'xformers'"):
        resolve_document_mask_backend("xformers", torch.device("cpu"))


def test_flex_refuses_to_train_on_cpu():
    """A project error (one line from the CLIs), not torch's backward failure later on."""
    doc = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"^model.document_masking_backend='flex' cannot train "
                       r"on device 'cpu' \(torch implements FlexAttention's backward on CUDA "
                       r"only\); use 'sdpa' or 'auto'$"):
        build_document_mask(doc, "flex")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_matches_sdpa_forward_and_backward_on_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, n, s, dh = 2, 4, 512, 64
    ids = torch.randint(0, 100, (b, s), device="cuda", generator=gen)
    ids[ids < 3] = EOS  # documents of ~30 tokens
    doc = document_ids(ids, EOS)
    grads = {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, s, dh, device="cuda", requires_grad=True) for _ in range(3))
        out = build_document_mask(doc, backend).attend(q, k, v)
        out.square().sum().backward()
        grads[backend] = (out.detach(), q.grad, k.grad, v.grad)
    for a, f in zip(grads["sdpa"], grads["flex"]):
        torch.testing.assert_close(f, a, rtol=2e-4, atol=2e-4)
