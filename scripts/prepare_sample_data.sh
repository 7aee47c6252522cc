#!/usr/bin/env bash
# Tokenize the bundled sample corpus (data/sample/documents, Shakespeare's works, public domain)
# into data/sample/tokens/{train,val}/ with the real `dolma tokens` CLI, offline.
#
#   scripts/prepare_sample_data.sh                      # the sample corpus
#   DOCS='my_docs/*.jsonl.gz' OUT=data/my_tokens scripts/prepare_sample_data.sh   # your own
#
# With DOCS set, only that one set is tokenized (into OUT, default data/tokens). A second run
# reuses the output (see scripts/tokenize.sh, which does the work; TOKENIZER, PROCESSES, DTYPE
# and FORCE=1 pass through to it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${DOCS:-}" ]]; then
    exec bash scripts/tokenize.sh "$DOCS" "${OUT:-data/tokens}"
fi

OUT="${OUT:-data/sample/tokens}"
bash scripts/tokenize.sh 'data/sample/documents/train/*.jsonl.gz' "$OUT/train"
bash scripts/tokenize.sh 'data/sample/documents/val/*.jsonl.gz' "$OUT/val"
echo "Sample data ready. In a config:"
echo "  data.paths=['$OUT/train/*.npy']  data.validation={sample_val: ['$OUT/val/*.npy']}"
