#!/usr/bin/env python3
"""Runs one convoy-bench workload on mlx-lm's BatchGenerator and appends a result line.

The baseline side of `make bench-compare` (scripts/bench-compare.sh). It drives
`mlx_lm.generate.BatchGenerator`, the engine behind mlx-lm's server and `batch_generate`,
from one thread, as those do:

- continuous: requests are inserted as they arrive (closed loop: when one of the c in flight
  finishes) and `next()` is called in a loop; its defaults (prefill 8 prompts per chunk of up
  to 2048 tokens, decode one step per tick) are kept, with `completion_batch_size` set to the
  workload's batch size like convoy's `max_batch_size`.
- static: waves of c prompts inserted together and run to completion before the next wave,
  which is what `batch_generate` does with each call.

Greedy sampling, EOS ignored (no stop tokens), token ids from the workload file, so both
engines see identical prompts. The result line has the same raw per-request timings as
convoy's, and convoy-bench --report computes every metric from both with one piece of code.
"""
import argparse
import json
import resource
import sys
import time
from collections import deque
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.utils import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="MLX model folder")
    ap.add_argument("--workload", required=True)
    ap.add_argument("--mode", choices=["static", "continuous"], default="continuous")
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    w = json.loads(Path(args.workload).read_text())
    reqs = w["requests"]
    model, _ = load_model(Path(args.model))
    batch = w["batch"]
    prefill = min(8, batch)

    def generator() -> BatchGenerator:
        return BatchGenerator(
            model,
            stop_tokens=None,
            completion_batch_size=batch,
            prefill_batch_size=prefill,
        )

    # Warm-up, as convoy's driver does: first allocations and BLAS threads.
    gen = generator()
    gen.insert([reqs[0]["prompt"][:8]], max_tokens=[2])
    finished = 0
    while finished < 1:
        _, responses = gen.next()
        finished += sum(1 for r in responses if r.finish_reason is not None)
    gen.close()
    del gen
    mx.reset_peak_memory()

    gen = generator()
    n = len(reqs)
    traces = [{"submitted": 0.0, "tokens": [], "finished": 0.0} for _ in range(n)]
    uid_to_index = {}
    start = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - start

    def submit(indices):
        uids = gen.insert(
            [reqs[i]["prompt"] for i in indices],
            max_tokens=[reqs[i]["max_tokens"] for i in indices],
        )
        t = now()
        for uid, i in zip(uids, indices):
            uid_to_index[uid] = i
            traces[i]["submitted"] = t
            if open_loop:
                # Due at its arrival time even if next() was busy then: a server's client
                # waits for the tick in progress too.
                traces[i]["arrived"] = reqs[i]["arrival_s"]

    pending = deque(range(n))
    in_flight = 0
    done = 0
    c = w["concurrency"]
    open_loop = w["kind"] == "open"
    while done < n:
        if open_loop:
            due = []
            while pending and reqs[pending[0]]["arrival_s"] <= now():
                due.append(pending.popleft())
            if due:
                submit(due)
                in_flight += len(due)
            if in_flight == 0 and pending:
                time.sleep(max(0.0, reqs[pending[0]]["arrival_s"] - now()))
                continue
        elif args.mode == "static":
            if in_flight == 0 and pending:
                wave = [pending.popleft() for _ in range(min(c, len(pending)))]
                submit(wave)
                in_flight += len(wave)
        else:
            while in_flight < c and pending:
                submit([pending.popleft()])
                in_flight += 1
        _, responses = gen.next()
        t = now()
        for r in responses:
            tr = traces[uid_to_index[r.uid]]
            tr["tokens"].append(t)
            if r.finish_reason is not None:
                tr["finished"] = t
                done += 1
                in_flight -= 1
    gen.close()

    line = {
        "engine": "mlx-lm",
        "version": __import__("mlx_lm").__version__,
        "mlx": mx.__version__,
        "workload": w["name"],
        "kind": w["kind"],
        "mode": args.mode,
        "concurrency": c,
        "batch": batch,
        "peak_mlx_memory_bytes": mx.get_peak_memory(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "traces": traces,
    }
    with open(args.result, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"mlx-lm {w['name']} {args.mode}: {sum(len(t['tokens']) for t in traces)} tokens",
          file=sys.stderr)


if __name__ == "__main__":
    main()
