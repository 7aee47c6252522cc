"""Activation comparison sweeps: plan, run (resumably), aggregate over seeds, report.

One sweep trains the same config with several expert activations and seeds at equal
parameters (gated SwiGLU ``h`` <-> non-gated ``1.5h``, from the config's own activation and
``model.mlp_hidden_size``), on the same data files and token budget. Runs are ordinary
``scripts/train.py`` subprocesses, so a sweep behaves at GPU scale exactly as at CPU tiny
scale; pass a launcher (``bash run_pretrain.sh``, ``torchrun --nproc_per_node=8
scripts/train.py``) to run each one distributed.

Resume: a run whose ``metrics.jsonl`` already reached its final step is skipped untouched; an
unfinished one is started again in its save folder, where the trainer resumes from the latest
checkpoint (and ``metrics.jsonl`` drops lines past it).

Outputs (``write_report``): ``compare_activations.{png,svg}`` (training and validation loss
against tokens, mean over seeds with a min-max band), ``compare_activations.{md,csv}`` (final
validation loss/perplexity with the seed spread, tokens/s, token efficiency against SwiGLU)
and ``summary.json``; optionally the same numbers to W&B as one summary run in the sweep group.

Variants: ``variants={"name": [overrides]}`` crosses the activations with other settings (a
routing recipe, a size): every cell (variant, activation, seed) is the base config plus the
sweep's overrides plus the variant's, and each cell's equal-parameter hidden sizes come from its
own variant's config -- ``mlp_hidden_size`` and, when set, ``moe_shared_hidden_size`` and
``moe_first_dense_hidden_size`` (their defaults follow ``mlp_hidden_size`` by themselves).
Token efficiency then compares each activation with SwiGLU under the same variant.

Token efficiency of activation A: ``T_swiglu(L_A) / T_A``, where ``L_A`` is A's final
validation loss (mean over seeds), ``T_A`` the tokens A trained on, and ``T_swiglu(L)`` the
tokens SwiGLU's mean validation curve needs to first reach ``L`` (linear interpolation between
evaluations). 1.30 means SwiGLU needs 30% more tokens to match A; when SwiGLU never reaches
``L`` in the budget the value is a lower bound (``>1.00``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_model.config import equal_param_hidden_size
from olmo import metric_names
from olmo.config import ConfigError, TrainConfig, load_config
from olmo.data import plan_data, run_sequences
from olmo.run_files import METRICS_FNAME

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ACTIVATIONS = ("swiglu", "polynorm", "polyrelu", "relu2", "gelu", "relu")
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
# Planning
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    activation: str
    seed: int
    hidden_size: int
    run_name: str
    save_folder: Path
    overrides: list[str]
    final_step: int | None
    """Step at which the run is complete (None when it cannot be known before training)."""
    variant: str = ""
    """The variant (a named set of overrides) of this cell; '' when the sweep has none."""


@dataclass
class SweepPlan:
    name: str
    config_path: str | None
    out_dir: Path
    base_activation: str
    base_hidden_size: int
    runs: list[RunSpec] = field(default_factory=list)

    def activations(self) -> list[str]:
        return list(dict.fromkeys(r.activation for r in self.runs))

    def variants(self) -> list[str]:
        return list(dict.fromkeys(r.variant for r in self.runs))


def expected_final_step(cfg: TrainConfig) -> int:
    """The last optimizer step of a run with this config (``stop_at`` included): the steps the
    data plan gives its duration (an epoch needs the files: they are sized, not read)."""
    duration = cfg.duration
    epoch_sequences = None
    if duration[0] == "epochs":
        epoch_sequences = plan_data(
            cfg.data, vocab_size=cfg.model.vocab_size, sequence_length=cfg.model.max_sequence_length,
            global_batch_size=cfg.global_train_batch_size, check_run=False,
        ).epoch_sequences  # fmt: skip
    final = run_sequences(
        duration, epoch_sequences=epoch_sequences, global_batch_size=cfg.global_train_batch_size,
        sequence_length=cfg.model.max_sequence_length,
    ) // cfg.global_train_batch_size  # fmt: skip
    if cfg.stop_at is not None:
        final = min(final, cfg.stop_at)
    return final


# Hidden sizes that belong to the activation: an equal-parameter sweep converts each one that
# is set (None follows mlp_hidden_size already).
ACTIVATION_SIZED = ("mlp_hidden_size", "moe_shared_hidden_size", "moe_first_dense_hidden_size")


def equal_param_overrides(model: Any, activation: str) -> list[str]:
    """Overrides giving ``model`` (a ModelConfig) ``activation`` at equal parameters: every
    activation-sized hidden size converted from the model's own activation."""
    out = [f"--model.activation_type={activation}"]
    for key in ACTIVATION_SIZED:
        size = getattr(model, key)
        if size is not None:
            try:
                converted = equal_param_hidden_size(size, model.activation_type, activation)
            except ConfigError as err:
                raise ConfigError(f"model.{key}={size} ({activation}): {err}") from None
            out.append(f"--model.{key}={converted}")
    return out


