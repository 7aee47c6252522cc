"""Build and run a training job from a :class:`TrainConfig` (the body of ``scripts/train.py``).

Order matters: everything that can fail on user input (config, data files, save folder) is
checked before the process group, the model or any file in the save folder is created.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from moe_model.errors import LaunchError
from olmo.config import TrainConfig, load_config, parse_duration
from olmo.data import build_eval_loaders, build_train_loader, validate_data
from olmo.flops import device_peak_flops

log = logging.getLogger("olmo.train")

CONFIG_FNAME = "config.yaml"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def find_checkpoints(save_folder: Path) -> list[Path]:
    """Complete checkpoints in ``save_folder``, oldest first.

    olmo-core writes ``stepN-tmp/``, renames it to ``stepN/`` and writes ``.metadata.json``
    last; a directory missing any of its files (a crash mid-save) is not a checkpoint.
    """
    from olmo_core.train.checkpoint import Checkpointer

    if not save_folder.is_dir():
        return []
    found = [Path(p) for _, p in Checkpointer.find_checkpoints(str(save_folder))]
    return sorted(found, key=lambda p: int(p.name[4:]))


RUN_IDENTITY_KEYS = ("model", "global_train_batch_size", "data.paths", "data.dtype")


def differing_key(saved: TrainConfig, cfg: TrainConfig) -> str | None:
    """The first setting that makes ``cfg`` a different run from ``saved``, or None."""
    for key in RUN_IDENTITY_KEYS:
        old, new = saved.to_dict(), cfg.to_dict()
        for part in key.split("."):
            old, new = old[part], new[part]
        if old != new:
            return key
    return None


def other_run_reason(cfg: TrainConfig) -> str | None:
    """Why save_folder's checkpoints belong to another run, or None (none there, or this run).

    A folder whose saved config has the same model, data and batch settings is the same run and
    is resumed; anything else would silently mix two runs' checkpoints.
    """
    save_folder = Path(cfg.save_folder)
    if not find_checkpoints(save_folder):
        return None
    saved_path = save_folder / CONFIG_FNAME
    if not saved_path.is_file():
        return f"holds checkpoints but no {CONFIG_FNAME}"
    key = differing_key(load_config(saved_path), cfg)
    if key is not None:
        return f"holds checkpoints of another run ({key} differs from its {CONFIG_FNAME})"
    return None


def check_save_folder(cfg: TrainConfig) -> None:
    """Refuse to write into a folder holding another run's checkpoints (unless save_overwrite)."""
    reason = None if cfg.save_overwrite else other_run_reason(cfg)
    if reason is not None:
        raise LaunchError(
            f"save_folder {cfg.save_folder!r} {reason}; use a new save_folder or "
            "--save_overwrite=true"
        )


def clear_other_run(cfg: TrainConfig) -> None:
    """With save_overwrite: remove another run's checkpoints and logs from save_folder (rank 0).

    olmo-core would otherwise resume from them. A folder holding this same run is left alone
    and resumes.
    """
    save_folder = Path(cfg.save_folder)
    if not cfg.save_overwrite or not save_folder.is_dir():
        return
    checkpoints = find_checkpoints(save_folder)
    if checkpoints and other_run_reason(cfg) is None:
        return
    doomed = [p for p in save_folder.iterdir() if p.name.startswith("step") and p.is_dir()]
    doomed += [save_folder / n for n in ("metrics.jsonl", "wandb_run_id", "data_work")]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if checkpoints:
        log.warning(f"save_overwrite: removed {len(checkpoints)} checkpoint(s) of another run from {save_folder}")


def check_load_path(cfg: TrainConfig) -> None:
    if cfg.load_path is None:
        return
    from olmo_core.train.checkpoint import Checkpointer

    path = Path(cfg.load_path)
    if not path.is_dir() or not Checkpointer.dir_is_checkpoint(str(path)):
        raise LaunchError(
            f"load_path {cfg.load_path!r} is not a complete checkpoint (expected a stepN "
            "directory with model_and_optim/, train/ and .metadata.json)"
        )


def preflight(cfg: TrainConfig) -> None:
    """All cheap checks on user input; raise ConfigError/DataError/LaunchError."""
    cfg.validate_batch_sizes(world_size_from_env())
    validate_data(
        cfg.data,
        vocab_size=cfg.model.vocab_size,
        sequence_length=cfg.model.max_sequence_length,
        global_batch_size=cfg.global_train_batch_size,
    )
    check_load_path(cfg)
    check_save_folder(cfg)


