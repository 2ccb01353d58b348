#!/usr/bin/env bash
# Runs scripts/hf_tokenize.py (Hugging Face tokenizers, pinned) in the mlx-lm venv of
# scripts/bench-compare-requirements.txt ($CONVOY_CACHE_DIR/venv-mlx-lm), creating it if needed:
#   scripts/hf-tokenize.sh TOKENIZER_JSON TEXTS_JSON
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CONVOY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy}"
VENV="$CACHE/venv-mlx-lm"
# shellcheck source=scripts/venv.sh
source "$ROOT/scripts/venv.sh"
die() { echo "hf-tokenize: error: $*" >&2; exit 1; }
say() { echo "hf-tokenize: $*" >&2; }
[[ $# -eq 2 ]] || die "usage: scripts/hf-tokenize.sh TOKENIZER_JSON TEXTS_JSON"
ensure_venv "$VENV" "Hugging Face tokenizers needs" -r "$ROOT/scripts/bench-compare-requirements.txt"
exec "$VENV/bin/python" "$ROOT/scripts/hf_tokenize.py" "$1" "$2"