def plan_sweep(
    config_path: str | None,
    *,
    activations: list[str] | tuple[str, ...] = DEFAULT_ACTIVATIONS,
    seeds: list[int] | tuple[int, ...] = (0,),
    out_dir: str | Path,
    overrides: list[str] = (),
    name: str | None = None,
    variants: dict[str, list[str]] | None = None,
) -> SweepPlan:
    """One run per (variant, activation, seed), each with the equal-parameter hidden sizes of
    its variant's config."""
    base = load_config(config_path, list(overrides))
    out_dir = Path(out_dir)
    name = name or out_dir.name
    plan = SweepPlan(
        name=name,
        config_path=config_path,
        out_dir=out_dir,
        base_activation=base.model.activation_type,
        base_hidden_size=base.model.mlp_hidden_size,
    )
    for variant, variant_overrides in (variants or {"": []}).items():
        cell_overrides = [*_normalise(overrides), *_normalise(variant_overrides)]
        cell = load_config(config_path, cell_overrides).model
        for act in activations:
            sized = equal_param_overrides(cell, act)
            hidden = equal_param_hidden_size(cell.mlp_hidden_size, cell.activation_type, act)
            for seed in seeds:
                tag = f"{variant}-{act}-s{seed}" if variant else f"{act}-s{seed}"
                run_name = f"{name}-{tag}"
                save_folder = out_dir / "runs" / (Path(variant) if variant else Path()) / (
                    f"{act}-s{seed}"
                )
                run_overrides = [
                    *cell_overrides,
                    *sized,
                    f"--seed={seed}",
                    f"--run_name={run_name}",
                    f"--save_folder={save_folder}",
                    f"--wandb.group={name}",
                ]
                cfg = load_config(config_path, run_overrides)  # validates every run first
                plan.runs.append(
                    RunSpec(act, seed, hidden, run_name, save_folder, run_overrides,
                            expected_final_step(cfg), variant)
                )
    return plan


def _normalise(overrides) -> list[str]:
    return [o if o.startswith("--") else f"--{o}" for o in overrides]


# ---------------------------------------------------------------------------------------------
# Running and resuming
# ---------------------------------------------------------------------------------------------


def read_metrics(save_folder: str | Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
    path = Path(save_folder) / METRICS_FNAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_is_complete(spec: RunSpec) -> bool:
    """metrics.jsonl holds the final step's training loss (and its evaluation if any ran)."""
    records = read_metrics(spec.save_folder)
    if not records:
        return False
    final = spec.final_step
    if final is None:  # unknown length: trust a finished run's last checkpoint == last step
        return False
    steps = {r.get("step") for r in records if metric_names.CE_LOSS in r}
    return final in steps


def run_command(spec: RunSpec, config_path: str | None, launcher: str | None = None) -> list[str]:
    """``launcher`` replaces ``python scripts/train.py`` (e.g. ``bash run_pretrain.sh``)."""
    prefix = shlex.split(launcher) if launcher else [sys.executable, str(REPO / "scripts" / "train.py")]
    return [*prefix, *([config_path] if config_path else []), *spec.overrides]


def run_sweep(
    plan: SweepPlan,
    *,
    launcher: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> dict[str, str]:
    """Train every unfinished run in order; returns {run_name: 'skipped'|'done'|'failed'}.

    Output of each run goes to ``{out_dir}/logs/{run_name}.log``. A failed run does not stop
    the sweep; the others still train and the report leaves the failed one out.
    """
    logs = plan.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for i, spec in enumerate(plan.runs, 1):
        prefix = f"[{i}/{len(plan.runs)}] {spec.run_name}"
        if run_is_complete(spec):
            print(f"{prefix}: complete (step {spec.final_step}), skipped", flush=True)
            status[spec.run_name] = "skipped"
            continue
        resumed = spec.save_folder.is_dir() and any(spec.save_folder.glob("step*"))
        cmd = run_command(spec, plan.config_path, launcher)
        print(f"{prefix}: {'resuming' if resumed else 'training'} (H={spec.hidden_size})",
              flush=True)
        start = time.perf_counter()
        log_path = logs / f"{spec.run_name}.log"
        with log_path.open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        elapsed = time.perf_counter() - start
        if proc.returncode == 0 and run_is_complete(spec):
            status[spec.run_name] = "done"
            print(f"{prefix}: done in {elapsed:.0f}s", flush=True)
        else:
            status[spec.run_name] = "failed"
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            print(f"{prefix}: FAILED (exit {proc.returncode}) after {elapsed:.0f}s; "
                  f"see {log_path}\n{tail}", file=sys.stderr, flush=True)
    return status


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


def plan_to_json(plan: SweepPlan) -> str:
    data = asdict(plan)
    return json.dumps(data, indent=2, default=str)
