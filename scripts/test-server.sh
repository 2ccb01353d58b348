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
# shellcheck source=scripts/venv.sh
source "$ROOT/scripts/venv.sh"

die() { echo "test-server: error: $*" >&2; exit 1; }
say() { echo "test-server: $*"; }

[[ $# -ge 1 ]] || die "usage: scripts/test-server.sh URL [PYTEST ARGS...] | --venv-only"
URL="$1"
shift

ensure_venv "$VENV" "the openai client needs" "openai==$OPENAI_VERSION" "pytest==$PYTEST_VERSION"
[[ "$URL" == --venv-only ]] && exit 0

say "running the openai client's tests against $URL"
cd "$ROOT/server/tests"
CONVOY_SERVER_URL="$URL" PYTHONDONTWRITEBYTECODE=1 \
  "$VENV/bin/pytest" -p no:cacheprovider -v --durations=5 test_openai_client.py "$@"
