#!/usr/bin/env bash
# The model-family fixtures of tests/families.rs (issue 12): small random-weight models of
# each family convoy runs, made by mlx-lm's own model classes, and mlx-lm's greedy logits on
# them (scripts/family_oracle.py):
#   scripts/family-fixtures.sh --tokenizer DIR --eos ID[,ID...] --vocab N
# prints the fixture folder on its last line. mlx-lm 0.32.2 comes from PyPI, pinned
# (scripts/bench-compare-requirements.txt), in the venv make bench-compare uses
# ($CONVOY_CACHE_DIR/venv-mlx-lm). The fixtures are made once per version of the generator,
# requirements and tokenizer, in $CONVOY_CACHE_DIR/families/<hash>; no weights are committed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CONVOY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy}"
VENV="$CACHE/venv-mlx-lm"
# shellcheck source=scripts/venv.sh
source "$ROOT/scripts/venv.sh"

die() { echo "family-fixtures: error: $*" >&2; exit 1; }
say() { echo "family-fixtures: $*" >&2; }

TOKENIZER="" EOS="" VOCAB=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tokenizer) TOKENIZER="$2"; shift 2 ;;
    --eos) EOS="$2"; shift 2 ;;
    --vocab) VOCAB="$2"; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
[[ -f "$TOKENIZER/tokenizer.json" && -n "$EOS" && -n "$VOCAB" ]] ||
  die "usage: scripts/family-fixtures.sh --tokenizer DIR --eos ID[,ID...] --vocab N"

ensure_venv "$VENV" "mlx-lm needs" -r "$ROOT/scripts/bench-compare-requirements.txt"
SHA256=(sha256sum)
command -v sha256sum >/dev/null || SHA256=(shasum -a 256)   # macOS
HASH="$(cat "$ROOT/scripts/family_oracle.py" "$ROOT/scripts/bench-compare-requirements.txt" \
  "$TOKENIZER/tokenizer.json" "$TOKENIZER/tokenizer_config.json" <(echo "$EOS $VOCAB") |
  "${SHA256[@]}" | cut -c1-16)"
OUT="$CACHE/families/$HASH"
if [[ ! -f "$OUT/families.json" ]]; then
  say "making the fixtures in $OUT"
  mkdir -p "$CACHE/families"
  # Written beside the target and renamed last: the folder is complete or absent. Fixtures
  # of other generators untouched for a day are removed (they are cheap to make again; a
  # checkout of another version may be using a newer one).
  find "$CACHE/families" -mindepth 1 -maxdepth 1 -not -name "$HASH" -mmin +1440 -exec rm -rf {} +
  TMP="$OUT.partial.$$"
  rm -rf "$TMP"
  "$VENV/bin/python" "$ROOT/scripts/family_oracle.py" --tokenizer "$TOKENIZER" \
    --eos ${EOS//,/ } --vocab "$VOCAB" --out "$TMP" >&2
  rm -rf "$OUT"
  mv "$TMP" "$OUT"
fi
echo "$OUT"
