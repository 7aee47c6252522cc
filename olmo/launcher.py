"""What ``run_pretrain.sh`` runs: check the run once, then start torchrun.

    python -m olmo.launcher [CONFIG] [--key=value ...]

1. The number of processes per node: ``NPROC_PER_NODE`` when set; else one per GPU this job may
   use (``nvidia-smi -L``, narrowed by ``CUDA_VISIBLE_DEVICES`` when set, as CUDA narrows it);
   else one CPU process.
2. The same checks as every worker's (config, data, save folder; :func:`olmo.launch.preflight`)
   for that many processes, before torchrun starts any: bad input is one ``error:`` line and
   exit 2 instead of a line per worker followed by torchrun's ChildFailedError traceback. A run
   already finished in its save folder says so in one line and exits 0, starting nothing.
3. torchrun, in this process (torch is imported already, so the check adds no second
   interpreter start and torch import). On one node without ``MASTER_PORT``, ``--standalone``:
   torchrun's c10d rendezvous binds a free port itself, so two runs on one machine do not
   collide on a fixed port (29500 did: EADDRINUSE). ``MASTER_PORT`` when set, and every multi-node run
   (``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, default 29500), keep the
   static rendezvous.

``--dry-run`` runs ``scripts/train.py`` directly: it prints and starts no training.
``--check-config`` (first argument) checks only the config, its overrides and the batch sizes
for the process count -- what needs no data -- and exits: ``run_pretrain.sh`` runs it before it
spends minutes making the sample data, so a typo is still one line at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

TRAIN_SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "train.py")
DEFAULT_MASTER_PORT = "29500"
"""The multi-node rendezvous port when MASTER_PORT is unset (torchrun's own default)."""


def gpus_on_machine() -> int:
    """GPUs ``nvidia-smi -L`` lists (all of the machine's, whatever CUDA_VISIBLE_DEVICES says)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def visible_gpus(env: Mapping[str, str], machine_gpus: int) -> int:
    """GPUs a process may use: the machine's, narrowed by CUDA_VISIBLE_DEVICES when set.

    CUDA reads the comma-separated list up to the first invalid entry (``-1``, or an empty
    one), so ``CUDA_VISIBLE_DEVICES=`` hides every GPU.
    """
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return machine_gpus
    count = 0
    for entry in listed.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        count += 1
    return min(count, machine_gpus)


def processes_per_node(env: Mapping[str, str], machine_gpus: int) -> int:
    """NPROC_PER_NODE when set, else one per visible GPU, else one (CPU)."""
    if env.get("NPROC_PER_NODE"):
        return int(env["NPROC_PER_NODE"])
    return max(1, visible_gpus(env, machine_gpus))


def rendezvous_args(env: Mapping[str, str]) -> list[str]:
    """torchrun's node and rendezvous options: a free port on one node unless MASTER_PORT is
    set; the static master address and port of every node otherwise."""
    nnodes = env.get("NNODES", "1")
    if nnodes == "1" and not env.get("MASTER_PORT"):
        return ["--standalone", "--nnodes=1"]
    return [
        f"--nnodes={nnodes}",
        f"--node_rank={env.get('NODE_RANK', '0')}",
        f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={env.get('MASTER_PORT') or DEFAULT_MASTER_PORT}",
    ]


def torchrun_args(argv: list[str], env: Mapping[str, str], nproc: int) -> list[str]:
    """torchrun's arguments that start ``scripts/train.py ARGV`` on ``nproc`` processes here."""
    return [*rendezvous_args(env), f"--nproc_per_node={nproc}", TRAIN_SCRIPT, *argv]


def gpu_name() -> str:
    """The first GPU's name as ``nvidia-smi`` reports it (``NVIDIA H100 80GB HBM3``), or ""."""
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.splitlines()[0].strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def check_memory_plan(cfg, world_size: int, device_name: str) -> list[str]:
    """Plan one step of ``cfg`` on ``world_size`` GPUs named ``device_name`` (olmo/plan.py) and
    raise LaunchError, naming the biggest term and the setting that shrinks it, when it does not
    fit. Returns the overrides (``--key=value``) for the settings the plan decided (``auto``).
    A GPU the plan's table lacks is not checked (one line on stderr says so)."""
    from moe_model.errors import LaunchError
    from olmo.gpus import gpu_from_device_name
    from olmo.plan import plan_run

    gpu = gpu_from_device_name(device_name)
    if gpu is None:
        print(
            f"memory plan skipped: no entry for GPU {device_name!r} in olmo/gpus.py",
            file=sys.stderr,
        )
        return []
    plan = plan_run(cfg, world_size, gpu)
    if not plan.fits:
        raise LaunchError(f"memory plan: {plan.verdict()}; --plan_preflight=false starts it anyway")
    return [f"--{key}={str(value).lower()}" for key, value in plan.decided.items()]


def main(argv: list[str] | None = None) -> int:
    from moe_model.errors import LaunchError
    from olmo.cli import run_cli
    from olmo.config import load_config
    from olmo.launch import finished_run_message, parse_args, preflight, training_device_type

    argv = sys.argv[1:] if argv is None else argv
    config_only = bool(argv) and argv[0] == "--check-config"
    argv = argv[1:] if config_only else argv
    args, overrides = parse_args(argv)
    if args.dry_run:
        os.execv(sys.executable, [sys.executable, TRAIN_SCRIPT, *argv])

    torchrun_argv: list[str] = []
    decided: list[str] = []

    def check() -> int:
        """Fill torchrun_argv, or say that the run is already finished (stdout)."""
        env = os.environ
        try:
            nproc = processes_per_node(env, gpus_on_machine())
            nnodes = int(env.get("NNODES", "1"))
        except ValueError:
            raise LaunchError(
                f"NPROC_PER_NODE={env.get('NPROC_PER_NODE')!r} and NNODES={env.get('NNODES')!r} "
                "must be whole numbers"
            ) from None
        cfg = load_config(args.config, overrides)
        if config_only:
            cfg.validate_batch_sizes(nproc * nnodes)
            cfg.validate_parallel(nproc * nnodes)
            return 0
        preflight(cfg, world_size=nproc * nnodes)
        if cfg.plan_preflight and training_device_type() == "cuda":
            # Before torchrun starts any process; CPU runs skip it (no planning cost).
            decided.extend(check_memory_plan(cfg, nproc * nnodes, gpu_name()))
        if (finished := finished_run_message(cfg)) is not None:
            print(finished, flush=True)
        else:
            # The plan's choices for "auto" settings, after the user's (the last one wins).
            torchrun_argv.extend(torchrun_args([*argv, *decided], env, nproc))
        return 0

    status = run_cli(check)
    if status or not torchrun_argv:
        return status
    # torchrun in this process: torch is imported already, so the check costs only the
    # project's own imports and checks, not a second interpreter and torch import.
    from torch.distributed.run import main as torchrun

    torchrun(torchrun_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
