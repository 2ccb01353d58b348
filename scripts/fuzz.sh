#!/usr/bin/env bash
# Coverage-guided fuzzing of convoy's parsers and C ABI with AFL++ (cargo-afl, stable Rust).
#
#   scripts/fuzz.sh --smoke                 build, then replay every seed in fuzz/corpus/<target>
#                                           and every committed finding in tests/data/fuzz/<target>
#                                           through its harness once, without AFL (under a minute
#                                           after the build); fails if any input crashes
#   scripts/fuzz.sh [--execs N | --seconds S] [TARGET...]
#                                           fuzz each target in turn (default: all, 1000000
#                                           executions each; c_api, and gguf_mlx/safetensors_mlx
#                                           (the parser targets plus MLX loading what passed our
#                                           checks): --c-api-seconds / --mlx-seconds, default
#                                           1200 / 300)
#
# Options: --execs N (per parser target), --seconds S (per parser target, instead of --execs),
# --c-api-seconds S, --mlx-seconds S, --resume (continue the previous run of each target in
# $FUZZ_OUT, its counts included, instead of starting over), --jobs-nice N (default 19).
# Targets: gguf safetensors
# st_index config_json tokenizer_json chat_template gguf_mlx safetensors_mlx c_api.
#
# Findings go to $FUZZ_OUT/<target> (default fuzz/target/fuzz-out/<target>); the report lists
# per target the executions done, run time, crashes and hangs read from AFL's fuzzer_stats.
# Exits non-zero if any target found a crash. Builds use CARGO_TARGET_DIR (default
# fuzz/target/afl) so they never touch the main build, and everything runs under nice.
# Installs cargo-afl (pinned) and builds AFL++ if missing; needs a C compiler and make.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARGO_AFL_VERSION=0.18.2
ALL_TARGETS=(gguf safetensors st_index config_json tokenizer_json chat_template gguf_mlx safetensors_mlx
  c_api)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/fuzz/target/afl}"
FUZZ_OUT="${FUZZ_OUT:-$ROOT/fuzz/target/fuzz-out}"
NICE=19
SMOKE=0
RESUME=0
EXECS=1000000
SECONDS_PER_TARGET=""
C_API_SECONDS=1200
MLX_SECONDS=300
TARGETS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --resume) RESUME=1 ;;
    --execs) EXECS="$2"; shift ;;
    --seconds) SECONDS_PER_TARGET="$2"; shift ;;
    --c-api-seconds) C_API_SECONDS="$2"; shift ;;
    --mlx-seconds) MLX_SECONDS="$2"; shift ;;
    --jobs-nice) NICE="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) TARGETS+=("$1") ;;
  esac
  shift
done
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
  [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t" >&2; exit 2; }
done

say() { echo "fuzz.sh: $*"; }
N() { nice -n "$NICE" "$@"; }

# 1. cargo-afl (pinned) and AFL++ itself.
if ! cargo afl --version 2>/dev/null | grep -q "$CARGO_AFL_VERSION"; then
  say "installing cargo-afl $CARGO_AFL_VERSION"
  N cargo install cargo-afl --version "$CARGO_AFL_VERSION" --locked
fi
# `config --build` refuses (non-zero) when AFL++ is already built for this rustc.
if ! afl_config=$(N cargo afl config --build 2>&1); then
  grep -q "already built" <<<"$afl_config" || { echo "$afl_config" >&2; exit 1; }
fi

# 2. The harnesses (the first build also compiles mlx-c: several minutes).
MODEL="${CONVOY_MODEL:-$("$ROOT/scripts/setup.sh" --model-path)}"
[[ -f "$MODEL" ]] || "$ROOT/scripts/setup.sh"
export CONVOY_MODEL="$MODEL"
say "building the harnesses into $CARGO_TARGET_DIR"
N cargo afl build --release --manifest-path "$ROOT/fuzz/Cargo.toml" --bins
BIN="$CARGO_TARGET_DIR/release"

# 3a. Smoke: every seed through its harness, no AFL (a harness reads one input on stdin).
if [[ $SMOKE == 1 ]]; then
  failed=0
  for t in "${TARGETS[@]}"; do
    n=0
    for f in "$ROOT/fuzz/corpus/${t%_mlx}"/* "$ROOT/tests/data/fuzz/${t%_mlx}"/*; do
      [[ -f "$f" ]] || continue
      n=$((n + 1))
      if ! N timeout 120 "$BIN/$t" < "$f" > /tmp/convoy-fuzz-smoke.log 2>&1; then
        say "SMOKE FAILURE: $t < ${f#$ROOT/}"
        tail -20 /tmp/convoy-fuzz-smoke.log
        failed=1
      fi
    done
    say "smoke $t: $n seeds"
  done
  [[ $failed == 0 ]] && say "smoke: all seeds ran clean" || say "smoke: FAILED"
  exit $failed
fi

# 3b. Fuzz each target in turn.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_SKIP_CRASHES=1 AFL_IGNORE_SEED_PROBLEMS=1
mkdir -p "$FUZZ_OUT"
report=()
any_crash=0
for t in "${TARGETS[@]}"; do
  out="$FUZZ_OUT/$t"
  seeds="$ROOT/fuzz/corpus/${t%_mlx}"
  if [[ $RESUME == 1 && -d "$out/default" ]]; then
    seeds=-
  else
    rm -rf "$out"
  fi
  limit=(-E "$EXECS")
  [[ -n "$SECONDS_PER_TARGET" ]] && limit=(-V "$SECONDS_PER_TARGET")
  timeout_ms=2000
  case "$t" in
    c_api) limit=(-V "$C_API_SECONDS"); timeout_ms=60000 ;;
    gguf_mlx|safetensors_mlx) limit=(-V "$MLX_SECONDS"); timeout_ms=5000 ;;
  esac
  say "fuzzing $t (${limit[*]}, -t $timeout_ms) -> ${out#$ROOT/}"
  start=$(date +%s)
  # `-c -`: cargo-afl asks for CMPLOG (-c0), which a stable-Rust build is not instrumented
  # for; it only costs executions.
  N cargo afl fuzz -c - -i "$seeds" -o "$out" "${limit[@]}" -t "$timeout_ms" -m none \
    -- "$BIN/$t" > "$out.log" 2>&1 || say "afl-fuzz for $t exited with $? (see ${out#$ROOT/}.log)"
  stats="$out/default/fuzzer_stats"
  stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats" 2>/dev/null; }
  execs=$(stat execs_done); crashes=$(stat saved_crashes); hangs=$(stat saved_hangs)
  run_time=$(stat run_time); [[ -n "$run_time" ]] || run_time=$(( $(date +%s) - start ))
  report+=("$(printf '%-15s %12s %8ss %8s %6s' "$t" "${execs:-?}" "$run_time" "${crashes:-?}" "${hangs:-?}")")
  [[ "${crashes:-0}" == 0 ]] || any_crash=1
done

echo
printf '%-15s %12s %9s %8s %6s\n' target executions time crashes hangs
printf '%s\n' "${report[@]}"
echo "findings: ${FUZZ_OUT#$ROOT/}/<target>/default/{crashes,hangs}"
exit $any_crash
