"""Names of the metrics written to metrics.jsonl, W&B and the console, in one place.

Writers (the train module, callbacks) and readers (the comparison tool, tests) use these
constants, so a renamed metric cannot silently leave a reader looking at nothing.
"""

from __future__ import annotations

__all__ = [
    "CE_LOSS",
    "DROPPED_PREFIX",
    "EXPERT_LOAD_PREFIX",
    "GRAD_NORM",
    "LB_LOSS",
    "LR",
    "MFU",
    "MFU_RUN_AVERAGE",
    "PEAK_MEMORY_GIB",
    "PERPLEXITY",
    "SKIPPED_STEPS",
    "TOKENS_PER_SECOND",
    "TOKENS_SEEN",
    "TOTAL_LOSS",
    "Z_LOSS",
    "downstream_accuracy",
    "downstream_instances",
    "eval_loss",
    "eval_loss_label",
    "eval_perplexity",
    "dropped_count",
    "expert_count",
    "layer_bias_range",
    "layer_dropped_fraction",
    "layer_max_load",
    "layer_min_load",
    "layer_router_entropy",
    "source_loss",
    "source_sum",
    "source_sums_from_metrics",
    "source_tokens",
    "source_tokens_seen",
    "spike_count",
    "spike_flag",
]

# Training objective (per optimizer step, mean over data-parallel ranks).
CE_LOSS = "train/CrossEntropyLoss"
LB_LOSS = "train/LoadBalancingLoss"
Z_LOSS = "train/MoEZLoss"
TOTAL_LOSS = "train/TotalLoss"
PERPLEXITY = "train/Perplexity"

# Optimizer.
LR = "optim/LR"
GRAD_NORM = "optim/GradNorm"
SKIPPED_STEPS = "optim/SkippedSteps"

# Throughput (recorded by olmo-core's SpeedMonitorCallback under these names).
TOKENS_PER_SECOND = "throughput/device/TPS"
TOKENS_SEEN = "throughput/total tokens"
# MFU in percent: the model FLOPs of the step (6 x active parameters + attention, per token) over
# its wall time, divided by the device's peak (olmo/flops.py). olmo-core also records an average
# since the launch under MFU_RUN_AVERAGE, a second figure of another meaning: it is dropped
# before any logger sees it (MetricsCallback), so every MFU a user reads has one definition.
MFU = "throughput/device/MFU"
MFU_RUN_AVERAGE = "throughput/device/MFU (actual avg)"

# Peak memory since the process started (GPU: allocated to tensors, the caching allocator's
# counter; CPU: the process's peak resident set size), max over ranks.
PEAK_MEMORY_GIB = "system/PeakMemory (GiB)"

# Raw routed-row counts, one metric per (layer, expert); MetricsCallback turns them into
# per-layer load summaries and the ``expert_load`` field of metrics.jsonl.
EXPERT_LOAD_PREFIX = "expert_load/"


def expert_count(layer: int, expert: int) -> str:
    return f"{EXPERT_LOAD_PREFIX}layer{layer}/expert{expert}"


def layer_max_load(layer: int) -> str:
    """The busiest expert's share of routed rows times E (1.0 = perfect balance)."""
    return f"moe/layer{layer}/MaxLoad"


def layer_min_load(layer: int) -> str:
    return f"moe/layer{layer}/MinLoad"


# Routing diagnostics, recorded every step; ``layer`` is the block index.
# Raw dropped-row counts; MetricsCallback turns them into ``layer_dropped_fraction``.
DROPPED_PREFIX = "moe_dropped/"


def dropped_count(layer: int) -> str:
    return f"{DROPPED_PREFIX}layer{layer}"


def layer_dropped_fraction(layer: int) -> str:
    """Share of the layer's routed rows the capacity limit dropped (moe_capacity_factor)."""
    return f"moe/layer{layer}/DroppedFraction"


def layer_router_entropy(layer: int) -> str:
    """Mean entropy of the router's distribution over experts, nats (log E = uniform)."""
    return f"moe/layer{layer}/RouterEntropy"


def layer_bias_range(layer: int) -> str:
    """max - min of the auxiliary-loss-free expert bias (moe_bias_update_rate)."""
    return f"moe/layer{layer}/BiasRange"


# Raw per-source sums of a step (cross-entropy, predicted tokens, input tokens), summed over
# ranks; MetricsCallback turns them into the per-source metrics below and drops them.
SOURCE_SUM_PREFIX = "source_sums/"
SOURCE_CE, SOURCE_LOSS_TOKENS, SOURCE_TOKENS = "ce", "loss_tokens", "tokens"
SOURCE_SUM_KINDS = (SOURCE_CE, SOURCE_LOSS_TOKENS, SOURCE_TOKENS)


def source_sum(name: str, kind: str) -> str:
    return f"{SOURCE_SUM_PREFIX}{name}/{kind}"


def source_sums_from_metrics(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """Pop the :func:`source_sum` entries from ``metrics``: {source: {kind: value}}."""
    sums: dict[str, dict[str, float]] = {}
    for key in [k for k in metrics if k.startswith(SOURCE_SUM_PREFIX)]:
        name, kind = key[len(SOURCE_SUM_PREFIX):].rsplit("/", 1)
        sums.setdefault(name, {})[kind] = float(metrics.pop(key))
    return sums


def source_loss(name: str) -> str:
    """Training cross-entropy of one mixture source's tokens in the step."""
    return f"source/{name}/CrossEntropyLoss"


def source_tokens(name: str) -> str:
    """Tokens of one mixture source in the step (all ranks)."""
    return f"source/{name}/Tokens"


def source_tokens_seen(name: str) -> str:
    """Tokens of one mixture source trained on so far."""
    return f"source/{name}/TokensSeen"


def eval_loss(label: str) -> str:
    return f"eval/{label}/CrossEntropyLoss"


def eval_loss_label(key: str) -> str | None:
    """The validation set of an :func:`eval_loss` key, None for any other metric."""
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and key == eval_loss(parts[1]) else None


def eval_perplexity(label: str) -> str:
    return f"eval/{label}/Perplexity"


def downstream_accuracy(task: str) -> str:
    return f"downstream/{task}/accuracy"


def downstream_instances(task: str) -> str:
    return f"downstream/{task}/instances"


def spike_flag(name: str) -> str:
    return f"stability/{name}Spike"


def spike_count(name: str) -> str:
    return f"stability/{name}Spikes"
