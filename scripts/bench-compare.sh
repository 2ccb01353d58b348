#!/usr/bin/env bash
# convoy against mlx-lm on the same machine, model, MLX and BLAS, in one run (issue 9):
#   scripts/bench-compare.sh [--out DIR] [--smoke] [--concurrency 1,2,4,8,16] [--only convoy|mlx-lm]
#                            [--ablate fuse,attn,pad,exp,rows,cache,prefix,sync,chunk | --ablate none]
#                            [--ablate-on closed-c8,closed-c16,mixed] [--bench BINARY]
#
# 1. A virtual environment in $CONVOY_CACHE_DIR/venv-mlx-lm with pinned mlx-lm 0.32.2 over
#    MLX 0.32.2 (scripts/bench-compare-requirements.txt, every package pinned).
# 2. The float32 MLX folder of the bundled model ($CONVOY_CACHE_DIR/models/...-f32-mlx,
#    written once by convoy-bench --export-mlx): both engines load this same folder.
# 3. The workloads as token ids (convoy-bench --write-workloads): closed loops at each c
#    (n = max(8, 2c), prompt 128, 64 tokens, EOS ignored) and a mixed open-loop workload
#    (Poisson arrivals, prompts 24-600 tokens, outputs 8-200, fixed seed, batch 8).
# 4. Every (workload, mode) on both engines, each run in its own process (peak RSS is the
#    run's own), the engine that goes first alternating between configurations. mlx-lm runs
#    with the same OpenMP OpenBLAS that libconvoy links (LD_PRELOAD over the wheel's
#    reference BLAS), so both use one BLAS.
# 5. What each optimization buys: convoy again with each one switched off (--ablate), on the
#    closed loops at c = 8 and 16 (continuous; --ablate-on names other workloads, e.g. mixed),
#    between two runs with all on, in the same run.
# 6. convoy-bench --report: report.md (tables, ratios, memory), summary.jsonl, compare.png;
#    raw timings in results.jsonl.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CONVOY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy}"
VENV="$CACHE/venv-mlx-lm"
PY="${CONVOY_PYTHON:-python3}"
OUT="$ROOT/bench-results/compare"
SMOKE=0
CONCURRENCY=1,2,4,8,16
ONLY=""
# (ahead, ajoin and join switch off decode-ahead and its parts, which are off on the CPU
# backend already; `a+b` switches several off in one run, e.g. sync+ajoin.)
ABLATE=fuse,attn,pad,exp,rows,cache,prefix,sync,chunk
ABLATE_GIVEN=0
ABLATE_ON=closed-c8,closed-c16
BENCH=""
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

die() { echo "bench-compare: error: $*" >&2; exit 1; }
say() { echo "bench-compare: $*" >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --ablate) ABLATE="$2"; ABLATE_GIVEN=1; shift 2 ;;
    --ablate-on) ABLATE_ON="$2"; shift 2 ;;
    --bench) BENCH="$2"; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done

# The smoke run checks that ablation runs work with one switch, not what each buys.
if [[ $SMOKE == 1 && $ABLATE_GIVEN == 0 ]]; then ABLATE=exp; fi
"$ROOT/scripts/setup.sh"
GGUF="$("$ROOT/scripts/setup.sh" --model-path)"
MLX_MODEL="$CACHE/models/$(basename "$GGUF" .gguf | sed 's/\.Q[0-9_A-Z]*$//')-f32-mlx"
cd "$ROOT"
if [[ -z "$BENCH" ]]; then
  cargo build --release --bin convoy-bench
  BENCH="$ROOT/target/release/convoy-bench"
fi

# The BLAS libconvoy links (see build.rs): preloaded for mlx-lm too, so both use one BLAS.
BLAS="$(ldd "$BENCH" 2>/dev/null | awk '/libopenblas/ {print $3; exit}' || true)"
if [[ "$ONLY" != convoy && ( -z "$BLAS" || ! -f "$BLAS" ) ]]; then
  die "cannot find the OpenBLAS convoy-bench links (mlx-lm must use the same BLAS)"
