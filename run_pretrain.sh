#!/usr/bin/env bash
# Launch training with torchrun: one process per GPU (or one CPU process; NPROC_PER_NODE sets the
# count), several nodes when NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT are set.
#
#   bash run_pretrain.sh [CONFIG] [--key=value ...]
#
# With no arguments: sets up the environment if needed, prepares the sample data if missing and
# trains configs/tiny.yaml on it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

CONFIG=configs/tiny.yaml
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
  CONFIG=$1
  shift
fi

# Use the active Python if it already has the project; else the project's .venv (made on demand).
if [ -n "${PYTHON:-}" ]; then
  :
elif [ ! -d .venv ] && python3 -c "import moe_model, olmo_core" 2>/dev/null; then
  PYTHON=python3
else
  bash scripts/setup_env.sh
  PYTHON=.venv/bin/python
fi

if [ "$CONFIG" = configs/tiny.yaml ]; then
  if ! compgen -G "data/sample/tokens/train/*.npy" > /dev/null; then
    # The config and its overrides first: a typo is one line now, not after the sample data.
    "$PYTHON" -m olmo.launcher --check-config "$CONFIG" "$@" || exit $?
  fi
  # Idempotent: a second run only checks that the token files are there. dolma runs from its
  # own environment (.venv-dolma, made on first use); PYTHON finds the tokenizer file.
  PYTHON="$PYTHON" bash scripts/prepare_sample_data.sh
fi

# One process per GPU this job may use (CUDA_VISIBLE_DEVICES narrows nvidia-smi's list; none:
# one CPU process; NPROC_PER_NODE overrides), a free rendezvous port on one node (MASTER_PORT
# overrides; several nodes keep 29500 by default), and the run checked once before torchrun
# starts any worker: see olmo/launcher.py.
exec "$PYTHON" -m olmo.launcher "$CONFIG" "$@"
