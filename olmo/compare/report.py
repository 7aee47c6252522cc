"""Reporting a sweep: curves aggregated over seeds, token efficiency, figure, table, W&B."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from olmo import metric_names
from olmo.compare.sweep import RunSpec, SweepPlan, read_metrics, run_is_complete

log = logging.getLogger(__name__)

REFERENCE = "swiglu"
REPORT_STEM = "compare_activations"
# One colour per activation, fixed so figures of different sweeps read the same.
COLORS = {
    "swiglu": "#1f77b4",
    "polynorm": "#d62728",
    "polyrelu": "#ff7f0e",
    "relu2": "#2ca02c",
    "gelu": "#9467bd",
    "relu": "#8c564b",
    "polynorm_glu": "#e377c2",
    "polyrelu_glu": "#bcbd22",
}


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def validation_label(records: list[dict], preferred: str | None = None) -> str | None:
    labels = sorted({label for r in records for k in r
                     if (label := metric_names.eval_loss_label(k)) is not None})
    if preferred is not None:
        return preferred if preferred in labels else None
    return labels[0] if labels else None


def run_curves(records: list[dict], val_label: str | None) -> dict[str, np.ndarray]:
    """tokens/loss arrays of the training and validation curves of one run, plus its speed."""
    ce, tps_key = metric_names.CE_LOSS, metric_names.TOKENS_PER_SECOND
    train = sorted((r["tokens"], float(r[ce])) for r in records if ce in r)
    key = metric_names.eval_loss(val_label) if val_label else None
    val = sorted((r["tokens"], float(r[key])) for r in records if key in r)
    # Tokens/s: median over steps after the first (which includes warm-up and compilation).
    tps = [float(r[tps_key]) for r in records if tps_key in r and r.get("step", 0) > 1]
    return {
        "train_tokens": np.array([t for t, _ in train], dtype=np.float64),
        "train_loss": np.array([v for _, v in train], dtype=np.float64),
        "val_tokens": np.array([t for t, _ in val], dtype=np.float64),
        "val_loss": np.array([v for _, v in val], dtype=np.float64),
        "tps": float(np.median(tps)) if tps else float("nan"),
    }


def _stack_common(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds' curves on the token values they all share: (tokens, losses[seed, point])."""
    if not curves:
        return np.zeros(0), np.zeros((0, 0))
    common = set(curves[0][0].tolist())
    for tokens, _ in curves[1:]:
        common &= set(tokens.tolist())
    grid = np.array(sorted(common))
    rows = [loss[np.searchsorted(tokens, grid)] for tokens, loss in curves]
    return grid, np.stack(rows) if rows else np.zeros((0, len(grid)))


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (window 1 = unchanged); keeps the length."""
    if window <= 1 or values.shape[-1] == 0:
        return values
    cums = np.cumsum(np.pad(values, [(0, 0)] * (values.ndim - 1) + [(1, 0)]), axis=-1)
    n = values.shape[-1]
    idx = np.arange(n)
    lo = np.maximum(0, idx - window + 1)
    return (cums[..., idx + 1] - cums[..., lo]) / (idx + 1 - lo)


def tokens_to_reach(tokens: np.ndarray, loss: np.ndarray, target: float) -> float | None:
    """Tokens at which a curve first reaches ``target`` loss, linearly interpolated between
    points (on its running minimum); None when it never does. Reached at the first point
    already -> that point's tokens (the curve has no earlier evaluation to interpolate from)."""
    if len(tokens) == 0:
        return None
    best = np.minimum.accumulate(loss)
    hits = np.nonzero(best <= target)[0]
    if len(hits) == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return float(tokens[0])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], best[i - 1], best[i]
    frac = 1.0 if l0 == l1 else (l0 - target) / (l0 - l1)
    return float(t0 + frac * (t1 - t0))


@dataclass
class ActivationSummary:
    activation: str
    hidden_size: int
    seeds: list[int]
    tokens: float
    final_val_loss: list[float]
    final_train_loss: list[float]
    tps: list[float]
    val_label: str | None
    efficiency: float | None = None
    efficiency_bound: str = ""
    """'' exact, '>' lower bound (SwiGLU never reached the loss), '<' upper bound."""
    tokens_swiglu_needs: float | None = None
    variant: str = ""
    """The sweep variant; '' when the sweep has none."""

    @property
    def label(self) -> str:
        """``variant/activation``, or the activation alone."""
        return f"{self.variant}/{self.activation}" if self.variant else self.activation

    @staticmethod
    def _stats(values: list[float]) -> dict[str, float]:
        arr = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
        if arr.size == 0:
            return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
        return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
                "min": float(arr.min()), "max": float(arr.max())}

    def row(self) -> dict[str, Any]:
        val = self._stats(self.final_val_loss)
        ppl = self._stats([math.exp(min(v, 30.0)) for v in self.final_val_loss])
        train = self._stats(self.final_train_loss)
        tps = self._stats(self.tps)
        return {
            **({"variant": self.variant} if self.variant else {}),
            "activation": self.activation,
            "hidden_size": self.hidden_size,
            "seeds": len(self.seeds),
            "tokens": int(self.tokens),
            "val_loss_mean": val["mean"], "val_loss_std": val["std"],
            "val_loss_min": val["min"], "val_loss_max": val["max"],
            "val_ppl_mean": ppl["mean"], "val_ppl_std": ppl["std"],
            "train_loss_mean": train["mean"], "train_loss_std": train["std"],
            "tokens_per_s": tps["mean"],
            "swiglu_tokens_to_match": self.tokens_swiglu_needs,
            "token_efficiency_vs_swiglu": self.efficiency,
            "efficiency_bound": self.efficiency_bound,
        }


