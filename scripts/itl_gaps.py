#!/usr/bin/env python3
"""Where a run's inter-token gaps come from (convoy-bench / bench_mlx_lm.py results.jsonl).

    scripts/itl_gaps.py RESULTS.jsonl [...]

For each run: throughput (generated tokens over first arrival to last token), TTFT from
arrival, ITL p50/p95/p99, and every gap between two tokens of one stream classed by what
else happened in it, from the timings alone (no engine trace):
  join        another request's first token came at the end of the gap (a prefill ended in it)
  postjoin    the gap starts at another request's first token (the step after a join)
  midprefill  another request was submitted and had no token yet at the gap's end
  postleave   the gap starts where another request's last token came
  plain       none of these
with each class's share of the gaps, its median, and how many of its gaps exceed the p95.
Tokens of one engine step reach the driver within a few ms of each other; 20 ms is the
tolerance used to call two tokens simultaneous.
"""
import json
import sys

TOL = 0.02


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def main(paths):
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            tr = r["traces"]
            firsts = [t["tokens"][0] for t in tr]
            lasts = [t["tokens"][-1] for t in tr]
            ttft = [t["tokens"][0] - t["arrived"] for t in tr]
            toks = sum(len(t["tokens"]) for t in tr)
            span = max(lasts) - min(t["arrived"] for t in tr)
            classes = {}
            for i, t in enumerate(tr):
                others = [j for j in range(len(tr)) if j != i]
                for a, b in zip(t["tokens"], t["tokens"][1:]):
                    if any(a + TOL < firsts[j] <= b + TOL for j in others):
                        k = "join"
                    elif any(abs(a - firsts[j]) < TOL for j in others):
                        k = "postjoin"
                    elif any(tr[j]["submitted"] < b < firsts[j] for j in others):
                        k = "midprefill"
                    elif any(a - TOL <= lasts[j] <= a + TOL for j in others):
                        k = "postleave"
                    else:
                        k = "plain"
                    classes.setdefault(k, []).append(b - a)
            gaps = [g for v in classes.values() for g in v]
            p95 = pct(gaps, 95)
            print(
                f"{path} {r['engine']} {r['workload']} {r['mode']}: {toks / span:.2f} tok/s, "
                f"TTFT p50 {pct(ttft, 50):.2f} p95 {pct(ttft, 95):.2f} s, ITL p50 "
                f"{pct(gaps, 50):.3f} p95 {p95:.3f} p99 {pct(gaps, 99):.3f} s ({len(gaps)} gaps)"
            )
            for k, v in sorted(classes.items()):
                print(
                    f"  {k:10s} {100 * len(v) / len(gaps):5.1f}%  p50 {pct(v, 50):.3f} s  "
                    f"above p95: {sum(g > p95 for g in v)}"
                )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
