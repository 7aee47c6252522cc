"""Build and run a training job from a :class:`TrainConfig` (the body of ``scripts/train.py``).

Order matters: everything that can fail on user input (config, data files, save folder) is
checked before the process group, the model or any file in the save folder is created.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_model.attention import check_flex_trainable
from moe_model.errors import LaunchError, project_error_behind
from olmo.config import (
    WANDB_NO_CREDENTIALS,
    TrainConfig,
    load_config,
    wandb_credentials_found,
)
from olmo.data import (
    DataPlan,
    build_eval_loaders,
    build_train_loader,
    plan_data,
    run_sequences,
    validate_data,
)
from olmo.flops import device_peak_flops
from olmo.object_store import check_access, is_remote
from olmo.run_files import (
    CONFIG_FNAME,
    DATA_WORK_DIR,
    METRICS_FNAME,
    as_folder,
    checkpoint_step,
    find_checkpoints,
    local_run_dir,
    remote_checkpoint_complete,
    remove_run_files,
    run_entries,
    saved_config,
    wandb_run_dirs,
    write_run_file,
)

log = logging.getLogger("olmo.train")

def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


RUN_IDENTITY_KEYS = (
    "model", "global_train_batch_size", "data.paths", "data.sources", "data.mix_tokens",
    "data.dtype",
)  # fmt: skip


def _changes(key: str, old, new) -> list[str]:
    """``key.sub: old -> new`` for every leaf that differs between two config values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for sub in dict.fromkeys([*old, *new])
            for line in _changes(f"{key}.{sub}", old.get(sub, "<unset>"), new.get(sub, "<unset>"))
        ]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def changed_settings(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """Each setting that makes ``cfg`` a different run from ``saved``, as ``model.d_model: 128 ->
    256``; empty when it is the same run."""
    changes = []
    old_all, new_all = saved.to_dict(), cfg.to_dict()
    for key in RUN_IDENTITY_KEYS:
        old, new = old_all, new_all
        for part in key.split("."):
            old, new = old[part], new[part]
        changes += _changes(key, old, new)
    return changes


def other_run_reason(cfg: TrainConfig) -> str | None:
    """Why save_folder's checkpoints belong to another run, or None (none there, or this run).

    A folder whose saved config has the same model, data and batch settings is the same run and
    is resumed; anything else would silently mix two runs' checkpoints.
    """
    save_folder = as_folder(cfg.save_folder)
    if not find_checkpoints(save_folder):
        return None
    saved = saved_config(save_folder)
    if saved is None:
        return f"holds checkpoints but no {CONFIG_FNAME}"
    changes = changed_settings(saved, cfg)
    if changes:
        return f"holds checkpoints of another run (its {CONFIG_FNAME} differs: {', '.join(changes)})"
    return None


def check_save_folder(cfg: TrainConfig) -> None:
    """Refuse to write into a folder holding another run's checkpoints (unless save_overwrite)."""
    reason = None if cfg.save_overwrite else other_run_reason(cfg)
    if reason is not None:
        folder = cfg.save_folder.rstrip("/")
        number = 2
        while Path(f"{folder}-{number}").exists():
            number += 1
        raise LaunchError(
            f"save_folder {cfg.save_folder!r} {reason}; train into a new folder, e.g. "
            f"--save_folder={folder}-{number}, or add --save_overwrite=true to move that run's files to "
            f"{folder}.old-<date-time>/ and start over"
        )


def move_other_run_aside(cfg: TrainConfig) -> Path | None:
    """With save_overwrite: move another run's files out of save_folder (rank 0); return where.

    olmo-core would otherwise resume from that run's checkpoints. Its checkpoints, metrics,
    config and W&B files go, whole and renamed only, to a sibling folder
    ``<save_folder>.old-<date-time>/``, so nothing of it is lost; files that are not a run's
    stay. A folder holding this same run is left alone and resumes.
    """
    if is_remote(cfg.save_folder) and cfg.save_overwrite:
        if not find_checkpoints(cfg.save_folder) or other_run_reason(cfg) is not None:
            remove_run_files(cfg.save_folder, [METRICS_FNAME, CONFIG_FNAME])
        return
    save_folder = Path(cfg.save_folder)
    if not cfg.save_overwrite or not save_folder.is_dir():
        return None
    checkpoints = find_checkpoints(save_folder)
    if checkpoints and other_run_reason(cfg) is None:
        return None
    moving = [p for p in run_entries(save_folder) if p.exists()]
    if not moving:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = save_folder.with_name(f"{save_folder.name}.old-{stamp}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = save_folder.with_name(f"{save_folder.name}.old-{stamp}-{suffix}")
    aside.mkdir(parents=True)
    for path in moving:
        path.rename(aside / path.name)
    log.warning(
        f"save_overwrite: moved the previous run in {save_folder} ({len(checkpoints)} "
        f"checkpoint(s), {len(moving)} file(s)/folder(s)) to {aside}; nothing was deleted"
    )
    return aside


def run_target_step(cfg: TrainConfig, save_folder: Path, saved: TrainConfig) -> int | None:
    """The step this run stops at (max_duration, or stop_at when earlier); None when only the
    trainer can tell (an epoch count other than the saved run's)."""
    if cfg.duration[0] != "epochs":
        target = run_sequences(
            cfg.duration, epoch_sequences=None, global_batch_size=cfg.global_train_batch_size,
            sequence_length=cfg.model.max_sequence_length,
        ) // cfg.global_train_batch_size  # fmt: skip
    elif saved.max_duration == cfg.max_duration:
        # Epochs: the trainer stored the step count it derived from the data in each checkpoint.
        newest = find_checkpoints(save_folder)[-1]
        target = torch.load(newest / "train" / "rank0.pt", weights_only=False)["max_steps"]
    else:
        target = None
    if cfg.stop_at is not None:
        target = cfg.stop_at if target is None else min(target, cfg.stop_at)
    return target


def finished_run_message(cfg: TrainConfig) -> str | None:
    """One line saying that save_folder holds this run already finished (or stopped at
    stop_at) and where its files are; None when there is training to do (or save_folder is a
    URL: the trainer then finds the run complete itself)."""
    if is_remote(cfg.save_folder):
        return None
    save_folder = Path(cfg.save_folder)
    checkpoints = find_checkpoints(save_folder)
    if not checkpoints or not (save_folder / CONFIG_FNAME).is_file():
        return None
    saved = load_config(save_folder / CONFIG_FNAME)
    if changed_settings(saved, cfg):
        return None
    step = checkpoint_step(checkpoints[-1])
    target = run_target_step(cfg, save_folder, saved)
    if target is None or step < target:
        return None
    if cfg.stop_at is not None and step >= cfg.stop_at:
        how, more = f"stopped at stop_at={cfg.stop_at}", "raise or drop --stop_at"
    else:
        how, more = f"finished (max_duration={cfg.max_duration})", "raise --max_duration"
    files = [f"checkpoint {checkpoints[-1]}", f"metrics {save_folder / METRICS_FNAME}"]
    wandb_runs = wandb_run_dirs(save_folder)
    if wandb_runs:
        where = str(wandb_runs[0]) if len(wandb_runs) == 1 else " ".join(map(str, wandb_runs))
        sync = f" (upload: wandb sync {where})" if wandb_runs[0].name.startswith("offline-") else ""
        files.append(f"W&B {where}{sync}")
    return (
        f"{cfg.run_name}: already {how} at step {step}; nothing to do, nothing written. "
        f"{'; '.join(files)}. To train further, {more}."
    )


def check_load_path(cfg: TrainConfig) -> None:
    if cfg.load_path is None:
        return
    from olmo_core.train.checkpoint import Checkpointer

    path = Path(cfg.load_path)
    if is_remote(cfg.load_path):
        check_access(cfg.load_path, write=False, what="load_path")
        complete = remote_checkpoint_complete(cfg.load_path)
    else:
        complete = path.is_dir() and Checkpointer.dir_is_checkpoint(str(path))
    if not complete:
        raise LaunchError(
            f"load_path {cfg.load_path!r} is not a complete checkpoint (expected a stepN "
            "directory with model_and_optim/, train/ and .metadata.json)"
        )


def training_device_type() -> str:
    """The kind of device :func:`init_distributed` will train on, known before it runs."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_wandb(cfg: TrainConfig) -> None:
    if cfg.wandb.mode == "online" and not wandb_credentials_found():
        raise LaunchError(WANDB_NO_CREDENTIALS)


def check_attention_backend(cfg: TrainConfig, device_type: str) -> None:
    m = cfg.model
    if m.document_masking and m.document_masking_backend == "flex":
        check_flex_trainable(device_type)


def preflight(cfg: TrainConfig, world_size: int | None = None) -> DataPlan:
    """All cheap checks on user input; raise ConfigError/DataError/LaunchError. Returns the
    plan of the training data, which the loader then uses.

    ``world_size``: the number of processes the run will have (default: this process's
    torchrun environment); the launcher passes it before torchrun starts them.
    """
    world_size = world_size_from_env() if world_size is None else world_size
    cfg.validate_batch_sizes(world_size)
    cfg.validate_parallel(world_size)
    check_attention_backend(cfg, training_device_type())
    check_wandb(cfg)
    plan = validate_data(
        cfg.data,
        vocab_size=cfg.model.vocab_size,
        sequence_length=cfg.model.max_sequence_length,
        global_batch_size=cfg.global_train_batch_size,
        duration=cfg.duration,
    )
    check_load_path(cfg)
    if is_remote(cfg.save_folder):
        check_access(cfg.save_folder, write=True, what="save_folder")
    check_save_folder(cfg)
    return plan


@dataclass(frozen=True)
class RunEnv:
    """Where this process runs: its data-parallel rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device


def init_distributed(cfg: TrainConfig) -> RunEnv:
    """Threads, the process group (under torchrun), seeds; returns this process's place."""
    import torch.distributed as dist
    from olmo_core.distributed.utils import get_rank
    from olmo_core.train import prepare_training_environment

    if "OMP_NUM_THREADS" not in os.environ:
        # olmo-core would set 8; oversubscribing a small CPU slows every op.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // local)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    # NCCL for GPU tensors plus gloo for the trainer's CPU bookkeeping collectives.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    prepare_training_environment(seed=cfg.seed, backend=backend if "WORLD_SIZE" in os.environ else None)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if training_device_type() == "cuda":
        device = torch.device(f"cuda:{torch.cuda.current_device()}")
    else:
        device = torch.device("cpu")
    return RunEnv(rank=get_rank(), world_size=world, device=device)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def prepare_save_folder(cfg: TrainConfig, env: RunEnv) -> Path | str:
    """Rank 0 moves another run's files aside (save_overwrite; a URL's are deleted) and writes
    the resolved config."""
    save_folder = as_folder(cfg.save_folder)
    if env.rank == 0:
        move_other_run_aside(cfg)
        local_run_dir(save_folder).mkdir(parents=True, exist_ok=True)
        write_run_file(save_folder, CONFIG_FNAME, cfg.to_yaml())
    _barrier()
    return save_folder


def build_data_loaders(cfg: TrainConfig, env: RunEnv, work_dir: Path, plan: DataPlan):
    """(training loader, {label: validation loader}) for this rank, the training loader from
    preflight's plan of the data."""
    seq_len = cfg.model.max_sequence_length
    train_loader = build_train_loader(
        cfg.data,
        sequence_length=seq_len,
        vocab_size=cfg.model.vocab_size,
        global_batch_size=cfg.global_train_batch_size,
        seed=cfg.seed,
        work_dir=str(work_dir),
        dp_rank=env.rank,
        dp_world_size=env.world_size,
        plan=plan,
        document_ids=cfg.model.document_masking,
    )
    eval_loaders = build_eval_loaders(
        cfg.data,
        sequence_length=seq_len,
        vocab_size=cfg.model.vocab_size,
        # build_eval_loaders counts sequences over all ranks; the config counts per rank.
        batch_size=(cfg.eval_batch_size or cfg.device_train_microbatch_size) * env.world_size,
        work_dir=str(work_dir),
        dp_rank=env.rank,
        dp_world_size=env.world_size,
        document_ids=cfg.model.document_masking,
    )
    return train_loader, eval_loaders


def build_callbacks(
    cfg: TrainConfig, env: RunEnv, train_module, eval_loaders: dict, config_path: str | None
) -> dict:
    """The trainer's callbacks, by name, from the config."""
    from olmo_core.train.callbacks import GarbageCollectorCallback, SpeedMonitorCallback

    from olmo.callbacks import (
        ConsoleCallback,
        FinalCheckpointerCallback,
        MemoryMonitorCallback,
        MetricsCallback,
        RunSummaryCallback,
        SpikeDetectorCallback,
        ValidationCallback,
        WandbCallback,
    )
    from olmo.checkpoint_retention import CheckpointRetentionCallback
    from olmo.faults import fault_injection_callback

    seq_len = cfg.model.max_sequence_length
    keep = cfg.save_num_checkpoints_to_keep
    callbacks = {
        "checkpointer": FinalCheckpointerCallback(
            save_interval=cfg.save_interval, max_checkpoints=None if keep < 0 else keep,
            # To a URL: staged locally in the step, uploaded in the background (RemoteCheckpointer).
            save_async=is_remote(cfg.save_folder),
        ),
        "checkpoint_retention": CheckpointRetentionCallback(keep=keep),
        "console_logger": ConsoleCallback(log_interval=cfg.console_log_interval),
        "speed_monitor": SpeedMonitorCallback(
            num_flops_per_token=cfg.model.num_flops_per_token(seq_len),
            device_peak_flops_per_second=device_peak_flops(
                env.device, train_module.param_dtype, cfg.device_peak_flops
            ),
        ),
        "garbage_collector": GarbageCollectorCallback(),
        "memory_monitor": MemoryMonitorCallback(),
        "spike_detector": SpikeDetectorCallback(),
        "metrics": MetricsCallback(tokens_per_step=cfg.global_train_batch_size * seq_len),
        "wandb": WandbCallback(settings=cfg.wandb, run_name=cfg.run_name, config=cfg.to_dict()),
        "run_summary": RunSummaryCallback(config_path=config_path),
    }
    if eval_loaders:
        callbacks["validation"] = ValidationCallback(loaders=eval_loaders, eval_interval=cfg.eval_interval)
    if cfg.downstream_tasks:
        from olmo.downstream import DownstreamCallback

        callbacks["downstream"] = DownstreamCallback(
            tasks=list(cfg.downstream_tasks),
            eval_interval=cfg.downstream_interval or cfg.eval_interval,
            limit=cfg.downstream_limit,
            batch_size=cfg.eval_batch_size or cfg.device_train_microbatch_size,
        )
    if (faults := fault_injection_callback(env.rank)) is not None:
        callbacks["fault_injection"] = faults
    return callbacks


def build_trainer(cfg: TrainConfig, env: RunEnv, save_folder: Path, train_module, train_loader,
                  callbacks: dict, duration: tuple[str, int]):
    """olmo-core's Trainer over our train module, loader and callbacks."""
    from olmo_core.train import Duration, TrainerConfig

    from olmo.remote_checkpoint import RemoteCheckpointer

    unit, amount = duration
    max_duration = {"steps": Duration.steps, "epochs": Duration.epochs, "tokens": Duration.tokens}[unit]
    trainer = TrainerConfig(
        save_folder=str(save_folder),
        work_dir=str(local_run_dir(save_folder) / DATA_WORK_DIR),
        load_path=cfg.load_path,
        load_trainer_state=False if cfg.reset_data_position else None,
        save_overwrite=cfg.save_overwrite,
        max_duration=max_duration(amount),
        hard_stop=Duration.steps(cfg.stop_at) if cfg.stop_at is not None else None,
        metrics_collect_interval=cfg.metrics_collect_interval,
        cancel_check_interval=1,
        # Synchronous bookkeeping: every rank sees a cancellation (SIGTERM on any rank) at the
        # same step, so all stop together and write the same final checkpoint.
        async_bookkeeping=False,
        callbacks=callbacks,
        device=str(env.device),
    ).build(train_module, train_loader)
    # Checkpoints to a URL: complete-only visibility and background uploads (a local save_folder
    # saves exactly as olmo-core's Checkpointer does).
    trainer.checkpointer = RemoteCheckpointer.replacing(trainer.checkpointer)
    return trainer


def train(cfg: TrainConfig, plan: DataPlan, config_path: str | None = None) -> None:
    """Run (or resume) training on ``plan``, what :func:`preflight` returned."""
    import torch.distributed as dist
    from olmo_core.utils import seed_all

    from olmo.train_module import MoETrainModule, resolve_precision, train_module_config

    env = init_distributed(cfg)
    save_folder = prepare_save_folder(cfg, env)
    # Built on the meta device and materialised shard by shard inside the train module, so no
    # rank ever holds the whole model; the weights still do not depend on the number of ranks.
    seed_all(cfg.seed)
    train_module = MoETrainModule(
        cfg.model.build(init_device="meta"), train_module_config(cfg), env.device
    )
    train_loader, eval_loaders = build_data_loaders(
        cfg, env, local_run_dir(save_folder) / DATA_WORK_DIR, plan
    )
    callbacks = build_callbacks(cfg, env, train_module, eval_loaders, config_path)
    trainer = build_trainer(cfg, env, save_folder, train_module, train_loader, callbacks, plan.duration)
    log.info(
        f"{cfg.run_name}: {cfg.model.num_params():,d} params ({cfg.model.num_active_params():,d} "
        f"active), {env.world_size} process(es) on {env.device}, "
        f"precision {resolve_precision(cfg.precision, env.device)}"
    )
    try:
        trainer.fit()
    except Exception as err:
        # An object-storage or data error raised in a reader or upload thread arrives wrapped
        # (olmo-core's OLMoThreadError): report it as its own one line.
        found = project_error_behind(err)
        if found is None or found is err:
            raise
        raise found from None
    _barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def parse_args(argv: list[str] | None = None):
    """(argparse namespace with ``config`` and ``dry_run``, the ``--key=value`` overrides)."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Train an OLMoE-style MoE. Overrides: --model.d_model=256 --save_folder=runs/x",
    )
    parser.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, parameter counts and the data mixture (data.sources: per pass and over the run), then exit")
    return parser.parse_known_args(argv)


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun job, or a process started without torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    from olmo.cli import run_cli

    args, overrides = parse_args(argv)

    def run() -> int:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            print(cfg.to_yaml(), end="")
            print(json.dumps({
                "total_params": cfg.model.num_params(),
                "active_params": cfg.model.num_active_params(),
                "flops_per_token": cfg.model.num_flops_per_token(cfg.model.max_sequence_length),
            }))
            if cfg.data.sources:
                plan = plan_data(
                    cfg.data, vocab_size=cfg.model.vocab_size,
                    sequence_length=cfg.model.max_sequence_length,
                    global_batch_size=cfg.global_train_batch_size, duration=cfg.duration,
                    check_run=False,
                )  # fmt: skip
                print(plan.table(), flush=True)
                # After the table, so that the repetition the error names is shown per source.
                plan.check_run()
            return 0
        plan = preflight(cfg)
        if (finished := finished_run_message(cfg)) is not None:
            if is_rank_zero():
                print(finished, flush=True)
            return 0
        # Data files changed in place or a diverged run surface only once training runs; they
        # are reported the same way.
        train(cfg, plan, config_path=args.config)
        return 0

    return run_cli(run)
