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

Modules (everything public is importable from ``olmo.compare``): ``sweep.py`` plans the runs
and trains them resumably; ``report.py`` aggregates their metrics and writes the report.
"""

from olmo.compare.report import (
    COLORS,
    REFERENCE,
    REPORT_STEM,
    ActivationSummary,
    SweepResult,
    _stack_common,
    aggregate,
    log_wandb,
    markdown_table,
    plot,
    run_curves,
    smooth,
    tokens_to_reach,
    validation_label,
    write_csv,
    write_report,
)
from olmo.compare.sweep import (
    ACTIVATION_SIZED,
    DEFAULT_ACTIVATIONS,
    RunSpec,
    SweepPlan,
    equal_param_overrides,
    expected_final_step,
    plan_sweep,
    plan_to_json,
    read_metrics,
    run_command,
    run_is_complete,
    run_sweep,
)

__all__ = [
    "ACTIVATION_SIZED",
    "COLORS",
    "DEFAULT_ACTIVATIONS",
    "REFERENCE",
    "REPORT_STEM",
    "ActivationSummary",
    "RunSpec",
    "SweepPlan",
    "SweepResult",
    "_stack_common",
    "aggregate",
    "equal_param_overrides",
    "expected_final_step",
    "log_wandb",
    "markdown_table",
    "plan_sweep",
    "plan_to_json",
    "plot",
    "read_metrics",
    "run_command",
    "run_curves",
    "run_is_complete",
    "run_sweep",
    "smooth",
    "tokens_to_reach",
    "validation_label",
    "write_csv",
    "write_report",
]
