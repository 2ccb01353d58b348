"""Drives convoy-server with a convoy-bench workload file through the official `openai`
client (AsyncOpenAI, one stream per request, `c` in flight: a closed loop) and appends a
result line in convoy-bench's trace format; with --summarize, prints the side-by-side table
of result lines (in-process and HTTP) instead.

  python bench_http.py --url URL --workload W.json --result R.jsonl [--label convoy-http]
  python bench_http.py --summarize R.jsonl --out report.md
"""
import argparse
import asyncio
import json
import time


async def drive(url, workload, label):
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    # Warm-up (first allocations, BLAS threads), as convoy-bench's and mlx-lm's drivers do.
    first = workload["requests"][0]["prompt"]
    await client.completions.create(model=model, prompt=first[:8], max_tokens=2, temperature=0)
    items = list(enumerate(workload["requests"]))
    traces = [None] * len(items)
    t0 = time.perf_counter()

    async def one(i, item):
        trace = {"submitted": time.perf_counter() - t0, "tokens": [], "finished": 0.0}
        stream = await client.completions.create(
            model=model,
            prompt=item["prompt"],
            max_tokens=item["max_tokens"],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].text:
                trace["tokens"].append(now)
        trace["finished"] = time.perf_counter() - t0
        # A token whose text is held back (a partial character) sends no chunk: pad the
        # token times with the finish time so the count is usage's.
        n = usage.completion_tokens if usage else len(trace["tokens"])
        trace["tokens"] += [trace["finished"]] * max(0, n - len(trace["tokens"]))
        traces[i] = trace

    async def worker():
        while items:
            i, item = items.pop(0)
            await one(i, item)

    await asyncio.gather(*(worker() for _ in range(workload["concurrency"])))
    await client.close()
    return {"engine": label, "workload": workload["name"], "kind": workload["kind"],
            "mode": "continuous", "concurrency": workload["concurrency"], "traces": traces}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else 0.0


def summary(line):
    traces = line["traces"]
    start = min(t["submitted"] for t in traces)
    wall = max(t["finished"] for t in traces) - start
    tokens = sum(len(t["tokens"]) for t in traces)
    ttft = [t["tokens"][0] - t["submitted"] for t in traces if t["tokens"]]
    return {"engine": line["engine"], "requests": len(traces), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--workload")
    ap.add_argument("--result")
    ap.add_argument("--label", default="convoy-http")
    ap.add_argument("--summarize")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.summarize:
        rows = [summary(json.loads(l)) for l in open(a.summarize) if l.strip()]
        out = ["| run | engine | requests | tokens | wall s | tok/s | TTFT p50 s | TTFT p95 s |",
               "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for k, r in enumerate(rows, 1):
            out.append(f"| {k} | {r['engine']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | "
                       f"{r['tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} |")
        by = {}
        for r in rows:
            by.setdefault(r["engine"], []).append(r)
        if "convoy" in by and "convoy-http" in by:
            mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
            h, c = by["convoy-http"], by["convoy"]
            out.append("")
            out.append(f"HTTP / in-process (means over runs): throughput "
                       f"{mean(h, 'tok_s') / mean(c, 'tok_s'):.2f}x, TTFT p50 "
                       f"{mean(h, 'ttft_p50') / mean(c, 'ttft_p50'):.2f}x, TTFT p95 "
                       f"{mean(h, 'ttft_p95') / mean(c, 'ttft_p95'):.2f}x")
        text = "\n".join(out) + "\n"
        print(text)
        if a.out:
            open(a.out, "w").write(text)
        return
    workload = json.load(open(a.workload))
    line = asyncio.run(drive(a.url, workload, a.label))
    with open(a.result, "a") as f:
        f.write(json.dumps(line) + "\n")
    s = summary(line)
    print(f"{a.label}: {s['tokens']} tokens in {s['wall_s']:.1f} s, {s['tok_s']:.1f} tok/s, "
          f"TTFT p50 {s['ttft_p50']:.2f} s, p95 {s['ttft_p95']:.2f} s")


if __name__ == "__main__":
    main()
