#!/usr/bin/env bash
# Creates (or reuses) the tokenization environment .venv-dolma: the `dolma tokens` CLI with its
# own pins (scripts/requirements-dolma.txt: numpy<2, tokenizers<=0.19.1), apart from the
# training environment so that training runs numpy 2 and current transformers. No torch.
# Idempotent: a second run only checks the stamp. Prints nothing when already set up.
#
#   DOLMA_VENV   where to make it (default: .venv-dolma in the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${DOLMA_VENV:-.venv-dolma}
REQ=scripts/requirements-dolma.txt
stamp="$VENV/.dolma-env-installed"
want="$(sha1sum "$REQ" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/dolma" ]; then
  exit 0
fi
PY=${PYTHON3:-python3}
"$PY" -c 'import sys; assert (3, 10) <= sys.version_info[:2] < (3, 13), sys.version' 2>/dev/null || {
  echo "error: dolma 1.2.1 needs Python 3.10-3.12; set PYTHON3 to one" >&2
  exit 1
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REQ"
if "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
  echo "error: $VENV got torch from $REQ; the dolma environment must not install it" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "dolma environment ready: $VENV ($("$VENV/bin/dolma" --version 2>/dev/null || echo dolma))"
