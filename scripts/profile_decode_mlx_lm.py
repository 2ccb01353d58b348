#!/usr/bin/env python3
"""mlx-lm's model alone, the same measurement as `convoy-bench --profile-decode B`:
B rows with T cached tokens (one prefill), 3 warm-up steps, then S timed greedy decode
steps, each evaluated. Usage: profile_decode_mlx_lm.py MODEL_DIR B T S"""
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

model, _ = load_model(Path(sys.argv[1]))
b, t, steps = (int(x) for x in sys.argv[2:5])
cache = make_prompt_cache(model)
prompt = mx.array([[(r * 7 + i) % 40000 + 100 for i in range(t)] for r in range(b)])
start = time.perf_counter()
model(prompt, cache=cache)
mx.eval([c.state for c in cache])
prefill = time.perf_counter() - start
y = mx.ones((b, 1), dtype=mx.int32)


def step(y):
    logits = model(y, cache=cache)[:, -1, :]
    nxt = mx.argmax(logits, axis=-1)
    mx.eval(nxt)
    return nxt[:, None]


for _ in range(3):
    y = step(y)
start = time.perf_counter()
for _ in range(steps):
    y = step(y)
per = (time.perf_counter() - start) / steps
print(json.dumps({"engine": "mlx-lm", "batch": b, "context": t, "prefill_s": prefill,
                  "prefill_tok_s": b * t / prefill, "decode_step_ms": per * 1e3,
                  "decode_tok_s": b / per}))
