"""The paper's analyses of a trained MoE, from a checkpoint, each with a figure.

* Effective rank of every expert weight matrix, per layer. The paper's definition (Roy &
  Vetterli 2007): with singular values s_i, p_i = s_i / sum_j s_j and H = -sum_i p_i log p_i,
  ``erank = exp(H)``; an n x n identity has erank n, a rank-1 matrix erank 1. Gated experts
  (SwiGLU) report their gate (w1) and up (w3) halves of ``w_in`` separately.
* Layer-wise cosine similarity of hidden states on validation text: the residual stream after
  the embedding and after every block, cosine similarity per token averaged over tokens, for
  every pair of layers (identical layers give 1).
* Per-layer expert load (share of the top-k assignments each expert receives) and routing
  entropy (mean entropy of the router's distribution over experts, in nats; log E is uniform;
  a sigmoid router's scores normalised over E). The MoE layers are listed by block index
  (``moe_layers``: dense first blocks have none), with the auxiliary-loss-free expert bias of
  each when the model has one (``expert_bias``).
* The activation coefficients per layer (PolyNorm / PolyReLU ``weight`` and ``bias``; a
  layer's shared experts each have their own set, under ``shared``).
* From a routing trace instead of a checkpoint (olmo/routing_trace.py, the routing of a
  training step as it happened): per-layer expert load and overload factor (max load / mean
  load, 1 = balanced), summed over the traced ranks (:func:`trace_load`,
  :func:`write_trace_figure`).

Shared experts' matrices get effective ranks of their own (``shared w1 (in)``... , one column
per shared expert). The routing is the model's in evaluation: dropless, as at inference.

Checkpoints are read with :func:`olmo.checkpoint_io.load_checkpoint` (any checkpoint form, one
process, no process group).
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_model.errors import DataError

# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007)."""
    s = torch.linalg.svdvals(matrix.detach().double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _split(w_in: torch.Tensor, w_out: torch.Tensor, gated: bool, prefix: str = ""):
    if gated:
        h = w_out.shape[1]
        return {f"{prefix}w1 (gate)": w_in[..., :h], f"{prefix}w3 (up)": w_in[..., h:],
                f"{prefix}w2 (out)": w_out}
    return {f"{prefix}w1 (in)": w_in, f"{prefix}w2 (out)": w_out}


def expert_matrices(ffn) -> dict[str, torch.Tensor]:
    """name -> (E, rows, cols) stack of one MoE layer's expert matrices (D x H in, H x D out),
    and of its shared experts (names prefixed 'shared ') when it has them."""
    gated = ffn.config.activation.gated
    out = _split(ffn.w_in_EDH.detach().float().cpu(), ffn.w_out_EHD.detach().float().cpu(), gated)
    if ffn.shared_experts is not None:
        w_in = torch.stack([s.w_in.weight.detach().float().cpu().T for s in ffn.shared_experts])
        w_out = torch.stack([s.w_out.weight.detach().float().cpu().T for s in ffn.shared_experts])
        out |= _split(w_in, w_out, gated, "shared ")
    return out


def moe_layers(model) -> list[tuple[int, Any]]:
    """(block index, layer) of each of ``model.moe_layers()``, in block order."""
    block_of = {id(block.ffn): i for i, block in enumerate(model.blocks)}
    return [(block_of[id(layer)], layer) for layer in model.moe_layers()]


def effective_ranks(model) -> dict[str, list[list[float]]]:
    """matrix name -> [layer][expert] effective rank."""
    out: dict[str, list[list[float]]] = {}
    for _, ffn in moe_layers(model):
        for name, stack in expert_matrices(ffn).items():
            out.setdefault(name, []).append([effective_rank(w) for w in stack])
    return out


def layer_similarity(hidden_states: list[torch.Tensor]) -> np.ndarray:
    """[i, j] = mean over tokens of cos(h_i[t], h_j[t]) for hidden states of shape (..., D)."""
    flat = [h.detach().double().reshape(-1, h.shape[-1]) for h in hidden_states]
    normed = [torch.nn.functional.normalize(h, dim=-1) for h in flat]
    n = len(normed)
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            sim[i, j] = sim[j, i] = float((normed[i] * normed[j]).sum(-1).mean())
    return sim


@torch.no_grad()
def collect(model, input_ids: torch.Tensor, batch_size: int = 8) -> dict[str, Any]:
    """Hidden states after the embedding and each block, and per-layer routing statistics: the
    expert counts and router entropies the model's forward returns (``ModelOutput``)."""
    hidden: list[list[torch.Tensor]] = [[] for _ in range(len(model.blocks) + 1)]
    hooks = [model.embedding.register_forward_hook(
        lambda m, i, o: hidden[0].append(o.float().cpu()))]
    for li, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(
            lambda m, i, o, li=li: hidden[li + 1].append(o[0].float().cpu())))
    counts_LE = entropy_sum_L = 0
    num_tokens = 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size]
            out = model(batch.to(device))
            counts_LE = counts_LE + out.tokens_per_expert_LE.cpu()
            if out.router_entropy_L is not None:  # a per-batch mean: weight it by the tokens
                entropy_sum_L = entropy_sum_L + out.router_entropy_L.double().cpu() * batch.numel()
            num_tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    layers = [i for i, _ in moe_layers(model)]
    return {
        "hidden": [torch.cat(h) for h in hidden],
        "moe_layers": layers,
        "expert_load": [(counts_E / counts_E.sum()).tolist() for counts_E in counts_LE],
        "routing_entropy": (entropy_sum_L / num_tokens).tolist() if layers else [],
        "num_experts": int(counts_LE.shape[1]) if layers else 0,
    }


