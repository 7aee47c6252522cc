#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the test suite: lint, then pytest. By default the
# tests marked `slow` (pyproject.toml) are left out; `--all` as the first argument runs them too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
selection=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then
  selection=()
  shift
fi
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest -q "${selection[@]}" "$@"
