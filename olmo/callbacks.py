"""Trainer callbacks: metrics.jsonl + expert load, validation loss, W&B, the console.

olmo-core provides checkpointing, speed/MFU and garbage collection; these add what an
activation comparison needs (and a console a person can watch), and nothing here holds tensors
across steps.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from olmo_core.distributed.utils import get_rank
from olmo_core.train.callbacks import Callback, CheckpointerCallback, ConsoleLoggerCallback

from moe_model.errors import LaunchError, ObjectStoreError
from olmo import metric_names as names
from olmo import object_store
from olmo.config import WANDB_NO_CREDENTIALS, WandbConfig, wandb_credentials_found
from olmo.object_store import is_remote
from olmo.progress import Progress, format_duration  # noqa: F401  (format_duration: public here too)
from olmo.run_files import METRICS_FNAME, WANDB_DIR, WANDB_RUN_ID_FNAME, as_folder, local_run_dir

log = logging.getLogger(__name__)


def pop_expert_counts(metrics: dict[str, float]) -> dict[int, list[float]]:
    """Pop the ``expert_load/layer{l}/expert{e}`` counts from ``metrics``:
    {block index: [count of expert 0, 1, ...]} in block order."""
    counts: dict[int, dict[int, float]] = {}
    for key in [k for k in metrics if k.startswith(names.EXPERT_LOAD_PREFIX)]:
        layer_part, expert_part = key[len(names.EXPERT_LOAD_PREFIX):].split("/")
        layer, expert = int(layer_part[len("layer"):]), int(expert_part[len("expert"):])
        counts.setdefault(layer, {})[expert] = float(metrics.pop(key))
    return {layer: [counts[layer][e] for e in sorted(counts[layer])] for layer in sorted(counts)}


def dropped_fractions_from_metrics(
    metrics: dict[str, float], routed_rows: dict[int, float]
) -> dict[int, float]:
    """Pop the ``moe_dropped/layer{l}`` counts from ``metrics``; return dropped / routed rows."""
    out = {}
    for key in [k for k in metrics if k.startswith(names.DROPPED_PREFIX)]:
        layer = int(key[len(names.DROPPED_PREFIX) + len("layer"):])
        out[layer] = float(metrics.pop(key)) / max(routed_rows.get(layer, 0.0), 1.0)
    return out


@dataclass
class MetricsCallback(Callback):
    """Writes ``{save_folder}/metrics.jsonl`` on rank 0: one JSON object per step.

    Also turns the per-expert token counts into per-layer summaries for every logger:
    ``moe/layer{l}/MaxLoad`` is the busiest expert's share times E, i.e. max / mean load (1.0 =
    perfect balance), and the dropped-row counts into ``moe/layer{l}/DroppedFraction``. ``l``
    is the block index; ``expert_load`` lists the MoE blocks in order, and when they are not
    blocks 0..L-1 (moe_first_dense_layers) ``expert_load_layers`` names them. For a data
    mixture, the per-source sums become ``source/{name}/CrossEntropyLoss``, ``.../Tokens`` and
    the running ``.../TokensSeen`` (kept in the checkpoint).
    """

    priority: ClassVar[int] = 10
    fname: str = METRICS_FNAME
    tokens_per_step: int = 0
    _path: Path | None = None
    _expert_load: dict[int, dict[int, list[float]]] = field(default_factory=dict)
    _source_tokens_seen: dict[str, int] = field(default_factory=dict)

    def pre_train(self):
        if get_rank() != 0:
            return
        self._path = local_run_dir(self.trainer.save_folder) / self.fname
        remote = object_store.join(self.trainer.save_folder, self.fname)
        if is_remote(remote) and not self._path.exists() and object_store.exists(remote):
            object_store.download_file(remote, self._path)  # resuming on another node
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
        metrics.pop(names.MFU_RUN_AVERAGE, None)  # one MFU definition (see metric_names.MFU)
        counts = pop_expert_counts(metrics)
        routed_rows = {layer: sum(row) for layer, row in counts.items()}
        for layer, fraction in dropped_fractions_from_metrics(metrics, routed_rows).items():
            metrics[names.layer_dropped_fraction(layer)] = fraction
        if counts:
            load = {layer: [c / (routed_rows[layer] or 1.0) for c in row]
                    for layer, row in counts.items()}
            for layer, fractions in load.items():
                metrics[names.layer_max_load(layer)] = max(fractions) * len(fractions)
                metrics[names.layer_min_load(layer)] = min(fractions) * len(fractions)
            self._expert_load[step] = load
        ce = metrics.get(names.CE_LOSS)
        if ce is not None and math.isfinite(ce) and ce < 30:
            metrics[names.PERPLEXITY] = math.exp(ce)
        for name, sums in names.source_sums_from_metrics(metrics).items():
            if sums[names.SOURCE_LOSS_TOKENS] > 0:
                metrics[names.source_loss(name)] = sums[names.SOURCE_CE] / sums[names.SOURCE_LOSS_TOKENS]
            tokens = int(sums[names.SOURCE_TOKENS])
            seen = self._source_tokens_seen.get(name, 0) + tokens
            self._source_tokens_seen[name] = seen
            metrics[names.source_tokens(name)] = tokens
            metrics[names.source_tokens_seen(name)] = seen

    def _upload(self) -> None:
        """A URL save folder gets metrics.jsonl beside its checkpoints (rank 0 appends locally)."""
        if self._path is not None and self._path.exists() and is_remote(self.trainer.save_folder):
            object_store.upload_file(self._path, object_store.join(self.trainer.save_folder, self.fname))

    def post_checkpoint_saved(self, path):
        del path
        self._upload()

    def post_train(self):
        self._upload()

    def state_dict(self) -> dict[str, Any]:
        return {"source_tokens_seen": dict(self._source_tokens_seen)}

    def load_state_dict(self, state_dict: dict[str, Any]):
        self._source_tokens_seen = dict(state_dict.get("source_tokens_seen", {}))

    def log_metrics(self, step: int, metrics: dict[str, float]):
        load = self._expert_load.pop(step, None)
        if get_rank() != 0 or self._path is None:
            return
        record: dict[str, Any] = {"step": step, "tokens": step * self.tokens_per_step}
        record.update({k: _jsonable(v) for k, v in sorted(metrics.items())})
        if load is not None:
            record["expert_load"] = [[round(f, 6) for f in row] for row in load.values()]
            if list(load) != list(range(len(load))):
                record["expert_load_layers"] = list(load)
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
            progress = Progress(f"eval {label}", _num_batches(loader))
            try:
                for done, batch in enumerate(loader, 1):
                    batch_ce, batch_count = train_module.eval_batch(batch)
                    ce_sum += batch_ce.double().cpu()
                    count += batch_count.double().cpu()
                    progress.update(done)
            finally:
                loader.reset()
            if dist.is_initialized() and dist.get_world_size() > 1:
                totals = torch.stack([ce_sum, count]).to(train_module.device)
                dist.all_reduce(totals)
                ce_sum, count = totals.cpu().unbind()
            loss = (ce_sum / count.clamp_min(1)).item()
            results[label] = loss
            self.trainer.record_metric(names.eval_loss(label), loss, None)
            self.trainer.record_metric(names.eval_perplexity(label), math.exp(min(loss, 30.0)), None)
            log.info(
                f"eval {label}: CE {loss:.4f}  PPL {math.exp(min(loss, 30.0)):.2f}  "
                f"({int(count.item()):,d} tokens, {time.perf_counter() - start:.1f}s)"
            )
        return results


def _num_batches(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


@dataclass
class WandbCallback(Callback):
    """Weights & Biases logging; offline by default, so no API key is needed.

    The run id is kept in the save folder so a resumed run continues the same W&B run. With a
    URL save folder the id and wandb's run directory are also kept in the bucket.
    """

    priority: ClassVar[int] = 3
    settings: WandbConfig = field(default_factory=WandbConfig)
    run_name: str | None = None
    """The W&B run name when ``settings.name`` is unset."""
    config: dict[str, Any] | None = None
    """The resolved training config, stored with the W&B run."""
    _run: Any = None
    _run_dir: Path | None = None
    """wandb's directory for this run (``wandb/<offline-|>run-<time>-<id>``), on rank 0."""

    def pre_train(self):
        s = self.settings
        if s.mode == "disabled" or get_rank() != 0:
            return
        if s.mode == "online" and not wandb_credentials_found():
            # olmo.launch.preflight refuses this before anything is written; a callback built
            # by other code still gets the same one-line error instead of wandb's prompt.
            raise LaunchError(WANDB_NO_CREDENTIALS)
        import wandb
        from wandb.sdk.lib import runid

        # A URL save folder keeps W&B's files on the node (wandb writes a local directory); the
        # run id travels through the bucket, so a run resumed on another node continues the
        # same W&B run, and the files are uploaded beside the checkpoints (_upload).
        save_folder = local_run_dir(self.trainer.save_folder)
        id_file = save_folder / WANDB_RUN_ID_FNAME
        remote_id = object_store.join(str(self.trainer.save_folder), WANDB_RUN_ID_FNAME)
        if is_remote(remote_id) and not id_file.exists() and object_store.exists(remote_id):
            object_store.download_file(remote_id, id_file)
        run_id = id_file.read_text().strip() if id_file.exists() else runid.generate_id()
        id_file.write_text(run_id)
        if is_remote(remote_id):
            object_store.put_bytes(remote_id, run_id.encode())
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
        self._run_dir = Path(self._run.dir).parent  # run.dir is the run's files/ folder

    def log_metrics(self, step: int, metrics: dict[str, float]):
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def _upload(self) -> None:
        """With a URL save folder, this run's W&B directory (for an offline run, what ``wandb
        sync`` uploads later) goes to ``{save_folder}/wandb/``: the node's copy may not outlive
        the job."""
        if self._run_dir is not None and is_remote(self.trainer.save_folder):
            url = object_store.join(str(self.trainer.save_folder), WANDB_DIR, self._run_dir.name)
            object_store.upload_tree(self._run_dir, url)

    def post_checkpoint_saved(self, path):
        del path
        self._upload()

    def _finish(self, exit_code: int):
        if self._run is not None:
            self._run.finish(exit_code=exit_code)  # flushes the files _upload sends
            self._run = None
            self._upload()

    def post_train(self):
        self._finish(0)

    def on_error(self, exc: BaseException):
        del exc
        try:
            self._finish(1)
        except ObjectStoreError as err:  # the training error is the one to report
            log.warning(f"W&B files not uploaded: {err}")


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
        default_factory=lambda: {"Loss": names.CE_LOSS, "GradNorm": names.GRAD_NORM}
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
            metrics[names.spike_flag(name)] = float(spike)
            metrics[names.spike_count(name)] = float(self._counts.get(name, 0))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self._history.items()}, "counts": dict(self._counts)}

    def load_state_dict(self, state_dict: dict[str, Any]):
        self._history = {k: list(v) for k, v in state_dict.get("history", {}).items()}
        self._counts = dict(state_dict.get("counts", {}))