@dataclass
class SweepResult:
    name: str
    val_label: str | None
    summaries: list[ActivationSummary]
    curves: dict[str, dict[str, np.ndarray]]
    """Per label (ActivationSummary.label): train/val token grids and loss matrices
    [seed, point]."""
    missing: list[str]


def aggregate(plan: SweepPlan, val_label: str | None = None) -> SweepResult:
    """Mean and spread over the seeds of every complete run; incomplete runs are listed."""
    by_cell: dict[tuple[str, str], list[tuple[RunSpec, dict]]] = {}
    missing = []
    label = val_label
    for spec in plan.runs:
        if not run_is_complete(spec):
            missing.append(spec.run_name)
            continue
        records = read_metrics(spec.save_folder)
        if label is None:
            label = validation_label(records)
        by_cell.setdefault((spec.variant, spec.activation), []).append(
            (spec, run_curves(records, label)))
    summaries, curves = [], {}
    for (variant, act), runs in by_cell.items():
        train_grid, train = _stack_common([(c["train_tokens"], c["train_loss"]) for _, c in runs])
        val_grid, val = _stack_common([(c["val_tokens"], c["val_loss"]) for _, c in runs])
        summaries.append(ActivationSummary(
            variant=variant,
            activation=act,
            hidden_size=runs[0][0].hidden_size,
            seeds=[s.seed for s, _ in runs],
            tokens=float(runs[0][1]["train_tokens"][-1]),
            final_val_loss=[float(c["val_loss"][-1]) if len(c["val_loss"]) else float("nan")
                            for _, c in runs],
            final_train_loss=[float(c["train_loss"][-1]) for _, c in runs],
            tps=[c["tps"] for _, c in runs],
            val_label=label,
        ))
        curves[summaries[-1].label] = {"train_tokens": train_grid, "train_loss": train,
                                       "val_tokens": val_grid, "val_loss": val}
    for variant in dict.fromkeys(s.variant for s in summaries):
        _token_efficiency([s for s in summaries if s.variant == variant], curves)
    return SweepResult(plan.name, label, summaries, curves, missing)


def _token_efficiency(summaries: list[ActivationSummary], curves: dict) -> None:
    """Against SwiGLU's curve among ``summaries`` (one variant's)."""
    reference = next((s for s in summaries if s.activation == REFERENCE), None)
    if reference is None:
        return
    ref = curves[reference.label]
    use_val = len(ref["val_tokens"]) > 0
    ref_tokens = ref["val_tokens"] if use_val else ref["train_tokens"]
    ref_loss = (ref["val_loss"] if use_val else smooth(ref["train_loss"], 5)).mean(axis=0)
    for s in summaries:
        if s.activation == REFERENCE:  # 1 by definition (its own curve may not be monotone)
            s.efficiency, s.tokens_swiglu_needs, s.efficiency_bound = 1.0, s.tokens, ""
            continue
        if use_val:
            target = float(np.nanmean(s.final_val_loss))
        else:
            target = float(smooth(curves[s.label]["train_loss"], 5).mean(axis=0)[-1])
        needed = tokens_to_reach(ref_tokens, ref_loss, target)
        if needed is None:
            s.efficiency, s.efficiency_bound = ref_tokens[-1] / s.tokens, ">"
        else:
            s.efficiency = needed / s.tokens
            s.tokens_swiglu_needs = needed
            s.efficiency_bound = "<" if needed == ref_tokens[0] and ref_loss[0] < target else ""


# ---------------------------------------------------------------------------------------------
# Report: figure, table, W&B
# ---------------------------------------------------------------------------------------------


