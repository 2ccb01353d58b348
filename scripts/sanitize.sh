#!/usr/bin/env bash
# Builds the C API tests (tests/c/api_test.c, tests/c/regressions.c) with AddressSanitizer and
# UndefinedBehaviorSanitizer (GCC) against libconvoy.so and runs them on the real model.
# What this checks: the C programs are instrumented, so their accesses are checked, and every
# heap allocation in the process goes through ASan's allocator; libconvoy.so (Rust, MLX) is
# not instrumented (stable Rust has no sanitizer flag), so its own loads and stores are only
# checked where they go through intercepted libc calls (memcpy, memmove, strlen, ...).
# LeakSanitizer checks the whole process at exit, with no suppressions. UBSan checks the C side.
# Usage: scripts/sanitize.sh [LIB_DIR] (default target/debug). Exit 0 when all pass.
set -euo pipefail
cd "$(dirname "$0")/.."
LIB="${1:-target/debug}"
MODEL="$(scripts/setup.sh --model-path)"
OUT="${TMPDIR:-/tmp}/convoy-sanitize"
mkdir -p "$OUT"
[[ -f "$LIB/libconvoy.so" ]] || { echo "sanitize: $LIB/libconvoy.so missing (cargo build --lib)" >&2; exit 1; }
FLAGS=(-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -Wall -Wextra -Werror -pedantic -Iinclude)
LINK=(-L"$LIB" -lconvoy -lpthread -Wl,-rpath,"$(cd "$LIB" && pwd)")
status=0
for src in api_test regressions; do
  cc -std=c11 "${FLAGS[@]}" "tests/c/$src.c" -o "$OUT/$src" "${LINK[@]}"
  echo "sanitize: running $src (ASan + UBSan)"
  if ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:detect_stack_use_after_return=1" \
     UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
     "$OUT/$src" "$MODEL" full > "$OUT/$src.log" 2>&1; then
    tail -n 1 "$OUT/$src.log"
  else
    echo "sanitize: $src FAILED; log: $OUT/$src.log" >&2
    tail -n 40 "$OUT/$src.log" >&2
    status=1
  fi
done
exit $status
