"""olmo/slurm.py and run_pretrain.sbatch with SLURM's variables set by hand (no SLURM here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_model.errors import LaunchError
from olmo.launcher import TRAIN_SCRIPT, torchrun_args
from olmo.slurm import expand_nodelist, launch_env

from .helpers import REPO


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu17", ["gpu17"]),
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
        ("gpu[1,3-4],login2", ["gpu1", "gpu3", "gpu4", "login2"]),
        ("rack[1-2]-n[7-8]", ["rack1-n7", "rack1-n8", "rack2-n7", "rack2-n8"]),
        ("a-node,b[001-002]", ["a-node", "b001", "b002"]),
    ],
)
def test_expand_nodelist_like_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


JOB = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "h100-[003-004,010]", "SLURM_JOB_NUM_NODES": "3"}


def test_launch_env_per_node():
    envs = [launch_env({**JOB, "SLURM_NODEID": str(n), "SLURM_GPUS_ON_NODE": "8"}) for n in range(3)]
    # 20000 + 123456 % 20000: every node of the job computes the same port.
    first = {"NNODES": "3", "MASTER_ADDR": "h100-003", "MASTER_PORT": "23456", "NPROC_PER_NODE": "8"}
    assert envs == [{**first, "NODE_RANK": str(n)} for n in range(3)]
    # --gpus-per-node=h100:4 without SLURM_GPUS_ON_NODE; an exported MASTER_PORT is kept.
    env = launch_env({**JOB, "SLURM_NODEID": "2", "SLURM_GPUS_PER_NODE": "h100:4", "MASTER_PORT": "29400"})
    assert (env["NPROC_PER_NODE"], env["MASTER_PORT"], env["NODE_RANK"]) == ("4", "29400", "2")
    assert "NPROC_PER_NODE" not in launch_env({**JOB, "SLURM_NODEID": "0"})


def test_launch_env_errors_are_one_line():
    with pytest.raises(LaunchError) as err:
        launch_env({"SLURM_JOB_ID": "1"})
    assert str(err.value) == (
        "SLURM_JOB_NODELIST, SLURM_NODEID not set; expected to run inside a SLURM allocation, one "
        "task per node (srun --ntasks-per-node=1)"
    )
    with pytest.raises(LaunchError, match="names 3 hosts but SLURM_JOB_NUM_NODES is 2"):
        launch_env({**JOB, "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0"})


def test_sbatch_script_reaches_torchrun_with_the_derived_settings(tmp_path):
    """run_pretrain.sbatch -> srun (a stub that runs node 1's task) -> olmo.slurm ->
    run_pretrain.sh -> olmo.launcher (a stub PYTHON that prints the settings it is given) ->
    torchrun's arguments (olmo.launcher.torchrun_args of those settings)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    # The stub drops srun's own options and runs the command as SLURM would on node 1.
    srun.write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    python = bin_dir / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2" = "-m olmo.launcher" ]; then shift 2; echo "NNODES=$NNODES NODE_RANK=$NODE_RANK'
        ' MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NPROC_PER_NODE=$NPROC_PER_NODE $*"; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    for stub in (srun, python):
        stub.chmod(0o755)
    env = {
        **os.environ, **JOB, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python),
        "PYTHONPATH": str(REPO), "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_ON_NODE": "2",
    }  # fmt: skip
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", str(REPO / "run_pretrain.sbatch"), "configs/x.yaml", "--save_folder=s3://b/r"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    *settings, config, save = proc.stdout.split()
    assert (config, save) == ("configs/x.yaml", "--save_folder=s3://b/r")
    derived = dict(item.split("=", 1) for item in settings)
    assert derived == {"NNODES": "3", "NODE_RANK": "1", "MASTER_ADDR": "h100-003",
                       "MASTER_PORT": "23456", "NPROC_PER_NODE": "2"}
    assert torchrun_args([config, save], derived, int(derived["NPROC_PER_NODE"])) == [
        "--nnodes=3", "--node_rank=1", "--master_addr=h100-003", "--master_port=23456",
        "--nproc_per_node=2", TRAIN_SCRIPT, "configs/x.yaml", "--save_folder=s3://b/r"]
    # Outside an allocation the derivation fails and run_pretrain.sh is never reached.
    bad = {k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"}
    proc = subprocess.run(["bash", str(REPO / "run_pretrain.sbatch"), "configs/x.yaml"], env=bad,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "torchrun" not in proc.stdout
    assert proc.stderr.strip() == (
        "error: SLURM_JOB_NODELIST not set; expected to run inside a SLURM allocation, one task "
        "per node (srun --ntasks-per-node=1)"
    )
    assert Path(REPO / "run_pretrain.sbatch").read_text().startswith("#!/usr/bin/env bash")
