"""Routing traces: every MoE layer's routing at chosen training steps, as data.

A run with ``trace.routing_steps: [1, 100]`` writes, at each of those steps, one file per
data-parallel rank (each rank routes its own tokens)::

    {save_folder}/routing/step{N}.pt           one process
    {save_folder}/routing/step{N}-rank{r}.pt   several

(a remote save folder keeps them in :func:`olmo.run_files.local_run_dir`). A file is a
``torch.save`` dict of plain tensors: the step's rank batch (``input_ids`` (B, S), and
``doc_ids`` with document masking), its micro-batches concatenated in order, and per MoE layer l
(``moe_layer_ids[l]`` the block) and token t = b*S + s:

* ``experts`` (L, B*S, K): the top-k expert ids, uint8 when E <= 256, else int16;
* ``weights`` (L, B*S, K): the final combine weights in the dtype the router gave them (fp32;
  float64 for a float64 model), so a replay reproduces the forward exactly;
* ``counts`` (L, E): rows routed to each expert (int64);

and ``signature``, the model shape the routing belongs to (:func:`model_signature`). About
T*K*(1 + 4)*L bytes per rank per step: 10.07 MiB measured for one OLMoE-1B-7B micro-batch (4 x
4096 tokens, 16 layers, top-8 of 64), 40 MiB for a rank's step at 1024 x 4096 tokens on 64 GPUs.

The model stays stateless: the train module copies what ``ModelOutput.routes`` returns on traced
steps only (:class:`RoutingRecorder`). :func:`load_trace` reads a file back,
:func:`check_replayable` refuses a trace from another model shape or sequence length before any
work, :func:`summary` prints per-layer loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_model.config import ModelConfig
from moe_model.errors import TraceError
from moe_model.routing import RouteChoice

__all__ = [
    "TRACE_DIR",
    "RoutingRecorder",
    "RoutingTrace",
    "check_replayable",
    "load_trace",
    "model_signature",
    "summary",
    "trace_path",
]

TRACE_DIR = "routing"
"""Inside the save folder."""
FORMAT = 1


def trace_path(run_dir: str | Path, step: int, rank: int = 0, world_size: int = 1) -> Path:
    """``run_dir/routing/step{N}.pt``, rank-suffixed when several ranks trace."""
    suffix = f"-rank{rank}" if world_size > 1 else ""
    return Path(run_dir) / TRACE_DIR / f"step{step}{suffix}.pt"


def model_signature(model: ModelConfig) -> dict[str, object]:
    """What a routing belongs to: the model's shape (a trace replays only on the same)."""
    return {
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "mlp_hidden_size": model.mlp_hidden_size,
        "moe_num_experts": model.moe_num_experts,
        "moe_top_k": model.moe_top_k,
        "moe_layer_ids": list(model.moe_layer_ids),
        "vocab_size": model.vocab_size,
        "max_sequence_length": model.max_sequence_length,
    }


def _expert_dtype(num_experts: int) -> torch.dtype:
    return torch.uint8 if num_experts <= 256 else torch.int16


