#!/usr/bin/env bash
# Runs the official `openai` Python client's tests (server/tests/test_openai_client.py,
# pytest) against a running convoy-server:
#   scripts/test-server.sh URL [PYTEST ARGS...]
#   scripts/test-server.sh --venv-only    (only create the virtual environment)
# URL is the server's base, e.g. http://127.0.0.1:8080 (server/tests/http.rs starts one on
# the bundled model and calls this). The first run creates a virtual environment with
# pinned openai and pytest from PyPI in $CONVOY_CACHE_DIR/venv-openai.
set -euo pipefail

OPENAI_VERSION=3.57.0
PYTEST_VERSION=8.3.5
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CONVOY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy}"
VENV="$CACHE/venv-openai"
PY="${CONVOY_PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

die() { echo "test-server: error: $*" >&2; exit 1; }
say() { echo "test-server: $*"; }

[[ $# -ge 1 ]] || die "usage: scripts/test-server.sh URL [PYTEST ARGS...] | --venv-only"
URL="$1"
shift

command -v "$PY" >/dev/null || die "$PY not found: install Python >= 3.9 (scripts/setup.sh does)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
  die "$("$PY" --version 2>&1) is too old: the openai client needs Python >= 3.9 (set CONVOY_PYTHON)"
"$PY" -c 'import ensurepip, venv' 2>/dev/null ||
  die "$PY cannot create virtual environments: install python3-venv (sudo apt-get install -y python3-venv)"

mkdir -p "$CACHE"
# One run at a time per cache: runs share the virtual environment they install into.
if command -v flock >/dev/null; then
  exec 9>"$CACHE/venv-openai.lock"
  flock 9
fi

STAMP="openai==$OPENAI_VERSION pytest==$PYTEST_VERSION $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.convoy-stamp" 2>/dev/null)" != "$STAMP" ]]; then
  say "creating $VENV (openai==$OPENAI_VERSION, pytest==$PYTEST_VERSION from PyPI)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "openai==$OPENAI_VERSION" "pytest==$PYTEST_VERSION"
  echo "$STAMP" >"$VENV/.convoy-stamp"
fi

[[ "$URL" == --venv-only ]] && exit 0

say "running the openai client's tests against $URL"
cd "$ROOT/server/tests"
CONVOY_SERVER_URL="$URL" PYTHONDONTWRITEBYTECODE=1 \
  "$VENV/bin/pytest" -p no:cacheprovider -v --durations=5 test_openai_client.py "$@"
