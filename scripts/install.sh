#!/usr/bin/env bash
# Installs an already built convoy into a prefix, as a tree that can be moved anywhere:
#   PREFIX/lib/libconvoy.so.1 (SONAME libconvoy.so.1) + libconvoy.so -> libconvoy.so.1
#        (macOS: libconvoy.1.dylib + libconvoy.dylib), RUNPATH relative to the library itself;
#   PREFIX/lib/libconvoy.a;
#   PREFIX/include/convoy.h (every include/*.h and include/*.hpp);
#   PREFIX/lib/pkgconfig/convoy.pc (shared) and convoy-static.pc (static), prefix derived
#        from where the .pc file is (${pcfiledir}), so they stay right when the tree moves;
#   PREFIX/lib/convoy/mlx-runtime/: the MLX runtime the library was built against, in the
#        wheel's own layout (mlx/lib/libmlx.so and mlx_cpu.libs/, whose $ORIGIN RUNPATH keeps
#        working unchanged; macOS: mlx/lib/libmlx.dylib and mlx.metallib beside it);
#   PREFIX/lib/convoy/openblas/libopenblas.so.0: the OpenBLAS the library was linked with
#        (Linux CPU backend), so the tree runs without libopenblas-*-dev. That copy still
#        needs the system's libgfortran.so.5 and libgomp.so.1 (Debian: libgfortran5, libgomp1).
# Third-party binaries are copied as they are; only the installed copy of libconvoy is patched
# (patchelf on Linux, install_name_tool on macOS).
#
# Usage: scripts/install.sh [--prefix DIR] [--destdir DIR] [--lib-dir DIR]
#   --prefix   where the tree goes (default: $PREFIX, else /usr/local)
#   --destdir  staging root prepended to the prefix (default: $DESTDIR, else none)
#   --lib-dir  where the built libconvoy.{so,dylib,a} are (default: target/release;
#              the tests pass target/debug)
# `make install PREFIX=...` builds the release library first and runs this script.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"

PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"
LIB_DIR="$REPO/target/release"
while (($#)); do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --destdir) DESTDIR="$2"; shift 2 ;;
    --lib-dir) LIB_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "install: error: $*" >&2; exit 1; }
say() { echo "install: $*"; }

# pkg-config output is split on whitespace by every consumer.
[[ "$PREFIX" != *[[:space:]]* && "$DESTDIR" != *[[:space:]]* ]] || die "the prefix must not contain whitespace"
OS="$(uname -s)"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/Cargo.toml" | head -n 1)"
ABI=1 # ABI major version: the SONAME / install name.
ROOT="$DESTDIR$PREFIX"
LIB="$ROOT/lib"
RUNTIME="$LIB/convoy/mlx-runtime"
BLAS="$LIB/convoy/openblas"

case "$OS" in
  Linux)
    SHARED="$LIB_DIR/libconvoy.so"
    command -v patchelf >/dev/null || die "patchelf is missing: run scripts/setup.sh (or apt-get install patchelf)"
    command -v readelf >/dev/null || die "readelf is missing: run scripts/setup.sh (binutils)"
    ;;
  Darwin)
    SHARED="$LIB_DIR/libconvoy.dylib"
    ;;
  *) die "unsupported OS $OS" ;;
esac
for f in "$SHARED" "$LIB_DIR/libconvoy.a"; do
  [[ -f "$f" ]] || die "$f is missing: build it first (cargo build --release --lib, or make install)"
done

# The run-time search path the build gave the library (absolute: the MLX wheel in the cache,
# the OpenBLAS folder), and the libraries it needs: the installed copies come from there.
if [[ "$OS" == Linux ]]; then
  SEARCH="$(readelf -d "$SHARED" | sed -n 's/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]$/\2/p' | tr '\n' ':')"
  NEEDED="$(readelf -d "$SHARED" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p')"
  MLX_NAME=libmlx.so