@dataclass
class RoutingTrace:
    """One traced step of one rank, as :func:`load_trace` reads it."""

    step: int
    rank: int
    world_size: int
    signature: dict[str, object]
    """:func:`model_signature` of the traced model."""
    input_ids: torch.Tensor
    """(B, S) tokens of the rank batch."""
    doc_ids: torch.Tensor | None
    """(B, S) document of each token (document masking), else None."""
    experts: torch.Tensor
    """(L, B*S, K) top-k expert ids."""
    weights: torch.Tensor
    """(L, B*S, K) combine weights."""
    counts: torch.Tensor
    """(L, E) rows routed to each expert."""

    @property
    def moe_layer_ids(self) -> list[int]:
        return list(self.signature["moe_layer_ids"])

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """The index-th MoE layer's arrays: experts (T, K) long, weights (T, K), counts (E,)."""
        return {
            "experts": self.experts[index].long(),
            "weights": self.weights[index],
            "counts": self.counts[index],
        }

    def routes(self, rows: slice = slice(None)) -> list[RouteChoice]:
        """Per MoE layer the choice of the given sequences (rows of input_ids), for the model's
        ``routes`` argument."""
        seq_len = self.input_ids.shape[1]
        start, stop, _ = rows.indices(self.input_ids.shape[0])
        tokens = slice(start * seq_len, stop * seq_len)
        return [RouteChoice(e[tokens].long(), w[tokens]) for e, w in zip(self.experts, self.weights)]

    def to_dict(self) -> dict[str, object]:
        return {"format": FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


def load_trace(path: str | Path) -> RoutingTrace:
    """The trace in ``path``; a missing or foreign file is a one-line :class:`TraceError`."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"routing trace {str(path)!r} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise TraceError(f"routing trace {str(path)!r} is not readable: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise TraceError(f"routing trace {str(path)!r} is not a format-{FORMAT} routing trace")
    return RoutingTrace(**{f.name: raw[f.name] for f in dataclasses.fields(RoutingTrace)})


def check_replayable(trace: RoutingTrace, model: ModelConfig, name: str = "routing trace") -> None:
    """Raise a one-line TraceError unless ``trace`` came from a model of ``model``'s shape and
    its sequences fit the model."""
    ours = model_signature(model)
    for key, value in trace.signature.items():
        if key != "max_sequence_length" and ours.get(key) != value:
            raise TraceError(
                f"{name}: model.{key}={value!r} in the trace but {ours.get(key)!r} in this model; "
                "a trace replays only on a model of the same shape"
            )
    seq_len = trace.input_ids.shape[1]
    if seq_len != model.max_sequence_length:
        raise TraceError(
            f"{name}: sequences of {seq_len} tokens but model.max_sequence_length="
            f"{model.max_sequence_length}; a trace replays only at the sequence length it was "
            "recorded at"
        )


class RoutingRecorder:
    """One step's routing on one rank, gathered micro-batch by micro-batch on the host.

    Only traced steps build one: the copies to the host wait for the device (a sync per
    micro-batch), which the other steps never pay.
    """

    def __init__(self, model: ModelConfig):
        self.signature = model_signature(model)
        self.num_experts = model.moe_num_experts
        self._inputs: list[torch.Tensor] = []
        self._doc_ids: list[torch.Tensor] = []
        self._experts: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []

    def add(
        self,
        input_ids_BS: torch.Tensor,
        doc_ids_BS: torch.Tensor | None,
        routes: tuple[RouteChoice, ...],
    ) -> None:
        """One micro-batch: its tokens and ``ModelOutput.routes``."""
        self._inputs.append(input_ids_BS.detach().to("cpu", torch.int32))
        if doc_ids_BS is not None:
            self._doc_ids.append(doc_ids_BS.detach().to("cpu", torch.int32))
        dtype = _expert_dtype(self.num_experts)
        self._experts.append(torch.stack([r.experts_TK.to("cpu", dtype) for r in routes]))
        self._weights.append(torch.stack([r.weights_TK.detach().cpu() for r in routes]))

    def trace(self, step: int, rank: int = 0, world_size: int = 1) -> RoutingTrace:
        experts = torch.cat(self._experts, dim=1)
        num_layers = experts.shape[0]
        counts = torch.zeros(num_layers, self.num_experts, dtype=torch.int64)
        counts.scatter_add_(1, experts.long().view(num_layers, -1),
                            torch.ones(experts[0].numel(), dtype=torch.int64).expand(num_layers, -1))  # fmt: skip
        return RoutingTrace(
            step=step, rank=rank, world_size=world_size, signature=self.signature,
            input_ids=torch.cat(self._inputs),
            doc_ids=torch.cat(self._doc_ids) if self._doc_ids else None,
            experts=experts, weights=torch.cat(self._weights, dim=1), counts=counts,
        )  # fmt: skip

    def save(self, run_dir: str | Path, step: int, rank: int = 0, world_size: int = 1) -> Path:
        """Write the step's trace (:func:`trace_path`); returns the path."""
        path = trace_path(run_dir, step, rank, world_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.trace(step, rank, world_size).to_dict(), tmp)
        tmp.replace(path)  # a crash mid-write leaves no half file under the final name
        return path


def summary(trace: RoutingTrace) -> str:
    """Per MoE layer: tokens, overload factor (max load / mean load), unused experts, and the
    share of the busiest expert."""
    lines = [f"step {trace.step}, rank {trace.rank} of {trace.world_size}: "
             f"{trace.input_ids.shape[0]} x {trace.input_ids.shape[1]} tokens, "
             f"top-{trace.experts.shape[-1]} of {trace.counts.shape[-1]} experts"]  # fmt: skip
    for layer, counts_E in zip(trace.moe_layer_ids, trace.counts.double()):
        mean = counts_E.mean()
        lines.append(
            f"  layer {layer:3d}: overload {float(counts_E.max() / mean):5.2f}, "
            f"{int((counts_E == 0).sum())} unused, busiest expert {int(counts_E.argmax())} "
            f"({float(counts_E.max() / counts_E.sum()):.1%} of rows)"
        )
    return "\n".join(lines)
