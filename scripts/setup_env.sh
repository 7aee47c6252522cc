#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the project into
# it. Idempotent: a second run only checks. torch is pinned in the same pip command so that the
# resolver never swaps the installed build for another one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-data,dev,hf}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.moe-polycom-installed"
want="$(cat setup.py | sha1sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

python -m pip install -q --upgrade pip
# If a torch is already importable in this venv (a CUDA build on a cluster), keep it.
if python -c "import torch" 2>/dev/null; then
  TORCH_SPEC="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
fi
python -m pip install -q "$TORCH_SPEC" -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "environment ready: $VENV ($(python -c 'import torch; print("torch", torch.__version__)'))"
