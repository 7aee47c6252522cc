"""Muon for the hidden matrices (each expert's on its own), AdamW for everything else; under FSDP2.

Muon (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024,
https://kellerjordan.github.io/posts/muon/; Moonlight, Liu et al., arXiv 2502.16982) replaces a
matrix's momentum M by an approximation of its polar factor U V^T (M = U S V^T), computed with
a quintic Newton-Schulz iteration

    X <- X / ||X||_F;  5 times: X <- a X + (b X X^T + c (X X^T)^2) X,   (a, b, c) = NS_COEFFICIENTS

whose coefficients (Keller Jordan's, also Moonlight's) maximise the slope at zero: each
singular value s of X goes through p(s) = a s + b s^3 + c s^5 five times and ends near 1 (in
about [0.68, 1.13]), not exactly at 1. The step follows ``torch.optim.Muon`` (torch 2.13): an
exponential moving average of the gradient (momentum 0.95), Nesterov, decoupled weight decay
``p *= 1 - lr * wd``, then ``p -= lr * scale * NS(update)``.

``scale`` (:data:`LR_SCALES`): ``match_rms_adamw`` (the default) is Moonlight's 0.2 *
sqrt(max(A, B)) for an A x B matrix (arXiv 2502.16982, sec. 2.2): NS's output has RMS about
1/sqrt(max(A, B)), so the update's RMS becomes 0.2, AdamW's typical one, and AdamW's learning
rate and weight decay carry over. ``original`` is Keller Jordan's sqrt(max(1, fan_out/fan_in)),
meant for its own, larger learning rate (``optimizer.muon_learning_rate``).

Which parameters (:func:`muon_layouts`): every matrix inside a transformer block (attention
q/k/v/o, dense and shared-expert FFNs, the experts) except the router; AdamW takes the
embedding, the LM head, norms, the router and activation coefficients (Keller Jordan and
Moonlight keep embeddings and the head on AdamW). An expert stack ``w_in_EDH`` (E, D, H) is E
matrices, each orthogonalised on its own; for a gated activation the fused w1|w3 projection
(D x 2H, an FFN's ``w_in`` 2H x D) is two matrices, w1 and w3, as separate SwiGLU weights are.

Under FSDP2 a parameter is a DTensor sharded on dim 0, and Newton-Schulz needs whole matrices:

* Expert stacks are sharded on their expert dim (FSDP's Shard(0), and expert parallelism's too),
  so every rank holds whole experts and orthogonalises its own: no communication.
* 2-D matrices are split by rows. Each is given to one owner rank (round-robin, largest first),
  which receives the other ranks' rows, orthogonalises the whole matrix and sends each rank its
  rows back: two ``all_to_all_single`` per step for all matrices together (Moonlight's
  distributed Muon and Dion spread the work the same way). Per rank that moves
  2 (N-1)/N^2 x the 2-D Muon elements (N ranks), against (N-1)/N x for gathering every matrix
  on every rank (``full_tensor``), which also repeats every Newton-Schulz N times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim.adam import adam

from moe_model.errors import ConfigError
from moe_model.expert_parallel import EXPERT_WEIGHTS
from moe_model.moe import MoELayer

__all__ = [
    "LR_SCALES",
    "NS_COEFFICIENTS",
    "NS_DTYPES",
    "MatrixLayout",
    "MuonWithAdamW",
    "muon_layouts",
    "newton_schulz",
    "newton_schulz_flops",
]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic coefficients (a, b, c), as in torch.optim.Muon and Moonlight."""
NS_STEPS = 5
NS_EPS = 1e-7
"""Floor of the Frobenius norm the iteration divides by (torch.optim.Muon's)."""
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""Newton-Schulz compute precision by config name (bf16: Keller Jordan's, Moonlight's, torch's)."""


def match_rms_adamw(fan_out: int, fan_in: int) -> float:
    """Moonlight's rule: update RMS 0.2, as AdamW's (arXiv 2502.16982, sec. 2.2)."""
    return 0.2 * math.sqrt(max(fan_out, fan_in))


def original(fan_out: int, fan_in: int) -> float:
    """Keller Jordan's rule: sqrt(max(1, fan_out / fan_in))."""
    return math.sqrt(max(1.0, fan_out / fan_in))


LR_SCALES: dict[str, Callable[[int, int], float]] = {
    "match_rms_adamw": match_rms_adamw,
    "original": original,
}
"""Learning-rate scale of one fan_out x fan_in matrix, by ``optimizer.muon_lr_scale``
(torch.optim.Muon's ``adjust_lr_fn`` names)."""


def newton_schulz(
    g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of each matrix of ``g`` (..., A, B), in
    ``dtype`` (default ``g``'s); a 2-D ``g`` runs the very ops of torch.optim.Muon."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or g.dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # X X^T is then the smaller Gram matrix
        x = x.mT
    if x.ndim == 2:
        x = x / x.norm().clamp(min=NS_EPS)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        shape = x.shape
        x = x.reshape(-1, *shape[-2:])
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.reshape(shape)
    return x.mT if tall else x


def newton_schulz_flops(rows: int, cols: int, steps: int = NS_STEPS) -> int:
    """Matmul FLOPs of :func:`newton_schulz` on one rows x cols matrix: per step X X^T, the
    Gram's square and the product with X, with A = min(rows, cols), B = max."""
    a, b = sorted((rows, cols))
    return steps * (2 * a * a * b + 2 * a**3 + 2 * a * a * b)


@dataclass(frozen=True)
class MatrixLayout:
    """How a parameter holds its Muon matrices."""

    experts: bool
    """Dim 0 stacks experts, each (fan_in, fan_out) (``w_in_EDH``); else one (fan_out, fan_in)
    matrix, as ``nn.Linear`` stores it."""
    pieces: int = 1
    """Matrices side by side along the fan-out dim (2: a gated activation's fused w1|w3)."""

    def check(self, name: str, shape: torch.Size) -> None:
        want = 3 if self.experts else 2
        if len(shape) != want:
            raise ConfigError(
                f"optimizer.name='muon': parameter {name} of shape {tuple(shape)} is routed to "
                f"Muon as {'an expert stack (E, in, out)' if self.experts else 'a 2-D matrix'}; "
                f"expected {want} dims (use optimizer.name=adamw, or keep it out of the blocks)"
            )
        fan_out = shape[-1] if self.experts else shape[0]
        if fan_out % self.pieces:
            raise ConfigError(
                f"optimizer.name='muon': parameter {name} of shape {tuple(shape)} does not split "
                f"into {self.pieces} matrices along its output dim"
            )

    def fans(self, shape: torch.Size) -> tuple[int, int]:
        """(fan_out, fan_in) of one matrix."""
        if self.experts:
            return shape[-1] // self.pieces, shape[-2]
        return shape[0] // self.pieces, shape[1]

    def orthogonalise(self, m: torch.Tensor, steps: int, dtype: torch.dtype | None) -> torch.Tensor:
        """NS of each matrix of ``m`` (whole expert stacks or one whole matrix), in m's layout."""
        p = self.pieces
        if self.experts:
            e, d, h = m.shape
            batch = m.reshape(e, d, p, h // p).permute(0, 2, 1, 3).reshape(e * p, d, h // p)
            out = newton_schulz(batch, steps, dtype)
            return out.reshape(e, p, d, h // p).permute(0, 2, 1, 3).reshape(e, d, h)
        if p == 1:
            return newton_schulz(m, steps, dtype)
        split = m.reshape(p, m.shape[0] // p, m.shape[1])
        return newton_schulz(split, steps, dtype).reshape(m.shape)


def muon_layouts(model: nn.Module) -> dict[str, MatrixLayout]:
    """The parameters Muon updates, by name, and their layouts: every parameter of a
    transformer block with more than one dim, except the routers'. Raises ConfigError for one
    Muon cannot orthogonalise (neither a 2-D matrix nor an expert stack, or sharded otherwise)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("optimizer.name='muon' needs a model with transformer blocks")
    routers, expert_stacks, pieces = set(), set(), {}
    for m in blocks.modules():
        if isinstance(m, MoELayer):
            routers.add(id(m.router.weight))
            expert_stacks.update(id(getattr(m, n)) for n in EXPERT_WEIGHTS)
            pieces[id(m.w_in_EDH)] = 2 if m.config.activation.gated else 1
        elif isinstance(getattr(m, "w_in", None), nn.Linear):  # a shared expert, a dense FFN
            pieces[id(m.w_in.weight)] = 2 if m.act.gated else 1
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, MatrixLayout] = {}
    for p in blocks.parameters():
        if p.ndim < 2 or id(p) in routers:
            continue
        name = names[id(p)]
        layout = MatrixLayout(experts=id(p) in expert_stacks, pieces=pieces.get(id(p), 1))
        layout.check(name, p.shape)
        _check_placement(name, p, layout)
        found[name] = layout
    return found


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _row_chunks(rows: int, world: int) -> list[int]:
    """Rows of each rank when ``rows`` are split as FSDP2 shards dim 0 (``torch.chunk``)."""
    size = -(-rows // world)
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def _check_placement(name: str, p: torch.Tensor, layout: MatrixLayout) -> None:
    """Raise unless the distributed step can handle how ``p`` is sharded."""
    if not isinstance(p, DTensor):
        return
    if layout.experts:
        # Shard(0), or FSDP's _StridedShard(0) over expert parallelism's Shard(0): any split of
        # dim 0 leaves each rank whole experts.
        ok = all(isinstance(pl, Replicate) or getattr(pl, "dim", None) == 0
                 for pl in p.placements)  # fmt: skip
    else:
        ok = p.device_mesh.ndim == 1 and p.placements in ((Shard(0),), (Replicate(),))
    if not ok:
        raise ConfigError(
            f"optimizer.name='muon': parameter {name} is sharded as {p.placements} on a "
            f"{p.device_mesh.ndim}-D mesh; Muon handles expert stacks sharded on dim 0 and "
            "matrices sharded on dim 0 over one mesh dim (FSDP2)"
        )


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups with ``use_muon`` (each parameter with a :class:`MatrixLayout`),
    AdamW (torch's, decoupled weight decay) for the others; plain or FSDP2 (DTensor) params.

    Muon groups: lr, momentum, weight_decay, ns_steps, lr_scale (a :data:`LR_SCALES` name),
    ns_dtype (a :data:`NS_DTYPES` name, or None: the parameter's dtype). AdamW groups: lr,
    betas, eps, weight_decay. State: ``momentum_buffer`` (Muon); AdamW's ``step``,
    ``exp_avg``, ``exp_avg_sq``, so torch's distributed checkpoint saves and loads it as any
    optimizer's.
    """

    def __init__(self, groups: list[dict], layouts: dict[torch.Tensor, MatrixLayout]):
        super().__init__(groups, defaults={"use_muon": False, "lr": 1e-3})
        self.layouts = layouts
        for group in self.param_groups:
            for p in group["params"] if group["use_muon"] else ():
                if p not in layouts:
                    raise ValueError(f"Muon parameter of shape {tuple(p.shape)} has no layout")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        steps = group["ns_steps"]
        dtype = NS_DTYPES[group["ns_dtype"]] if group["ns_dtype"] else None
        scale_of = LR_SCALES[group["lr_scale"]]
        params, updates = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.lerp_(grad, 1 - momentum)
            params.append(p)
            updates.append(grad.lerp(buf, momentum))
        orthogonal = [None] * len(params)
        row_split: dict[object, list[int]] = {}
        for i, (p, update) in enumerate(zip(params, updates)):
            layout = self.layouts[p]
            if isinstance(p, DTensor) and not layout.experts and p.placements == (Shard(0),):
                row_split.setdefault(p.device_mesh, []).append(i)
            else:  # whole matrices here: expert stacks, replicated or unsharded matrices
                orthogonal[i] = layout.orthogonalise(update, steps, dtype)
        for mesh, indices in row_split.items():
            done = _orthogonalise_row_sharded(
                [params[i] for i in indices], [updates[i] for i in indices],
                [self.layouts[params[i]] for i in indices], mesh, steps, dtype,
            )  # fmt: skip
            for i, o in zip(indices, done):
                orthogonal[i] = o
        for p, o in zip(params, orthogonal):
            fan_out, fan_in = self.layouts[p].fans(p.shape)
            local = _local(p)
            local.mul_(1 - lr * wd)
            local.add_(o, alpha=-lr * scale_of(fan_out, fan_in))

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # as torch.optim.AdamW initialises it (step on the CPU, fp32)
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=True,
            decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )  # fmt: skip


def _orthogonalise_row_sharded(
    params: list[DTensor],
    updates: list[torch.Tensor],
    layouts: list[MatrixLayout],
    mesh,
    steps: int,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """NS of matrices whose rows are sharded over ``mesh`` (Shard(0)); returns this rank's rows
    of each result. Matrix i is orthogonalised whole on one owner rank: one all-to-all brings
    each owner its matrices' rows, another sends the results' rows back."""
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    # Largest first, round-robin: owners' Newton-Schulz work differs by at most one matrix.
    order = sorted(range(len(params)), key=lambda i: -params[i].numel())
    owner = {i: k % world for k, i in enumerate(order)}
    owned = [[i for i in order if owner[i] == o] for o in range(world)]
    rows = [_row_chunks(p.shape[0], world) for p in params]
    cols = [p.shape[1] for p in params]
    for i, u in enumerate(updates):
        if tuple(u.shape) != (rows[i][rank], cols[i]):
            raise RuntimeError(
                f"local shard {tuple(u.shape)} of a {tuple(params[i].shape)} matrix is not the "
                f"expected dim-0 chunk {(rows[i][rank], cols[i])}"
            )
    ref = updates[0]
    send_splits = [sum(rows[i][rank] * cols[i] for i in owned[o]) for o in range(world)]
    recv_splits = [sum(rows[i][s] * cols[i] for i in owned[rank]) for s in range(world)]
    send = _flat([updates[i] for o in range(world) for i in owned[o]], ref)
    recv = ref.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)

    results = {}
    from_sender = [
        chunk.split([rows[i][s] * cols[i] for i in owned[rank]])
        for s, chunk in enumerate(recv.split(recv_splits))
    ]
    for k, i in enumerate(owned[rank]):
        whole = torch.cat([from_sender[s][k].view(rows[i][s], cols[i]) for s in range(world)])
        results[i] = layouts[i].orthogonalise(whole, steps, dtype).to(ref.dtype)
    back = _flat(
        [results[i].split(rows[i])[s] for s in range(world) for i in owned[rank]], ref
    )
    mine = ref.new_empty(sum(send_splits))
    dist.all_to_all_single(mine, back, send_splits, recv_splits, group=group)
    out: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
    for o, chunk in enumerate(mine.split(send_splits)):
        pieces = chunk.split([rows[i][rank] * cols[i] for i in owned[o]])
        for i, piece in zip(owned[o], pieces):
            out[i] = piece.view(rows[i][rank], cols[i])
    return out


def _flat(tensors: Iterable[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    flat = [t.reshape(-1).to(like.dtype) for t in tensors]
    return torch.cat(flat) if flat else like.new_empty(0)