@dataclass
class FinalCheckpointerCallback(CheckpointerCallback):
    """olmo-core's checkpointer, except that a run resumed from its final checkpoint (a finished
    run started again) does not try to write that same ``stepN`` again, which would fail, and
    that with a URL save folder keep-last-k deletes remotely and deterministically."""

    def post_train(self):
        from olmo_core.train.checkpoint import Checkpointer

        if Checkpointer.dir_is_checkpoint(object_store.join(str(self.trainer.save_folder), f"step{self.step}")):
            self._latest_checkpoint_step = max(self._latest_checkpoint_step, self.step)
        super().post_train()
        if is_remote(self.trainer.save_folder):
            # The last upload is complete now: delete what keep-last-k scheduled (olmo-core
            # deletes only at a step boundary with no upload in flight, which background uploads
            # slower than the save interval never reach).
            self._remove_old_checkpoints()

    def _save_checkpoint(self, save_async=None, ephemeral: bool = False) -> str:
        if is_remote(self.trainer.save_folder):
            # The previous checkpoint is complete once awaited: older ones may go (see post_train).
            self._await_last_checkpoint()
            self._remove_old_checkpoints()
        return super()._save_checkpoint(save_async=save_async, ephemeral=ephemeral)

    def _remove_checkpoint(self, path: str):
        if not is_remote(path):
            return super()._remove_checkpoint(path)
        from olmo_core.train.checkpoint import Checkpointer

        # olmo-core's remote clear_directory deletes one listing page (1,000 objects); this
        # deletes all of them, the completion marker first.
        if get_rank() == 0:
            log.info(f"Removing old checkpoint at '{path}'...")
            self.trainer.run_bookkeeping_op(
                object_store.delete_prefix, path, first=(Checkpointer.METADATA_FNAME,),
                op_name=f"delete {path}", distributed=False,
            )  # fmt: skip


