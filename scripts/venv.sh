# Sourced by the scripts that need a pinned Python environment from PyPI
# (scripts/test-python.sh, scripts/test-server.sh, scripts/family-fixtures.sh,
# scripts/bench-compare.sh). Defines:
#   ensure_venv VENV WHY PACKAGE==VERSION...
#   ensure_venv VENV WHY -r REQUIREMENTS_FILE
# which checks that $PY (python3, or $CONVOY_PYTHON) is >= 3.9 and can create virtual
# environments, takes a lock on VENV for the rest of the calling script (runs sharing one
# environment go one at a time), and (re)creates VENV with exactly these packages when it is
# missing or was made for other pins or another Python. WHY completes "... need(s) Python
# >= 3.9". The caller defines die and say.
PY="${CONVOY_PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

ensure_venv() {
  local venv="$1" why="$2"
  shift 2
  command -v "$PY" >/dev/null || die "$PY not found: install Python >= 3.9 (scripts/setup.sh does)"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    die "$("$PY" --version 2>&1) is too old: $why Python >= 3.9 (set CONVOY_PYTHON)"
  # Debian/Ubuntu ship venv's pip bootstrap (ensurepip) separately, in python3-venv.
  "$PY" -c 'import ensurepip, venv' 2>/dev/null ||
    die "$PY cannot create virtual environments: install python3-venv (sudo apt-get install -y python3-venv)"
  mkdir -p "$(dirname "$venv")"
  if command -v flock >/dev/null; then
    exec 9>"$venv.lock"
    flock 9
  fi
  local stamp pins="$*"
  # A requirements file is known by its contents, not its path. mlx-cpu is MLX's Linux
  # CPU backend; on macOS the mlx wheel brings Metal, and mlx-cpu has no macOS wheel.
  if [[ "$1" == -r ]]; then
    if [[ "$(uname -s)" == Darwin ]]; then
      local filtered
      filtered="$(mktemp)"
      grep -v '^mlx-cpu==' "$2" >"$filtered"
      set -- -r "$filtered"
    fi
    pins="$(sha256sum "$2" 2>/dev/null || shasum -a 256 "$2")"
    pins="${pins:0:16}"
  fi
  stamp="$pins $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.convoy-stamp" 2>/dev/null)" != "$stamp" ]]; then
    say "creating $venv (${*/#-r/pinned in} from PyPI)"
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "$@"
    echo "$stamp" >"$venv/.convoy-stamp"
  fi
}
