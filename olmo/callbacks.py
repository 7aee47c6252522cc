"""Trainer callbacks: metrics.jsonl + expert load, validation loss, Weights & Biases.

olmo-core provides checkpointing, console logging, speed/MFU and garbage collection; these add
what an activation comparison needs, and nothing here holds tensors across steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from olmo_core.distributed.utils import get_rank
from olmo_core.train.callbacks import Callback, CheckpointerCallback

from olmo.config import WandbConfig
from olmo.train_module import EXPERT_LOAD_PREFIX

log = logging.getLogger(__name__)


def expert_load_from_metrics(metrics: dict[str, float]) -> list[list[float]]:
    """Pop ``expert_load/layer{l}/expert{e}`` counts from ``metrics``; return fractions [L][E]."""
    counts: dict[int, dict[int, float]] = {}
    for key in [k for k in metrics if k.startswith(EXPERT_LOAD_PREFIX)]:
        layer_part, expert_part = key[len(EXPERT_LOAD_PREFIX):].split("/")
        layer, expert = int(layer_part[len("layer"):]), int(expert_part[len("expert"):])
        counts.setdefault(layer, {})[expert] = metrics.pop(key)
    load = []
    for layer in sorted(counts):
        row = [counts[layer][e] for e in sorted(counts[layer])]
        total = sum(row) or 1.0
        load.append([c / total for c in row])
    return load


@dataclass
class MetricsCallback(Callback):
    """Writes ``{save_folder}/metrics.jsonl`` on rank 0: one JSON object per step.

    Also turns the per-expert token counts into per-layer summaries for every logger:
    ``moe/layer{l}/MaxLoad`` is the busiest expert's share times E (1.0 = perfect balance).
    """

    priority: ClassVar[int] = 10
    fname: str = "metrics.jsonl"
    tokens_per_step: int = 0
    _path: Path | None = None
    _expert_load: dict[int, list[list[float]]] = field(default_factory=dict)

    def pre_train(self):
        if get_rank() != 0:
            return
        self._path = Path(self.trainer.save_folder) / self.fname
        if self._path.exists():
            # A resumed run drops lines past the checkpoint so the file reads as one run.
            keep = []
            for line in self._path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.trainer.global_step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError):
                    continue
            self._path.write_text("".join(line + "\n" for line in keep))

    def pre_log_metrics(self, step: int, metrics: dict[str, float]):
        load = expert_load_from_metrics(metrics)
        if load:
            for layer, fractions in enumerate(load):
                metrics[f"moe/layer{layer}/MaxLoad"] = max(fractions) * len(fractions)
                metrics[f"moe/layer{layer}/MinLoad"] = min(fractions) * len(fractions)
            self._expert_load[step] = load
        ce = metrics.get("train/CrossEntropyLoss")
        if ce is not None and math.isfinite(ce) and ce < 30:
            metrics["train/Perplexity"] = math.exp(ce)

    def log_metrics(self, step: int, metrics: dict[str, float]):
        load = self._expert_load.pop(step, None)
        if get_rank() != 0 or self._path is None:
            return
        record: dict[str, Any] = {"step": step, "tokens": step * self.tokens_per_step}
        record.update({k: _jsonable(v) for k, v in sorted(metrics.items())})
        if load is not None:
            record["expert_load"] = [[round(f, 6) for f in row] for row in load]
        with self._path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class ValidationCallback(Callback):
    """Validation cross-entropy and perplexity on each labelled set every ``eval_interval`` steps."""

    priority: ClassVar[int] = 5
    loaders: dict[str, Any] = field(default_factory=dict)
    eval_interval: int = 1000

    def post_step(self):
        step = self.trainer.global_step
        if step % self.eval_interval == 0 or step == self.trainer.max_steps:
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        results = {}
        train_module = self.trainer.train_module
        for label, loader in self.loaders.items():
            start = time.perf_counter()
            loader.reshuffle(epoch=1)
            ce_sum = torch.zeros((), dtype=torch.float64)
            count = torch.zeros((), dtype=torch.float64)
            try:
                for batch in loader:
                    batch_ce, batch_count = train_module.eval_batch(batch)
                    ce_sum += batch_ce.double().cpu()
                    count += batch_count.double().cpu()
            finally:
                loader.reset()
            if dist.is_initialized() and dist.get_world_size() > 1:
                totals = torch.stack([ce_sum, count]).to(train_module.device)
                dist.all_reduce(totals)
                ce_sum, count = totals.cpu().unbind()
            loss = (ce_sum / count.clamp_min(1)).item()
            results[label] = loss
            self.trainer.record_metric(f"eval/{label}/CrossEntropyLoss", loss, None)
            self.trainer.record_metric(
                f"eval/{label}/Perplexity", math.exp(min(loss, 30.0)), None
            )
            log.info(
                f"eval {label}: CE {loss:.4f}  PPL {math.exp(min(loss, 30.0)):.2f}  "
                f"({int(count.item()):,d} tokens, {time.perf_counter() - start:.1f}s)"
            )
        return results


@dataclass
class WandbCallback(Callback):
    """Weights & Biases logging; offline by default, so no API key is needed.

    The run id is kept in the save folder so a resumed run continues the same W&B run.
    """

    priority: ClassVar[int] = 3
    settings: WandbConfig = field(default_factory=WandbConfig)
    run_name: str | None = None
    """The W&B run name when ``settings.name`` is unset."""
    config: dict[str, Any] | None = None
    """The resolved training config, stored with the W&B run."""
    _run: Any = None

    def pre_train(self):
        s = self.settings
        if s.mode == "disabled" or get_rank() != 0:
            return
        if s.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise RuntimeError("wandb.mode=online needs the WANDB_API_KEY environment variable")
        import wandb
        from wandb.sdk.lib import runid

        save_folder = Path(self.trainer.save_folder)
        id_file = save_folder / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else runid.generate_id()
        id_file.write_text(run_id)
        self._run = wandb.init(
            mode=s.mode,
            dir=str(save_folder),
            project=s.project,
            entity=s.entity,
            group=s.group,
            name=s.name or self.run_name,
            tags=list(s.tags) or None,
            config=self.config,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log_metrics(self, step: int, metrics: dict[str, float]):
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def _finish(self, exit_code: int):
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def post_train(self):
        self._finish(0)

    def on_error(self, exc: BaseException):
        del exc
        self._finish(1)


@dataclass
class SpikeDetectorCallback(Callback):
    """Flags loss and gradient-norm spikes: a value above mean + ``threshold_std`` * std of the
    last ``window`` finite values (after ``min_history`` of them), as OLMo's stability monitor.

    Adds ``stability/<name>Spike`` (0 or 1) and ``stability/<name>Spikes`` (running count) to
    every step's metrics and logs a warning; its window and counts are in the checkpoint.
    """

    priority: ClassVar[int] = 11
    window: int = 100
    threshold_std: float = 6.0
    min_history: int = 20
    watch: dict[str, str] = field(
        default_factory=lambda: {"Loss": "train/CrossEntropyLoss", "GradNorm": "optim/GradNorm"}
    )
    _history: dict[str, list[float]] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def check(self, name: str, value: float) -> bool:
        """Record ``value`` for ``name``; True when it is a spike."""
        history = self._history.setdefault(name, [])
        if not math.isfinite(value):
            # Non-finite values are the non-finite policy's business, not a spike.
            return False
        spike = False
        if len(history) >= self.min_history:
            mean = sum(history) / len(history)
            std = math.sqrt(sum((v - mean) ** 2 for v in history) / len(history))
            spike = value > mean + self.threshold_std * max(std, 1e-12)
        history.append(value)
        del history[: -self.window]
        if spike:
            self._counts[name] = self._counts.get(name, 0) + 1
        return spike

    def pre_log_metrics(self, step: int, metrics: dict[str, float]):
        for name, key in self.watch.items():
            value = metrics.get(key)
            if value is None:
                continue
            spike = self.check(name, float(value))
            if spike:
                log.warning(f"step {step}: {key} spike ({value:.4g})")
            metrics[f"stability/{name}Spike"] = float(spike)
            metrics[f"stability/{name}Spikes"] = float(self._counts.get(name, 0))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self._history.items()}, "counts": dict(self._counts)}

    def load_state_dict(self, state_dict: dict[str, Any]):
        self._history = {k: list(v) for k, v in state_dict.get("history", {}).items()}
        self._counts = dict(state_dict.get("counts", {}))


@dataclass
class FinalCheckpointerCallback(CheckpointerCallback):
    """olmo-core's checkpointer, except that a run resumed from its final checkpoint (a finished
    run started again) does not try to write that same ``stepN`` again, which would fail."""

    def post_train(self):
        from olmo_core.train.checkpoint import Checkpointer

        if Checkpointer.dir_is_checkpoint(str(Path(self.trainer.save_folder) / f"step{self.step}")):
            self._latest_checkpoint_step = max(self._latest_checkpoint_step, self.step)
        super().post_train()