@dataclass
class ConsoleCallback(ConsoleLoggerCallback):
    """One line per ``log_interval`` steps, and none in between::

        step 20/150 | CE 6.912 | LB 0.01003 | Z 0.00215 | grad 0.873 | lr 2.9e-03 | 1,305 tok/s | MFU 11.8% | ETA 4m52s

    CE, LB and Z are this step's (LB and Z already weighted, as in the objective); tok/s and MFU
    are medians over the steps since the previous line (robust to a step that also ran
    validation or a checkpoint); ETA extrapolates the wall time of those steps, validation and
    checkpoints included. Subclasses olmo-core's console logger, which the trainer would
    otherwise add with a line per step.
    """

    _since: float | None = None
    _since_step: int = -1
    _started: float | None = None
    _tps: list[float] = field(default_factory=list)
    _mfu: list[float] = field(default_factory=list)

    def pre_train(self):
        self._since, self._since_step = time.monotonic(), self.trainer.global_step
        self._started = self._since

    def post_step(self):
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]):
        for key, values in ((names.TOKENS_PER_SECOND, self._tps), (names.MFU, self._mfu)):
            if key in metrics:
                values.append(float(metrics[key]))
        max_steps = self.trainer.max_steps
        # The trainer can log one step twice (metrics recorded after its first flush, e.g. by
        # validation); one line per step.
        if (step % self.log_interval and step != max_steps) or step <= self._since_step:
            return
        now = time.monotonic()
        eta = None
        if self._since is not None and step > self._since_step and max_steps:
            per_step = (now - self._since) / (step - self._since_step)
            eta = per_step * max(0, max_steps - step)
        elapsed = now - self._started if self._started is not None else None
        log.info(progress_line(step, max_steps, metrics, self._tps, self._mfu, eta,
                               tokens_seen=self.trainer.global_train_tokens_seen,
                               elapsed_seconds=elapsed,
                               memory_gib=peak_memory_gib(self.trainer.train_module.device)))
        self._since, self._since_step = now, step
        self._tps.clear()
        self._mfu.clear()


