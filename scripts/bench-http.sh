#!/usr/bin/env bash
# The HTTP load figure of docs/benchmarks.md: one closed-loop workload (64 streams in flight,
# 128 requests of 128 prompt tokens and 64 generated, EOS ignored: convoy-bench's closed-c64)
# run in-process (convoy-bench --run-workload) and through convoy-server with the official
# openai client (scripts/bench_http.py), alternating, twice each, in one run.
#   scripts/bench-http.sh [--out DIR] [--smoke] [--bin-dir DIR]
# --bin-dir: use the convoy-bench and convoy-server already built there (make test's smoke
# run uses target/debug) instead of building release ones.
# Writes DIR/results.jsonl (traces) and DIR/report.md. Default DIR: bench-results/http.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/bench-results/http"
SMOKE=0
BIN_DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    *) echo "bench-http: unknown argument $1" >&2; exit 2 ;;
  esac
done
say() { echo "bench-http: $*"; }
MODEL="$("$ROOT/scripts/setup.sh" --model-path)"
cd "$ROOT"
if [[ -z "$BIN_DIR" ]]; then
  cargo build --release --workspace --bin convoy-bench --bin convoy-server
  BIN_DIR="$ROOT/target/release"
fi
BENCH="$BIN_DIR/convoy-bench"
SERVER="$BIN_DIR/convoy-server"

# The openai client's virtual environment (the same one the server tests use).
CACHE="${CONVOY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy}"
"$ROOT/scripts/test-server.sh" --venv-only
VPY="$CACHE/venv-openai/bin/python"

mkdir -p "$OUT"
rm -f "$OUT/results.jsonl"
if [[ $SMOKE == 1 ]]; then
  C=4; WL_ARGS=(--concurrency 4 --n 4 --prompt-len 16 --max-tokens 4); RUNS=1
else
  C=64; WL_ARGS=(--concurrency 64 --prompt-len 128 --max-tokens 64); RUNS=2
fi
"$BENCH" --model "$MODEL" --write-workloads "$OUT/workloads" "${WL_ARGS[@]}" --mixed-requests 0
WL="$OUT/workloads/closed-c$C.json"

# Each run in a fresh process on both sides, so neither finds the last run's prompts in its
# prefix cache. The server starts before its run and sits idle while the in-process one runs.
start_server() {
  "$SERVER" --model "$MODEL" --port 0 --max-batch-size "$C" --quiet >"$OUT/server.out" 2>"$OUT/server.err" &
  PID=$!
  trap 'kill $PID 2>/dev/null || true' EXIT
  for _ in $(seq 600); do
    grep -q "listening on" "$OUT/server.out" 2>/dev/null && break
    kill -0 $PID 2>/dev/null || { cat "$OUT/server.err" >&2; exit 1; }
    sleep 0.2
  done
  URL="$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$OUT/server.out")"
  [[ -n "$URL" ]] || { echo "bench-http: the server did not start" >&2; exit 1; }
}
stop_server() {
  kill -TERM $PID; wait $PID || true
  trap - EXIT
}

for run in $(seq "$RUNS"); do
  say "$(date +%H:%M:%S) in-process, run $run"
  "$BENCH" --model "$MODEL" --run-workload "$WL" --mode continuous --result "$OUT/results.jsonl"
  start_server
  say "$(date +%H:%M:%S) HTTP, run $run"
  "$VPY" "$ROOT/scripts/bench_http.py" --url "$URL" --workload "$WL" --result "$OUT/results.jsonl"
  stop_server
done

{
  echo "# convoy in-process and through convoy-server ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "convoy $(git -C "$ROOT" describe --always --dirty), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
  echo "Workload $(basename "$WL" .json): $C streams in flight, prompt and output lengths as in convoy-bench; greedy, EOS ignored."
  echo
  "$VPY" "$ROOT/scripts/bench_http.py" --summarize "$OUT/results.jsonl"
} >"$OUT/report.md"
cat "$OUT/report.md"
if [[ $SMOKE == 1 ]]; then
  # Both runs completed every request with every token.
  "$VPY" - "$OUT/results.jsonl" "$WL" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
w = json.load(open(sys.argv[2]))
want = sum(r["max_tokens"] for r in w["requests"])
assert [l["engine"] for l in lines] == ["convoy", "convoy-http"], lines
for l in lines:
    got = sum(len(t["tokens"]) for t in l["traces"])
    assert len(l["traces"]) == len(w["requests"]) and got == want, (l["engine"], got, want)
print("bench-http: smoke ok")
PY
fi
