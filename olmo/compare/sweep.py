"""Planning and running a sweep: one training run per (variant, activation, seed), resumable."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_model.config import equal_param_hidden_size
from olmo import metric_names
from olmo.config import ConfigError, TrainConfig, load_config
from olmo.data import plan_data, run_sequences
from olmo.run_files import METRICS_FNAME

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ACTIVATIONS = ("swiglu", "polynorm", "polyrelu", "relu2", "gelu", "relu")


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


def plan_to_json(plan: SweepPlan) -> str:
    data = asdict(plan)
    return json.dumps(data, indent=2, default=str)