def progress_line(
    step: int,
    max_steps: int | None,
    metrics: dict[str, float],
    tps: list[float],
    mfu: list[float],
    eta_seconds: float | None,
    tokens_seen: int | None = None,
    elapsed_seconds: float | None = None,
    memory_gib: float | None = None,
) -> str:
    """The console line of :class:`ConsoleCallback`; fields without a value are left out."""
    parts = [f"step {step}/{max_steps or '?'}"]
    for label, key, fmt in (
        ("CE", names.CE_LOSS, ".4f"),
        ("LB", names.LB_LOSS, ".5f"),
        ("Z", names.Z_LOSS, ".5f"),
        ("grad", names.GRAD_NORM, ".3f"),
        ("lr", names.LR, ".2e"),
    ):
        if key in metrics:
            parts.append(f"{label} {float(metrics[key]):{fmt}}")
    if metrics.get(names.SKIPPED_STEPS):
        parts.append(f"skipped {int(metrics[names.SKIPPED_STEPS])}")
    if tps:
        parts.append(f"{statistics.median(tps):,.0f} tok/s")
    if mfu:
        parts.append(f"MFU {statistics.median(mfu):.1f}%")
    if memory_gib is not None:
        parts.append(f"mem {memory_gib:.2f} GiB")
    if tokens_seen:
        parts.append(f"{format_count(tokens_seen)} tokens")
    if elapsed_seconds is not None:
        parts.append(f"{format_duration(elapsed_seconds)} elapsed")
    if eta_seconds is not None:
        parts.append(f"ETA {format_duration(eta_seconds)}")
    return " | ".join(parts)


def format_count(n: float) -> str:
    """``950``, ``12.3K``, ``4.56M``, ``1.20B``, ``5.13T``: three significant digits."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.{max(0, 2 - int(math.log10(abs(value))))}f}{suffix}"
    return f"{n:.0f}"


def peak_memory_gib(device: torch.device) -> float:
    """Peak since the process started: GPU memory allocated to tensors; on CPU the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


