#!/usr/bin/env bash
# Runs the Python bindings' tests (bindings/python/tests, pytest) on the real model against
# one libconvoy:
#   scripts/test-python.sh [LIBRARY [PYTEST ARGS...]]
# LIBRARY defaults to target/debug/libconvoy.so. The first run creates a virtual environment
# with pinned pytest (and setuptools, the package's build backend) from PyPI in
# $CONVOY_CACHE_DIR/venv-python-tests; every run pip-installs the package from a copy of
# bindings/python (a regular, non-editable install: it proves the package installs) and
# runs pytest on bindings/python/tests with the installed package.
# The model comes from $CONVOY_MODEL or `scripts/setup.sh --model-path`.
set -euo pipefail

PYTEST_VERSION=8.3.5
SETUPTOOLS_VERSION=75.8.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CONVOY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy}"
VENV="$CACHE/venv-python-tests"
# shellcheck source=scripts/venv.sh
source "$ROOT/scripts/venv.sh"

die() { echo "test-python: error: $*" >&2; exit 1; }
say() { echo "test-python: $*"; }

LIB="${1:-$ROOT/target/debug/libconvoy.so}"
if [[ $# -gt 0 ]]; then shift; fi
[[ -f "$LIB" ]] || die "$LIB is missing: build it with \`cargo build --lib\` (make test does)"
LIB="$(cd "$(dirname "$LIB")" && pwd)/$(basename "$LIB")"

ensure_venv "$VENV" "the bindings need" "pytest==$PYTEST_VERSION" "setuptools==$SETUPTOOLS_VERSION"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
mkdir -p "$TMP/src"
cp -R "$ROOT/bindings/python/pyproject.toml" "$ROOT/bindings/python/README.md" \
  "$ROOT/bindings/python/convoy" "$TMP/src/"
rm -rf "$TMP/src/convoy/__pycache__"
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation --force-reinstall "$TMP/src" ||
  die "pip install of bindings/python failed"

say "running pytest against $LIB"
# The pytest script, not `python -m pytest` (which would put the source folder, and so the
# uninstalled package, first on sys.path); tests/test_loading.py checks which one loaded.
cd "$ROOT/bindings/python"
CONVOY_LIBRARY="$LIB" CONVOY_TEST_INSTALLED=1 PYTHONDONTWRITEBYTECODE=1 \
  "$VENV/bin/pytest" -p no:cacheprovider -v --durations=5 tests "$@"