def plot(result: SweepResult, path_stem: Path, smooth_window: int = 1) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    variants = list(dict.fromkeys(s.variant for s in result.summaries))
    styles = ["-", "--", ":", "-."]
    for summary in result.summaries:
        c = result.curves[summary.label]
        color = COLORS.get(summary.activation)
        style = styles[variants.index(summary.variant) % len(styles)]
        n = c["train_loss"].shape[0]
        for ax, key, window in ((axes[0], "train", smooth_window), (axes[1], "val", 1)):
            tokens, loss = c[f"{key}_tokens"], smooth(c[f"{key}_loss"], window)
            if len(tokens) == 0:
                continue
            mean = loss.mean(axis=0)
            ax.plot(tokens, mean, color=color, linestyle=style, label=f"{summary.label} (n={n})",
                    marker="o" if key == "val" else None, markersize=3)
            if n > 1:
                ax.fill_between(tokens, loss.min(axis=0), loss.max(axis=0), color=color, alpha=0.2,
                                linewidth=0)
    title = "training loss" + (f" (moving average of {smooth_window} steps)" if smooth_window > 1 else "")
    axes[0].set_title(title)
    axes[1].set_title(f"validation loss ({result.val_label})" if result.val_label else "validation loss")
    for ax in axes:
        ax.set_xlabel("tokens")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result.name}: mean over seeds, band = min-max over seeds")
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        path = path_stem.with_suffix(f".{ext}")
        fig.savefig(path, dpi=120)
        paths.append(path)
    plt.close(fig)
    return paths


def _fmt_eff(row: dict) -> str:
    eff = row["token_efficiency_vs_swiglu"]
    if eff is None:
        return "n/a"
    return f"{row['efficiency_bound']}{eff:.2f}x"


def markdown_table(result: SweepResult) -> str:
    rows = [s.row() for s in result.summaries]
    by_variant = any(s.variant for s in result.summaries)
    lines = [
        ("| variant " if by_variant else "")
        + "| activation | H | seeds | tokens | final val loss (mean ± std) [min, max] | val PPL (mean ± std) | tokens/s | tokens SwiGLU needs | token efficiency vs SwiGLU |",
        ("|---" if by_variant else "") + "|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        needs = r["swiglu_tokens_to_match"]
        lines.append(
            (f"| {r['variant']} " if by_variant else "")
            + f"| {r['activation']} | {r['hidden_size']} | {r['seeds']} | {r['tokens']:,d} | "
            f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} [{r['val_loss_min']:.4f}, "
            f"{r['val_loss_max']:.4f}] | {r['val_ppl_mean']:.2f} ± {r['val_ppl_std']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {'-' if needs is None else f'{needs:,.0f}'} | {_fmt_eff(r)} |"
        )
    notes = [
        "",
        f"Validation set: `{result.val_label}`. Spread is over seeds (std with ddof=1; min-max in "
        "brackets). Token efficiency = tokens SwiGLU's mean validation curve needs to first reach "
        "the activation's final mean validation loss (linear interpolation between evaluations), "
        "divided by the tokens the activation trained on; `>` marks a lower bound (SwiGLU never "
        "reached that loss within the budget). tokens/s is per device (median over steps after the first).",
    ]
    if by_variant:
        notes.append("Each variant's token efficiency is against SwiGLU under the same variant.")
    if result.missing:
        notes.append(f"\nIncomplete runs left out: {', '.join(result.missing)}.")
    return "\n".join(lines + notes) + "\n"


def write_csv(result: SweepResult, path: Path) -> Path:
    rows = [s.row() for s in result.summaries]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["activation"])
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
    return path


def log_wandb(result: SweepResult, *, mode: str, project: str, entity: str | None,
              figure: Path | None) -> None:
    """One summary run in the sweep's W&B group: a table, per-activation scalars, the figure."""
    if mode == "disabled":
        return
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("wandb mode online without WANDB_API_KEY; skipping the W&B summary")
        return
    import wandb

    rows = [s.row() for s in result.summaries]
    run = wandb.init(mode=mode, project=project, entity=entity, group=result.name,
                     name=f"{result.name}-summary", job_type="summary",
                     dir=str(figure.parent) if figure else None,
                     settings=wandb.Settings(console="off", silent=True))
    try:
        columns = list(rows[0]) if rows else []
        run.log({"comparison": wandb.Table(columns=columns,
                                           data=[[r[c] for c in columns] for r in rows])})
        for summary, r in zip(result.summaries, rows, strict=True):
            for key in ("val_loss_mean", "val_loss_std", "val_ppl_mean", "tokens_per_s",
                        "token_efficiency_vs_swiglu"):
                if r[key] is not None:
                    run.summary[f"{summary.label}/{key}"] = r[key]
        if figure is not None and figure.is_file():
            run.log({"loss_curves": wandb.Image(str(figure))})
    finally:
        run.finish()


def write_report(result: SweepResult, out_dir: Path, *, smooth_window: int = 1,
                 stem: str = REPORT_STEM) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = plot(result, out_dir / stem, smooth_window)
    md = out_dir / f"{stem}.md"
    md.write_text(f"# Activation comparison: {result.name}\n\n" + markdown_table(result))
    csv_path = write_csv(result, out_dir / f"{stem}.csv")
    summary = out_dir / "summary.json"
    summary.write_text(json.dumps({
        "name": result.name, "val_label": result.val_label, "missing": result.missing,
        "activations": [{**s.row(), "seed_list": s.seeds,
                         "final_val_loss_per_seed": s.final_val_loss} for s in result.summaries],
    }, indent=2, default=float))
    return {"png": png, "svg": svg, "md": md, "csv": csv_path, "json": summary}
