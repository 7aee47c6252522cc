#!/usr/bin/env python
"""Compare expert activations at equal parameters: train, resume, aggregate, report.

    python scripts/compare_activations.py configs/tiny.yaml --out runs/compare \\
        --activations swiglu,polynorm --seeds 0,1 [--key=value ...]

Every ``--key=value`` that is not an option below is passed to each run (``--max_duration=30``,
``--model.d_model=64``...). The config's own ``model.activation_type`` and
``model.mlp_hidden_size`` fix the parameter budget: each activation gets the hidden size with
the same expert weight count (gated SwiGLU h <-> non-gated 1.5h).

``--variant NAME KEY=VALUE ...`` (repeatable) crosses the activations with named settings, e.g.
a routing recipe: ``--variant olmoe --variant deepseek model.moe_router_score=sigmoid
model.moe_zloss_weight=0 model.moe_bias_update_rate=0.001``. Write the variant's overrides
without leading dashes. Each cell gets the equal-parameter hidden sizes of its own variant's
config (runs/<variant>/<act>-s<seed>/), and the table compares with SwiGLU per variant.

Rerunning the same command resumes an interrupted sweep: finished runs are skipped, unfinished
ones continue from their last checkpoint. ``--report-only`` just rebuilds the figure and table.

At GPU scale, give each run a launcher: ``--launcher "bash run_pretrain.sh"`` or
``--launcher "torchrun --nproc_per_node=8 scripts/train.py"`` (it replaces
``python scripts/train.py``; the config and overrides follow it).

Writes to --out: compare_activations.{png,svg,md,csv} (``--report-stem`` renames them, so
another sweep's report can sit beside them in --report-dir), summary.json, runs/<act>-s<seed>/,
logs/. --wandb-mode (default: the config's wandb.mode, offline unless set) also logs the table
and figure to W&B as a summary run in the sweep's group (every run is in that group too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_model.errors import LaunchError
from olmo.cli import run_cli
from olmo.compare import (
    DEFAULT_ACTIVATIONS,
    REPORT_STEM,
    aggregate,
    log_wandb,
    markdown_table,
    plan_sweep,
    run_sweep,
    write_report,
)
from olmo.config import ConfigError, load_config


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_variants(specs: list[list[str]]) -> dict[str, list[str]] | None:
    """``--variant NAME KEY=VALUE ...`` occurrences -> {name: overrides}; None for none."""
    variants: dict[str, list[str]] = {}
    for name, *overrides in specs:
        if name in variants or "=" in name or "/" in name:
            raise ConfigError(
                f"--variant {name!r}: each variant needs a new name (no '=' or '/') before its "
                "KEY=VALUE overrides"
            )
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--variant {name}: {item!r} must look like KEY=VALUE")
        variants[name] = overrides
    return variants or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=None, help="base YAML config")
    parser.add_argument("--out", required=True, help="sweep directory (runs, logs, report)")
    parser.add_argument("--name", default=None, help="sweep name and W&B group (default: --out's name)")
    parser.add_argument("--activations", type=_csv, default=list(DEFAULT_ACTIVATIONS),
                        help=f"comma-separated (default: {','.join(DEFAULT_ACTIVATIONS)})")
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in _csv(v)], default=[0, 1, 2],
                        help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--launcher", default=None,
                        help="command replacing 'python scripts/train.py', e.g. 'bash run_pretrain.sh'")
    parser.add_argument("--report-only", action="store_true", help="do not train; report what is there")
    parser.add_argument("--val-label", default=None, help="validation set for the table (default: first)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window for the training-loss plot")
    parser.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default=None,
                        help="W&B mode of the summary (default: the config's wandb.mode)")
    parser.add_argument("--report-dir", default=None, help="also copy figure and table here (e.g. docs)")
    parser.add_argument("--report-stem", default=REPORT_STEM,
                        help=f"file name of figure and table, without suffix (default: {REPORT_STEM}); "
                             "another sweep's report in --report-dir keeps its files")
    parser.add_argument("--variant", nargs="+", action="append", default=[],
                        metavar=("NAME", "KEY=VALUE"),
                        help="a named set of overrides crossed with the activations (repeatable)")
    args, overrides = parser.parse_known_args(argv)
    return run_cli(lambda: _compare(args, overrides))


def _compare(args, overrides: list[str]) -> int:
    variants = parse_variants(args.variant)
    if not args.report_stem or any(c in args.report_stem for c in "/\\") or args.report_stem in (".", ".."):
        raise ConfigError(f"--report-stem {args.report_stem!r}: expected a file name without a "
                          "directory or suffix, e.g. compare_2x2")
    plan = plan_sweep(args.config, activations=args.activations, seeds=args.seeds,
                      out_dir=args.out, overrides=overrides, name=args.name, variants=variants)
    base = load_config(args.config, overrides)
    sizes = ", ".join(
        f"{v + '/' if v else ''}{a} H={r.hidden_size}"
        for (v, a), r in {(r.variant, r.activation): r for r in plan.runs}.items())
    print(f"sweep {plan.name}: {len(plan.runs)} runs, base {plan.base_activation} "
          f"H={plan.base_hidden_size}; {sizes}", flush=True)
    status = {}
    if not args.report_only:
        status = run_sweep(plan, launcher=args.launcher)
    result = aggregate(plan, val_label=args.val_label)
    if not result.summaries:
        failed = sum(v == "failed" for v in status.values())
        why = f"{failed} failed, see {plan.out_dir / 'logs'}" if failed else "none has finished"
        raise LaunchError(
            f"--out {str(plan.out_dir)!r}: no complete runs to report ({len(plan.runs)} planned, {why})"
        )
    paths = write_report(result, plan.out_dir, smooth_window=args.smooth, stem=args.report_stem)
    if args.report_dir:
        import shutil

        dest = Path(args.report_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for key in ("png", "svg", "md", "csv"):
            shutil.copy(paths[key], dest / paths[key].name)
    wandb_mode = args.wandb_mode or base.wandb.mode
    log_wandb(result, mode=wandb_mode, project=base.wandb.project, entity=base.wandb.entity,
              figure=paths["png"])
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if any(v == "failed" for v in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