def activation_coefficients(model) -> list[dict[str, list]]:
    """Per layer: {'weight': [...], 'bias': [...]} of the activation (empty when it has none).

    With one coefficient set per expert, 'weight' and 'bias' are the means over experts and
    'weight_per_expert' (E x order) and 'bias_per_expert' (E) hold every set.
    """
    out = []
    for block in model.blocks:
        act = getattr(block.ffn, "act", None)
        if isinstance(act, torch.nn.ModuleList) and hasattr(act[0], "weight"):
            weight_EO = torch.stack([a.weight.detach().float().cpu() for a in act])
            bias_E = torch.cat([a.bias.detach().float().cpu() for a in act])
            out.append({"weight": weight_EO.mean(0).tolist(), "bias": [bias_E.mean().item()],
                        "weight_per_expert": weight_EO.tolist(), "bias_per_expert": bias_E.tolist()})
        elif act is not None and hasattr(act, "weight"):
            out.append(_coefficients(act))
        else:
            out.append({})
        shared = getattr(block.ffn, "shared_experts", None)
        if out[-1] and shared is not None:
            out[-1]["shared"] = [_coefficients(s.act) for s in shared]
    return out


def _coefficients(act) -> dict[str, list]:
    return {"weight": act.weight.detach().float().cpu().tolist(),
            "bias": act.bias.detach().float().cpu().tolist()}


def expert_biases(model) -> list[list[float]]:
    """The auxiliary-loss-free selection bias of every MoE layer ([] without the option)."""
    return [layer.expert_bias_E.detach().float().cpu().tolist() for layer in model.moe_layers()
            if layer.expert_bias_E is not None]


def validation_tokens(paths: list[str], seq_len: int, num_sequences: int,
                      dtype: type) -> torch.Tensor:
    """The first ``num_sequences`` x ``seq_len`` tokens of the token files (dolma memmaps of
    ``dtype``, as :func:`olmo.data.resolve_dtype` gives for the run's config)."""
    files = [f for p in paths for f in (sorted(glob.glob(p)) or [p])]
    need = seq_len * num_sequences
    parts, have = [], 0
    for f in files:
        arr = np.memmap(f, dtype=dtype, mode="r")
        take = min(len(arr), need - have)
        parts.append(np.asarray(arr[:take], dtype=np.int64))
        have += take
        if have >= need:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(f"{paths}: fewer than {seq_len} tokens, expected at least one sequence")
    return torch.from_numpy(tokens[: n * seq_len].reshape(n, seq_len))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def analyze(model, input_ids: torch.Tensor, batch_size: int = 8) -> dict[str, Any]:
    stats = collect(model, input_ids, batch_size)
    return {
        "activation": model.config.activation_type,
        "effective_rank": effective_ranks(model),
        "max_rank": {name: min(stack.shape[1:]) for name, stack in
                     expert_matrices(moe_layers(model)[0][1]).items()} if moe_layers(model) else {},
        "layer_similarity": layer_similarity(stats["hidden"]).tolist(),
        "moe_layers": stats["moe_layers"],
        "expert_load": stats["expert_load"],
        "expert_bias": expert_biases(model),
        "routing_entropy": stats["routing_entropy"],
        "max_routing_entropy": math.log(stats["num_experts"]) if stats["num_experts"] else 0.0,
        "activation_coefficients": activation_coefficients(model),
        "num_tokens": int(input_ids.numel()),
    }