def _backend() -> str:
    # NCCL for GPU tensors plus gloo for the trainer's CPU bookkeeping collectives.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def train(cfg: TrainConfig) -> None:
    """Run (or resume) training. Assumes :func:`preflight` passed."""
    import torch.distributed as dist
    from olmo_core.distributed.utils import get_rank
    from olmo_core.train import Duration, TrainerConfig, prepare_training_environment
    from olmo_core.train.callbacks import (
        ConsoleLoggerCallback,
        GarbageCollectorCallback,
        SpeedMonitorCallback,
    )
    from olmo_core.utils import seed_all

    from olmo.callbacks import (
        FinalCheckpointerCallback,
        MetricsCallback,
        SpikeDetectorCallback,
        ValidationCallback,
        WandbCallback,
    )
    from olmo.train_module import MoETrainModule, resolve_precision

    distributed = "WORLD_SIZE" in os.environ
    if "OMP_NUM_THREADS" not in os.environ:
        # olmo-core would set 8; oversubscribing a small CPU slows every op.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // local)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    prepare_training_environment(
        seed=cfg.seed, backend=_backend() if distributed else None
    )
    rank = get_rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")

    save_folder = Path(cfg.save_folder)
    if rank == 0:
        clear_other_run(cfg)
        save_folder.mkdir(parents=True, exist_ok=True)
        (save_folder / CONFIG_FNAME).write_text(cfg.to_yaml())
    if dist.is_initialized():
        dist.barrier()

    # Built on the meta device and materialised shard by shard inside the train module, so no
    # rank ever holds the whole model; the weights still do not depend on the number of ranks.
    seed_all(cfg.seed)
    model = cfg.model.build(init_device="meta")
    train_module = MoETrainModule(model, cfg, device)

    seq_len = cfg.model.max_sequence_length
    work_dir = save_folder / "data_work"
    train_loader = build_train_loader(
        cfg.data,
        sequence_length=seq_len,
        vocab_size=cfg.model.vocab_size,
        global_batch_size=cfg.global_train_batch_size,
        seed=cfg.seed,
        work_dir=str(work_dir),
        dp_rank=rank,
        dp_world_size=world,
    )
    eval_loaders = build_eval_loaders(
        cfg.data,
        sequence_length=seq_len,
        vocab_size=cfg.model.vocab_size,
        # build_eval_loaders counts sequences over all ranks; the config counts per rank.
        batch_size=(cfg.eval_batch_size or cfg.device_train_microbatch_size) * world,
        work_dir=str(work_dir),
        dp_rank=rank,
        dp_world_size=world,
    )

    unit, amount = parse_duration(cfg.max_duration)
    max_duration = {"steps": Duration.steps, "epochs": Duration.epochs, "tokens": Duration.tokens}[unit](amount)
    callbacks = {
        "checkpointer": FinalCheckpointerCallback(
            save_interval=cfg.save_interval,
            max_checkpoints=None if cfg.save_num_checkpoints_to_keep < 0 else cfg.save_num_checkpoints_to_keep,
            save_async=False,
        ),
        "console_logger": ConsoleLoggerCallback(metrics_log_interval=cfg.console_log_interval),
        "speed_monitor": SpeedMonitorCallback(
            num_flops_per_token=cfg.model.num_flops_per_token(seq_len),
            device_peak_flops_per_second=device_peak_flops(device, train_module.param_dtype, cfg.device_peak_flops),
        ),
        "garbage_collector": GarbageCollectorCallback(),
        "spike_detector": SpikeDetectorCallback(),
        "metrics": MetricsCallback(tokens_per_step=cfg.global_train_batch_size * seq_len),
        "wandb": WandbCallback(settings=cfg.wandb, run_name=cfg.run_name, config=cfg.to_dict()),
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
    trainer = TrainerConfig(
        save_folder=str(save_folder),
        work_dir=str(work_dir),
        load_path=cfg.load_path,
        load_trainer_state=False if cfg.reset_data_position else None,
        save_overwrite=cfg.save_overwrite,
        max_duration=max_duration,
        hard_stop=Duration.steps(cfg.stop_at) if cfg.stop_at is not None else None,
        metrics_collect_interval=cfg.metrics_collect_interval,
        cancel_check_interval=1,
        # Synchronous bookkeeping: every rank sees a cancellation (SIGTERM on any rank) at the
        # same step, so all stop together and write the same final checkpoint.
        async_bookkeeping=False,
        callbacks=callbacks,
        device=str(device),
    ).build(train_module, train_loader)
    log.info(
        f"{cfg.run_name}: {cfg.model.num_params():,d} params ({cfg.model.num_active_params():,d} active), "
        f"{world} process(es) on {device}, precision {resolve_precision(cfg.precision, device)}"
    )
    trainer.fit()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from olmo.cli import run_cli

    parser = argparse.ArgumentParser(
        description="Train an OLMoE-style MoE. Overrides: --model.d_model=256 --save_folder=runs/x",
    )
    parser.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter counts, then exit")
    args, overrides = parser.parse_known_args(argv)

    def run() -> int:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            print(cfg.to_yaml(), end="")
            print(json.dumps({
                "total_params": cfg.model.num_params(),
                "active_params": cfg.model.num_active_params(),
                "flops_per_token": cfg.model.num_flops_per_token(cfg.model.max_sequence_length),
            }))
            return 0
        preflight(cfg)
        # Data files changed in place or a diverged run surface only once training runs; they
        # are reported the same way.
        train(cfg)
        return 0

    return run_cli(run)
