"""torchrun's rendezvous settings from SLURM's variables (used by ``run_pretrain.sbatch``).

Run once per node (``srun --ntasks-per-node=1``), ``python -m olmo.slurm`` prints
``export NNODES=... NODE_RANK=... MASTER_ADDR=... MASTER_PORT=... NPROC_PER_NODE=...`` for the
shell to ``eval`` before ``run_pretrain.sh``. Pure functions of the environment, so they are
tested with SLURM's variables set by hand, without sbatch or srun.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping

from moe_model.errors import LaunchError

__all__ = ["expand_nodelist", "launch_env", "main"]

_PORT_BASE, _PORT_SPAN = 20000, 20000


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ('gpu[01-03,07],login1') as hostnames, in order (what
    ``scontrol show hostnames`` prints)."""
    hosts: list[str] = []
    for part in _split_top(nodelist.strip()):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if match is None:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            width = len(lo)  # zero padding is kept: node[08-10] -> node08 node09 node10
            for n in range(int(lo), int(hi or lo) + 1):
                # The rest may hold another bracket group (rack[1-2]-n[1-2]).
                hosts += [f"{prefix}{n:0{width}d}{rest}" for rest in (expand_nodelist(suffix) if "[" in suffix else [suffix])]
    return hosts


def _gpus(env: Mapping[str, str]) -> int | None:
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(name, "")
        if value:
            # --gpus-per-node may be 'h100:8' or '8'.
            return int(value.rsplit(":", 1)[-1])
    return None


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (and NPROC_PER_NODE when SLURM knows the GPUs)
    for this node of a SLURM job; a MASTER_PORT already set is kept."""
    missing = [n for n in ("SLURM_JOB_NODELIST", "SLURM_NODEID", "SLURM_JOB_ID") if not env.get(n)]
    if missing:
        raise LaunchError(
            f"{', '.join(missing)} not set; expected to run inside a SLURM allocation, one task per "
            f"node (srun --ntasks-per-node=1)"
        )
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    if nnodes != len(hosts):
        raise LaunchError(f"SLURM_JOB_NODELIST names {len(hosts)} hosts but SLURM_JOB_NUM_NODES is {nnodes}")
    node_rank = int(env["SLURM_NODEID"])
    out = {
        "NNODES": str(nnodes),
        "NODE_RANK": str(node_rank),
        "MASTER_ADDR": hosts[0],
        # From the job id: two jobs sharing a first node do not collide on one port.
        "MASTER_PORT": env.get("MASTER_PORT") or str(_PORT_BASE + int(env["SLURM_JOB_ID"]) % _PORT_SPAN),
    }
    if (gpus := _gpus(env)) is not None:
        out["NPROC_PER_NODE"] = str(gpus)
    return out


def main(argv: list[str] | None = None) -> int:
    import os

    from olmo.cli import run_cli

    del argv

    def run() -> int:
        env = launch_env(os.environ)
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