fi

mkdir -p "$CACHE"
if [[ "$ONLY" == convoy ]]; then
  VPY="$PY"   # no baseline: no virtual environment needed
else
VPY="$VENV/bin/python"
# shellcheck source=scripts/venv.sh
source "$ROOT/scripts/venv.sh"
ensure_venv "$VENV" "mlx-lm needs" -r "$ROOT/scripts/bench-compare-requirements.txt"
fi

if [[ "$ONLY" != convoy ]]; then
  # mlx-lm really runs on that BLAS (LD_PRELOAD took effect). The maps name the file behind
  # the symlinks (libopenblas.so.0 -> libopenblasp-r0.3.21.so).
  LD_PRELOAD="$BLAS" "$VENV/bin/python" -c "
import mlx.core as mx, sys
mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
maps = open('/proc/self/maps').read() if sys.platform.startswith('linux') else '$BLAS'
sys.exit(0 if '$(basename "$(readlink -f "$BLAS")")' in maps else 1)" || die "mlx-lm did not load $BLAS"
fi
if [[ ! -f "$MLX_MODEL/model.safetensors" ]]; then
  say "writing the float32 MLX folder $MLX_MODEL"
  "$BENCH" --model "$GGUF" --export-mlx "$MLX_MODEL"
fi

mkdir -p "$OUT"
rm -f "$OUT/results.jsonl"
if [[ $SMOKE == 1 ]]; then
  WL_ARGS=(--concurrency 1,2 --n 2 --prompt-len 16 --max-tokens 4 --mixed-requests 3
           --mixed-rate 4 --mixed-batch 2 --mixed-prompt 8,40 --mixed-output 2,6)
else
  WL_ARGS=(--concurrency "$CONCURRENCY")
fi
"$BENCH" --model "$MLX_MODEL" --write-workloads "$OUT/workloads" "${WL_ARGS[@]}"

run_mlx_lm() {
  LD_PRELOAD="$BLAS" "$VENV/bin/python" "$ROOT/scripts/bench_mlx_lm.py" --model "$MLX_MODEL" \
    --workload "$1" --mode "$2" --result "$OUT/results.jsonl"
}
run_convoy() {
  "$BENCH" --model "$MLX_MODEL" --run-workload "$1" --mode "$2" --result "$OUT/results.jsonl"
}

first=convoy
for wl in "$OUT"/workloads/closed-c*.json "$OUT"/workloads/mixed.json; do
  [[ -f "$wl" ]] || continue
  modes=(static continuous)
  [[ "$(basename "$wl")" == mixed.json ]] && modes=(continuous)
  for mode in "${modes[@]}"; do
    if [[ $first == convoy ]]; then order=(convoy mlx-lm); first=mlx-lm; else order=(mlx-lm convoy); first=convoy; fi
    for engine in "${order[@]}"; do
      [[ -z "$ONLY" || "$ONLY" == "$engine" ]] || continue
      say "$(date +%H:%M:%S) $engine $(basename "$wl" .json) $mode"
      if [[ $engine == convoy ]]; then run_convoy "$wl" "$mode"; else run_mlx_lm "$wl" "$mode"; fi
    done
  done
done