else
  SEARCH="$(otool -l "$SHARED" | awk '/cmd LC_RPATH/ {getline; getline; print $2}' | tr '\n' ':')"
  NEEDED=""
  MLX_NAME=libmlx.dylib
fi
find_in_search() { # NAME: the first folder of SEARCH holding NAME
  local d folders
  IFS=: read -ra folders <<<"$SEARCH"
  for d in "${folders[@]}"; do
    if [[ -n "$d" && -e "$d/$1" ]]; then echo "$d"; return 0; fi
  done
  return 1
}
MLX_LIB="$(find_in_search "$MLX_NAME")" || die "$MLX_NAME not found in the run-time path of $SHARED ($SEARCH)"

# Start from a clean runtime folder so files of an older install do not linger.
rm -rf "$LIB/convoy"
mkdir -p "$LIB/pkgconfig" "$ROOT/include" "$RUNTIME/mlx/lib"

# MLX: libmlx (and, on macOS, mlx.metallib, which must sit beside the dylib), plus the wheel's
# bundled libraries (mlx_cpu.libs/ on Linux) at the same relative place, and its licenses.
shopt -s nullglob
cp -P "$MLX_LIB"/libmlx.* "$MLX_LIB"/*.metallib "$RUNTIME/mlx/lib/"
WHEEL="$(cd "$MLX_LIB/../.." && pwd)"
if [[ "$(cd "$MLX_LIB" && pwd)" == "$WHEEL/mlx/lib" ]]; then
  for d in "$WHEEL"/mlx*.libs "$WHEEL"/mlx*.dist-info/licenses; do cp -R "$d" "$RUNTIME/"; done
fi
shopt -u nullglob

# OpenBLAS (Linux CPU backend): the exact file the build resolved, under its SONAME, plus the
# libopenblas.so link the static link line needs.
RPATH_BLAS=""
if grep -qx 'libopenblas.so.0' <<<"$NEEDED"; then
  BLAS_DIR="$(find_in_search libopenblas.so.0)" || die "libopenblas.so.0 not found in the run-time path of $SHARED ($SEARCH)"
  mkdir -p "$BLAS"
  cp "$(readlink -f "$BLAS_DIR/libopenblas.so.0")" "$BLAS/libopenblas.so.0"
  ln -s libopenblas.so.0 "$BLAS/libopenblas.so"
  for doc in /usr/share/doc/libopenblas0*/copyright; do
    if [[ -f "$doc" ]]; then cp "$doc" "$BLAS/copyright"; break; fi
  done
  RPATH_BLAS='$ORIGIN/convoy/openblas:'
fi

# libconvoy itself.
install -m 644 "$LIB_DIR/libconvoy.a" "$LIB/libconvoy.a"
if [[ "$OS" == Linux ]]; then
  SONAME="libconvoy.so.$ABI"
  install -m 755 "$SHARED" "$LIB/$SONAME"
  # OpenBLAS first: see mlx-sys/build.rs (it must come before libmlx's reference BLAS).
  RUNPATH="${RPATH_BLAS}\$ORIGIN/convoy/mlx-runtime/mlx/lib"
  # Two calls: patchelf 0.14 (Debian 12) drops --set-rpath when given with --set-soname.
  patchelf --set-soname "$SONAME" "$LIB/$SONAME"
  patchelf --set-rpath "$RUNPATH" "$LIB/$SONAME"
  [[ "$(patchelf --print-soname "$LIB/$SONAME"):$(patchelf --print-rpath "$LIB/$SONAME")" == "$SONAME:$RUNPATH" ]] ||
    die "patchelf did not set SONAME/RUNPATH of $LIB/$SONAME"
  ln -sfn "$SONAME" "$LIB/libconvoy.so"
  # libgomp: convoy's CPU matmul kernel runs in OpenMP threads (x86-64 builds).
  STATIC_SYS="-lstdc++ -lgomp -lgcc_s -lutil -lrt -lpthread -lm -ldl"
