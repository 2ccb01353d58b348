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
PY="${CONVOY_PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

die() { echo "test-python: error: $*" >&2; exit 1; }
say() { echo "test-python: $*"; }

LIB="${1:-$ROOT/target/debug/libconvoy.so}"
if [[ $# -gt 0 ]]; then shift; fi
[[ -f "$LIB" ]] || die "$LIB is missing: build it with \`cargo build --lib\` (make test does)"
LIB="$(cd "$(dirname "$LIB")" && pwd)/$(basename "$LIB")"

command -v "$PY" >/dev/null || die "$PY not found: install Python >= 3.9 (scripts/setup.sh does)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
  die "$("$PY" --version 2>&1) is too old: the bindings need Python >= 3.9 (set CONVOY_PYTHON)"
# Debian/Ubuntu ship venv's pip bootstrap (ensurepip) separately, in python3-venv.
"$PY" -c 'import ensurepip, venv' 2>/dev/null ||
  die "$PY cannot create virtual environments: install python3-venv (sudo apt-get install -y python3-venv)"

mkdir -p "$CACHE"
# One run at a time per cache: runs share the virtual environment they install into.
if command -v flock >/dev/null; then
  exec 9>"$CACHE/venv-python-tests.lock"
  flock 9
fi

STAMP="pytest==$PYTEST_VERSION setuptools==$SETUPTOOLS_VERSION $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.convoy-stamp" 2>/dev/null)" != "$STAMP" ]]; then
  say "creating $VENV (pytest==$PYTEST_VERSION from PyPI)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "pytest==$PYTEST_VERSION" "setuptools==$SETUPTOOLS_VERSION"
  echo "$STAMP" >"$VENV/.convoy-stamp"
fi

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