def write_figures(result: dict[str, Any], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    paths = {}

    # Effective rank: mean over experts with min-max band, per matrix, per layer.
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_layer in result["effective_rank"].items():
        arr = np.array(per_layer)
        layers = np.arange(len(arr))
        ax.plot(layers, arr.mean(1), marker="o", label=f"{name} (max {result['max_rank'].get(name)})")
        ax.fill_between(layers, arr.min(1), arr.max(1), alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank (mean over experts, band min-max)")
    ax.set_title(f"{prefix}expert weight effective rank")
    ax.grid(alpha=0.3)
    ax.legend()
    paths["effective_rank"] = _save(fig, out_dir / "effective_rank.png")

    sim = np.array(result["layer_similarity"])
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(sim, vmin=min(0.0, sim.min()), vmax=1.0, cmap="viridis")
    labels = ["emb"] + [str(i) for i in range(len(sim) - 1)]
    ax.set_xticks(range(len(sim)), labels)
    ax.set_yticks(range(len(sim)), labels)
    for i in range(len(sim)):
        for j in range(len(sim)):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax)
    ax.set_title(f"{prefix}hidden-state cosine similarity\n(after embedding / block i)")
    paths["layer_similarity"] = _save(fig, out_dir / "layer_similarity.png")

    load = np.array(result["expert_load"])
    bias = np.array(result.get("expert_bias") or [])
    fig, axes = plt.subplots(1, 3 if bias.size else 2, figsize=(16 if bias.size else 11, 4))
    if load.size:
        n_exp = load.shape[1]
        blocks = result.get("moe_layers") or list(range(len(load)))
        _load_heatmap(fig, axes[0], load * n_exp, blocks, f"{prefix}expert load")
        axes[1].plot(blocks, result["routing_entropy"], marker="o", label="routing entropy")
        axes[1].axhline(result["max_routing_entropy"], ls="--", c="gray", label="uniform (log E)")
        axes[1].set_xlabel("layer")
        if bias.size:
            lim = max(float(np.abs(bias).max()), 1e-12)
            im = axes[2].imshow(bias, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim)
            fig.colorbar(im, ax=axes[2], label="bias")
            axes[2].set_yticks(range(len(blocks)), [str(b) for b in blocks])
            axes[2].set_xlabel("expert")
            axes[2].set_ylabel("layer")
            axes[2].set_title("auxiliary-loss-free expert bias")
        axes[1].set_ylabel("nats")
        axes[1].set_title("mean router entropy per token")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    paths["routing"] = _save(fig, out_dir / "routing.png")

    coeffs = result["activation_coefficients"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if any(coeffs):
        weights = np.array([c["weight"] for c in coeffs if c])
        bias = np.array([c["bias"][0] for c in coeffs if c])
        order = weights.shape[1]
        layers = [i for i, c in enumerate(coeffs) if c]
        per_expert = all("weight_per_expert" in c for c in coeffs if c)
        for k in range(order):
            line, = ax.plot(layers, weights[:, k], marker="o",
                            label=f"weight[{k}] (power {order - k})" + (", mean over experts" if per_expert else ""))
            if per_expert:  # min-max band over the experts' sets
                w_LEO = np.array([c["weight_per_expert"] for c in coeffs if c])
                ax.fill_between(layers, w_LEO[:, :, k].min(1), w_LEO[:, :, k].max(1),
                                color=line.get_color(), alpha=0.2)
        ax.plot(layers, bias, marker="s", ls="--", label="bias")
        ax.axhline(1.0 / order, c="gray", lw=0.8, ls=":", label=f"init 1/{order}")
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_xlabel("layer")
    else:
        ax.text(0.5, 0.5, f"{result['activation']} has no trainable coefficients",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"{prefix}activation coefficients ({result['activation']})")
    paths["coefficients"] = _save(fig, out_dir / "activation_coefficients.png")

    summary = out_dir / "analysis.json"
    summary.write_text(json.dumps(result, indent=1))
    paths["json"] = summary
    return paths


def _load_heatmap(fig, ax, load_x_e: np.ndarray, blocks: list[int], title: str) -> None:
    """Layers x experts of load share times E (1 = balanced)."""
    im = ax.imshow(load_x_e, aspect="auto", cmap="magma")
    fig.colorbar(im, ax=ax, label="load x E (1 = balanced)")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)


def trace_load(traces: list) -> dict[str, Any]:
    """Expert load of one traced step (its ranks' :class:`~olmo.routing_trace.RoutingTrace`s,
    counts summed): per MoE layer the share of routed rows per expert and the overload factor
    (max load / mean load)."""
    steps = sorted({t.step for t in traces})
    if len(steps) != 1:
        raise DataError(f"routing traces of steps {steps}; expected the ranks of one step")
    counts_LE = torch.stack([t.counts for t in traces]).sum(0).double()
    share_LE = counts_LE / counts_LE.sum(-1, keepdim=True)
    return {
        "step": steps[0],
        "ranks": sorted(t.rank for t in traces),
        "moe_layers": traces[0].moe_layer_ids,
        "expert_load": share_LE.tolist(),
        "overload_factor": (counts_LE.max(-1).values / counts_LE.mean(-1)).tolist(),
        "unused_experts": (counts_LE == 0).sum(-1).tolist(),
    }


def write_trace_figure(result: dict[str, Any], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """``routing_trace_step{N}.png`` (load heatmap, overload factor per layer) and its JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    load = np.array(result["expert_load"])
    blocks = result["moe_layers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _load_heatmap(fig, axes[0], load * load.shape[1], blocks,
                  f"{prefix}expert load, step {result['step']}")  # fmt: skip
    axes[1].plot(blocks, result["overload_factor"], marker="o")
    axes[1].axhline(1.0, ls="--", c="gray", label="balanced")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("max load / mean load")
    axes[1].set_title("overload factor")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    name = f"routing_trace_step{result['step']}"
    summary = out_dir / f"{name}.json"
    summary.write_text(json.dumps(result, indent=1))
    return {"routing_trace": _save(fig, out_dir / f"{name}.png"), "json": summary}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