else
  # macOS: written with care but NOT TESTED (no Mac here).
  SONAME="libconvoy.$ABI.dylib"
  install -m 755 "$SHARED" "$LIB/$SONAME"
  install_name_tool -id "@rpath/$SONAME" "$LIB/$SONAME"
  otool -l "$LIB/$SONAME" | awk '/cmd LC_RPATH/ {getline; getline; print $2}' | while read -r p; do
    install_name_tool -delete_rpath "$p" "$LIB/$SONAME"
  done
  install_name_tool -add_rpath "@loader_path/convoy/mlx-runtime/mlx/lib" "$LIB/$SONAME"
  codesign --force --sign - "$LIB/$SONAME" # editing load commands voids the signature (arm64)
  ln -sfn "$SONAME" "$LIB/libconvoy.dylib"
  STATIC_SYS="-lc++ -liconv -lSystem -lc -lm"
fi

shopt -s nullglob
HEADERS=("$REPO"/include/*.h "$REPO"/include/*.hpp)
shopt -u nullglob
((${#HEADERS[@]})) || die "no headers in include/"
install -m 644 "${HEADERS[@]}" "$ROOT/include/"

# pkg-config. prefix comes from the .pc file's own folder, so the tree can be moved.
# Libs carries -rpath to libdir: a program built with only these flags then runs without
# LD_LIBRARY_PATH or ldconfig, wherever the tree is (drop it if you install into a system
# folder the loader searches anyway, or copy libconvoy beside your program).
HEAD='prefix=${pcfiledir}/../..
libdir=${prefix}/lib
includedir=${prefix}/include
mlxdir=${libdir}/convoy/mlx-runtime/mlx/lib
blasdir=${libdir}/convoy/openblas'
cat >"$LIB/pkgconfig/convoy.pc" <<EOF
# convoy $VERSION, shared library. Relocatable: prefix is derived from this file's folder.
# -rpath \${libdir}: programs linked with these flags find libconvoy (and, through its own
# relative RUNPATH, MLX and OpenBLAS) without LD_LIBRARY_PATH, wherever the tree was moved
# before linking.
$HEAD

Name: convoy
Description: In-process LLM inference with continuous batching on MLX, behind a C ABI
Version: $VERSION
Cflags: -I\${includedir}
Libs: -L\${libdir} -lconvoy -Wl,-rpath,\${libdir}
EOF
# A separate file rather than Libs.private: libconvoy.so and libconvoy.a share libdir, so
# `pkg-config --static --libs convoy` would still give -lconvoy and link the shared one.
if [[ -n "$RPATH_BLAS" ]]; then
  # OpenBLAS before libmlx, kept even under --as-needed (nothing names it directly).
  BLAS_LIBS='-L${blasdir} -Wl,-rpath,${blasdir} -Wl,--push-state,--no-as-needed -lopenblas -Wl,--pop-state '
else
  BLAS_LIBS=""
fi
cat >"$LIB/pkgconfig/convoy-static.pc" <<EOF
# convoy $VERSION, static library: libconvoy.a, then what it needs at link and run time
# (libmlx from the bundled runtime, with an rpath to it; OpenBLAS ahead of libmlx; the C++
# and C runtime libraries Rust's std and MLX use). Relocatable like convoy.pc.
$HEAD

Name: convoy-static
Description: convoy (static library)
Version: $VERSION
Cflags: -I\${includedir}
Libs: \${libdir}/libconvoy.a ${BLAS_LIBS}-L\${mlxdir} -Wl,-rpath,\${mlxdir} -lmlx $STATIC_SYS
EOF

say "installed convoy $VERSION into $ROOT:"
(cd "$ROOT" && find lib/libconvoy* lib/pkgconfig/convoy*.pc lib/convoy "${HEADERS[@]/#"$REPO"\//}" \
  \( -type f -o -type l \) | sort | sed 's/^/  /')
