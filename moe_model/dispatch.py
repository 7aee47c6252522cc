"""Rows to experts and back on this rank: a stable sort by expert, and the weighted combine.

Shape suffixes as in ``moe.py``. :class:`LocalDispatcher` is the seam expert parallelism
replaces (``expert_parallel.AllToAllDispatcher``, which reuses :func:`sort_by_expert` and
:func:`combine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_model.precision import upcast

__all__ = ["COMBINE_CHUNK_BYTES", "Dispatched", "LocalDispatcher", "combine", "sort_by_expert"]


COMBINE_CHUNK_BYTES = 128 * 2**20
"""Size of the fp32 (tokens, K, D) products :func:`combine` forms per chunk of tokens: 2048
tokens of an OLMoE layer (K 8, D 2048), 8 chunks of its 16384, instead of 1 GiB at once."""


def combine(
    y_RD: torch.Tensor,
    weights_TK: torch.Tensor,
    inverse_R: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * (row of token t's k-th choice), in y_RD's dtype.

    ``inverse_R[t*K + k]`` is the position in y_RD (rows sorted by expert) of token t's k-th
    choice. The combine weights are applied after w_out (megablocks). Products and the sum over
    k run in fp32 (the weights are fp32, so the product promotes) and the total is rounded to
    y_RD's dtype once: a bf16 ``index_add_`` rounds every partial sum, in whatever order CUDA's
    atomics land.

    The fp32 products run ``chunk_tokens`` tokens at a time (default: chunks of
    :data:`COMBINE_CHUNK_BYTES`), forward and backward (:class:`_Combine`), so no fp32
    (T, K, D) tensor exists: the one-shot form made 1 GiB of fp32 products forward and two more
    (the gradients of the rows and of the weights) backward at OLMoE shapes. What autograd
    keeps is unchanged: the rows gathered into token order, (T, K, D) in y_RD's dtype (the
    weights' gradient reads them), in place of y_RD, which then can be freed. Each chunk computes
    what the one-shot form computed for its tokens, in the same order, so the values are the
    same, and the bytes moved are the same. Why chunks of plain torch ops rather than a fused
    kernel: they run, and are tested, on every device including CPU, compile without graph
    breaks, need no host sync, and cut the memory; a fused Triton kernel would also cut the
    bytes (rows read once, output written once) but needs a GPU to be tested on.
    """
    num_tokens, top_k = weights_TK.shape
    if chunk_tokens is None:
        chunk_tokens = max(1, COMBINE_CHUNK_BYTES // (4 * top_k * y_RD.shape[-1]))
    return _Combine.apply(y_RD, weights_TK, inverse_R, chunk_tokens)


class _Combine(torch.autograd.Function):
    """:func:`combine` with its fp32 products chunk by chunk of tokens."""

    @staticmethod
    def forward(ctx, y_RD, weights_TK, inverse_R, chunk_tokens):
        num_tokens, top_k = weights_TK.shape
        y_TKD = y_RD.index_select(0, inverse_R).view(num_tokens, top_k, y_RD.shape[-1])
        y_TD = y_RD.new_empty(num_tokens, y_RD.shape[-1])
        for start in range(0, num_tokens, chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            # fp32 products and sum; the copy into y_TD rounds to y_RD's dtype once.
            y_TD[chunk] = (y_TKD[chunk] * weights_TK[chunk].unsqueeze(-1)).sum(dim=1)
        ctx.save_for_backward(y_TKD, weights_TK, inverse_R)
        ctx.chunk_tokens, ctx.num_rows = chunk_tokens, y_RD.shape[0]
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):
        y_TKD, weights_TK, inverse_R = ctx.saved_tensors
        num_tokens, top_k, d = y_TKD.shape
        grad_y_RD = grad_w_TK = None
        if ctx.needs_input_grad[0]:
            grad_y_RD = y_TKD.new_zeros(ctx.num_rows, d)
        if ctx.needs_input_grad[1]:
            grad_w_TK = torch.empty_like(weights_TK)
        inverse_TK = inverse_R.view(num_tokens, top_k)
        for start in range(0, num_tokens, ctx.chunk_tokens):
            chunk = slice(start, start + ctx.chunk_tokens)
            g_C1D = upcast(grad_TD[chunk]).unsqueeze(1)
            if grad_y_RD is not None:
                # A row is one token's k-th choice: one add into zeros, so no sum is rounded.
                # (A dropped choice's row trails the experts' rows; the dispatcher zeroes
                # what flows back into it.)
                grad_CKD = (g_C1D * weights_TK[chunk].unsqueeze(-1)).to(y_TKD.dtype)
                grad_y_RD.index_add_(0, inverse_TK[chunk].reshape(-1), grad_CKD.view(-1, d))
            if grad_w_TK is not None:
                grad_w_TK[chunk] = (g_C1D * y_TKD[chunk]).sum(dim=-1)
        return grad_y_RD, grad_w_TK, None, None


@dataclass
class Dispatched:
    """What :meth:`LocalDispatcher.combine` needs to undo its dispatch."""

    inverse_R: torch.Tensor
    """Row of y_RD (sorted by expert) holding each flattened (token, k) choice."""
    padded: bool = False
    """Whether rows past the last expert's (the dropped ones) trail the expert rows."""
    host_rows_per_expert: list[int] | None = None
    """The experts' row counts as Python ints, when known without a sync (forced balance)."""


def sort_by_expert(
    experts_TK: torch.Tensor, keep_TK: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_R, inverse_R)`` of the T*K (token, expert) rows sorted by expert, a stable sort
    (equal experts keep token order): the token of each sorted row, and the sorted row of each
    flattened (token, k) choice (what :func:`combine` reads). With ``keep_TK`` the dropped rows
    sort last (as if routed to an expert past the last), so the kept ones keep the positions a
    sort of the kept rows alone gives them, and every shape stays T*K (no host sync for N)."""
    if keep_TK is not None:
        experts_TK = torch.where(keep_TK, experts_TK, torch.iinfo(experts_TK.dtype).max)
    order_R = experts_TK.reshape(-1).argsort(stable=True)
    return order_R // experts_TK.shape[-1], order_R.argsort()


class LocalDispatcher:
    """Sends each (token, expert) row to its expert on this rank: a stable sort by expert.

    ``dispatch`` returns the rows grouped by expert (``rows_per_expert_E`` rows each, in expert
    order, equal experts keeping token order) and ``combine`` sums each token's K expert
    outputs, weighted, back into token order (:func:`combine`: fp32, rounded once, no atomics).
    With ``keep_TK`` (capacity drops) the dropped rows trail the expert rows (``padded``): the
    experts give them zeros, which add nothing to their tokens.
    """

    def local_experts(self, num_experts: int) -> range:
        """The experts whose weights this rank computes with: all of them."""
        return range(num_experts)

    def dispatch(
        self,
        x_TD: torch.Tensor,
        experts_TK: torch.Tensor,
        rows_per_expert_E: torch.Tensor,
        keep_TK: torch.Tensor | None = None,
        host_rows_per_expert: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        """``rows_per_expert_E``: the (kept) rows of each expert, as the router counted them;
        ``host_rows_per_expert``: the same as Python ints, when known without a sync (forced
        balance), passed on for the paths that split rows on the host."""
        token_R, inverse_R = sort_by_expert(experts_TK, keep_TK)
        dispatched = Dispatched(inverse_R=inverse_R, padded=keep_TK is not None,
                                host_rows_per_expert=host_rows_per_expert)  # fmt: skip
        return x_TD[token_R], rows_per_expert_E, dispatched

    def combine(
        self, y_RD: torch.Tensor, weights_TK: torch.Tensor, dispatched: Dispatched
    ) -> torch.Tensor:
        return combine(y_RD, weights_TK, dispatched.inverse_R)