# Each workload: the full configuration, then each switch off, then the full one again; the
# report compares each ablation with the mean of the two full runs around it (this machine's
# speed drifts by several percent over minutes).
run_ablations() {
  for wl in "$@"; do
    [[ -f "$wl" ]] || continue
    "$BENCH" --model "$MLX_MODEL" --run-workload "$wl" --mode continuous --ablate all-on \
      --result "$OUT/results.jsonl"
    for a in ${ABLATE//,/ }; do
      say "$(date +%H:%M:%S) convoy without $a $(basename "$wl" .json) continuous"
      "$BENCH" --model "$MLX_MODEL" --run-workload "$wl" --mode continuous --ablate "${a//+/,}" \
        --result "$OUT/results.jsonl"
    done
    "$BENCH" --model "$MLX_MODEL" --run-workload "$wl" --mode continuous --ablate all-on \
      --result "$OUT/results.jsonl"
  done
}
if [[ "$ABLATE" != none && "$ONLY" != mlx-lm ]]; then
  if [[ $SMOKE == 1 ]]; then
    run_ablations "$OUT"/workloads/closed-c2.json
  else
    ablate_on=()
    for w in ${ABLATE_ON//,/ }; do
      [[ -f "$OUT/workloads/$w.json" ]] || die "--ablate-on: no workload $w"
      ablate_on+=("$OUT/workloads/$w.json")
    done
    run_ablations "${ablate_on[@]}"
  fi
fi

HEADER="$OUT/header.md"
{
  echo "Run of \`make bench-compare\` on $(date -u +%Y-%m-%d) ($(date -u +%H:%M) UTC)."
  echo
  echo "- Machine: $(uname -sm), $(getconf _NPROCESSORS_ONLN) cores ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.0f GB", $2/1e6}' /proc/meminfo 2>/dev/null) RAM."
  echo "- MLX $(basename "$(ls -d "$CACHE"/mlx-cpu-* 2>/dev/null | head -1)" | sed 's/mlx-cpu-//') CPU for both; mlx-lm $("$VPY" -c 'import mlx_lm; print(mlx_lm.__version__)' 2>/dev/null || echo '(not run)'); convoy $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'); BLAS ${BLAS:+$(basename "$(dirname "$BLAS")") $(dpkg-query -W -f '${Version}' libopenblas0-openmp 2>/dev/null || true)}${BLAS:-(none found)} for both."
  echo "- Model: $(basename "$MLX_MODEL") (float32, from $(basename "$GGUF"))."
  echo "- Workloads: $("$VPY" -c "
import json,glob,os
out=[]
for p in sorted(glob.glob('$OUT/workloads/*.json')):
    w=json.load(open(p)); r=w['requests']
    pl=[len(x['prompt']) for x in r]; ml=[x['max_tokens'] for x in r]
    out.append(f\"{w['name']}: n={len(r)}, prompt {min(pl)}-{max(pl)}, output {min(ml)}-{max(ml)}, batch {w['batch']}\")
print('; '.join(out))")."
} >"$HEADER"
"$BENCH" --report "$OUT/results.jsonl" --report-header "$HEADER" --out "$OUT"
say "wrote $OUT/report.md, $OUT/summary.jsonl, $OUT/compare.png, $OUT/results.jsonl"

if [[ $SMOKE == 1 ]]; then
  # Both engines produced every run with every token, and the report has its tables.
  "$VPY" - "$OUT" "${ONLY:-both}" "$ABLATE" <<'EOF'
import glob, json, sys
out, only, abl = sys.argv[1], sys.argv[2], sys.argv[3]
want = {}
for p in glob.glob(f"{out}/workloads/*.json"):
    w = json.load(open(p))
    want[w["name"]] = (sum(r["max_tokens"] for r in w["requests"]), w["kind"])
seen = {}
for line in open(f"{out}/results.jsonl"):
    r = json.loads(line)
    toks = sum(len(t["tokens"]) for t in r["traces"])
    total, kind = want[r["workload"]]
    assert toks == total, f"{r['engine']} {r['workload']} {r['mode']}: {toks} tokens, want {total}"
    assert all(t["tokens"] and t["tokens"][0] >= t["submitted"] for t in r["traces"])
    seen[(r["engine"], r["workload"], r["mode"])] = True
engines = 2 if only == "both" else 1
ablations = 0 if only == "mlx-lm" or abl == "none" else len(abl.split(",")) + 1
expect = sum(2 if k == "closed" else 1 for _, k in want.values()) * engines + ablations
assert len(seen) == expect, f"{len(seen)} runs, want {expect}"
report = open(f"{out}/report.md").read()
assert "| 1 |" in report and "Mixed workload" in report
assert only != "both" or "mlx-lm" in report
assert only == "mlx-lm" or abl == "none" or "What each optimization buys" in report
print("bench-compare smoke check: ok")
EOF
fi