@dataclass
class MemoryMonitorCallback(Callback):
    """Records :data:`names.PEAK_MEMORY_GIB` every step (max over ranks): host-side counters
    only, no device synchronisation."""

    def post_step(self):
        from olmo_core.train.common import ReduceType

        device = self.trainer.train_module.device
        self.trainer.record_metric(names.PEAK_MEMORY_GIB, peak_memory_gib(device), ReduceType.max)


@dataclass
class RunSummaryCallback(Callback):
    """At the end of a run (finished or stopped), rank 0 prints where its outputs are and the
    commands that continue from them."""

    priority: ClassVar[int] = -100  # after the checkpointer has written the final checkpoint
    config_path: str | None = None
    """The YAML the run was launched with (for the commands that take a config)."""

    def post_train(self):
        if get_rank() != 0:
            return
        folder = self.trainer.save_folder
        print(run_summary(as_folder(folder), self.trainer.global_step,
                          self.trainer.max_steps, self.config_path), flush=True)


def runnable_path(path: str | Path) -> str:
    """``path`` as a shell word that works from the current directory: relative when it lies
    below it, absolute otherwise, quoted where needed."""
    path = Path(path).absolute()
    try:
        text = str(path.relative_to(Path.cwd()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def run_summary(
    save_folder: Path | str, step: int, max_steps: int | None, config_path: str | None
) -> str:
    """Outputs of the run in ``save_folder`` and what to do next, as printed text.

    Every command names the interpreter that ran training (``.venv/bin/python``, not a bare
    ``python`` that a plain shell may not have), so each works as printed from the directory
    the run was started in.
    """
    from olmo.run_files import CONFIG_FNAME, WANDB_DIR, find_checkpoints

    folder = str(save_folder)
    done = max_steps is not None and step >= max_steps
    lines = [f"Run {'complete' if done else f'stopped at step {step}'}: {folder}"]
    checkpoints = find_checkpoints(save_folder)
    if checkpoints:
        lines.append(f"  checkpoint    {checkpoints[-1]}  (latest of {len(checkpoints)} on disk)")
    lines.append(f"  metrics       {object_store.join(folder, METRICS_FNAME)}")
    lines.append(f"  config        {object_store.join(folder, CONFIG_FNAME)}")
    python = runnable_path(sys.executable)
    bin_dir = Path(sys.executable).parent
    wandb_runs = sorted((local_run_dir(save_folder) / WANDB_DIR).glob("*run-*"))
    if wandb_runs:
        newest = wandb_runs[-1]
        wandb_cli = runnable_path(bin_dir / "wandb") if (bin_dir / "wandb").exists() else "wandb"
        sync = f"  (upload: {wandb_cli} sync {newest})" if newest.name.startswith("offline-") else ""
        lines.append(f"  W&B           {newest}{sync}")
    repo = Path(__file__).resolve().parents[1]
    # The saved config holds the command line's overrides too (data paths, sizes), which the
    # YAML the run was launched with lacks.
    if is_remote(folder):
        config = object_store.join(folder, CONFIG_FNAME) if not config_path else runnable_path(config_path)
        run = shlex.quote(folder)
    else:
        saved = Path(folder) / CONFIG_FNAME
        config = runnable_path(saved if saved.is_file() or not config_path else config_path)
        run = runnable_path(folder)

    def script(name: str) -> str:
        return f"{python} {runnable_path(repo / 'scripts' / name)}"

    if done:
        longer = max_steps * 2 if max_steps else 1000
        resume = (f"  train longer  bash {runnable_path(repo / 'run_pretrain.sh')} {config} "
                  f"--max_duration={longer}")
    else:
        resume = f"  resume        bash {runnable_path(repo / 'run_pretrain.sh')} {config}"
    lines += [
        "Next:",
        resume,
        f"  generate      {script('generate.py')} {run} --prompt \"ROMEO:\" --temperature 0.8",
        f"  export        {script('convert_to_hf.py')} {run} {run}-hf --verify",
        f"  analyse       {script('analyze.py')} {run}",
        f"  evaluate      {script('evaluate_downstream.py')} {run} --tasks arc_easy,piqa --limit 200",
        f"  compare       {script('compare_activations.py')} {config} --out runs/compare",
    ]
    return "\n".join(lines)
