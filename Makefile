# The two commands of the quick start: `make demo` and `make test`. Both install what is
# missing first (scripts/setup.sh), so they work on a fresh machine.
CARGO ?= cargo
MODEL ?= $(shell scripts/setup.sh --model-path)
RELEASE := target/release

.PHONY: setup demo test serve bench-http bench bench-smoke bench-prefix bench-constraints bench-compare bench-compare-smoke header lint clean reliability sanitize soak fuzz fuzz-smoke install

setup:
	@scripts/setup.sh

# Builds the library and the C demo, then streams four concurrent chat answers.
demo: setup
	$(CARGO) build --release --lib
	cc -std=c11 -O2 -Wall -Wextra -Werror examples/demo.c -Iinclude -L$(RELEASE) -lconvoy -lpthread \
	   -Wl,-rpath,$(CURDIR)/$(RELEASE) -o $(RELEASE)/convoy-demo
	$(RELEASE)/convoy-demo $(MODEL)

# The OpenAI-compatible HTTP server (server/) on the bundled model: http://127.0.0.1:8080.
SERVE_ARGS ?=
serve: setup
	$(CARGO) run --release -p convoy-server -- --model $(MODEL) $(SERVE_ARGS)

# Unit tests, integration tests on the real model, C API tests, and a tiny benchmark run.
# fault-injection: test hooks that fail the engine thread on purpose (never in shipped builds).
TEST_FEATURES = --features fault-injection
test: setup
	$(CARGO) build --workspace --lib --bins $(TEST_FEATURES)   # the C tests link libconvoy.so / libconvoy.a
	$(CARGO) test --workspace $(TEST_FEATURES)
	target/debug/convoy-bench $(SMOKE_ARGS)
	scripts/bench-compare.sh --smoke --only convoy --bench target/debug/convoy-bench --out target/bench-compare-smoke-convoy
	target/debug/convoy-bench --model $(MODEL) --prefix-cache --smoke --out target/bench-prefix-smoke
	target/debug/convoy-bench --model $(MODEL) --constraints --smoke --out target/bench-constraints-smoke
	scripts/bench-http.sh --smoke --bin-dir target/debug --out target/bench-http-smoke

# The long reliability runs (docs/reliability.md): many randomized sequences on the real model
# with prompts up to 2,000 tokens, the C API tests under ASan + UBSan, every fuzz input replayed
# through its harness, and a 1,000-request soak. Results land in target/reliability/.
RELIABILITY_SEQUENCES ?= 60
reliability: setup
	mkdir -p target/reliability
	$(MAKE) sanitize
	$(MAKE) fuzz-smoke
	CONVOY_RELIABILITY_SEQUENCES=$(RELIABILITY_SEQUENCES) CONVOY_RELIABILITY_LONG=1 \
	  CONVOY_RELIABILITY_REPORT=$(CURDIR)/target/reliability/sequences.jsonl \
	  $(CARGO) test --release $(TEST_FEATURES) --test reliability -- --nocapture
	$(MAKE) soak

# Coverage-guided fuzzing with cargo-afl (AFL++): every parser of untrusted bytes and the C ABI,
# 1M executions per parser target (hours on 2 cores; FUZZ_ARGS="--execs N" or "--seconds S"
# for shorter runs, or target names). Findings: fuzz/target/fuzz-out/<target>.
FUZZ_ARGS ?=
fuzz: setup
	scripts/fuzz.sh $(FUZZ_ARGS)

# Builds the harnesses and replays every seed and committed finding once (no AFL).
fuzz-smoke: setup
	scripts/fuzz.sh --smoke

sanitize: setup
	$(CARGO) build --lib $(TEST_FEATURES)
	scripts/sanitize.sh target/debug

soak: setup
	$(CARGO) run --release --bin convoy-soak -- --model $(MODEL) --out target/reliability --requests 1000 --threads 8

bench: setup
	$(CARGO) run --release --bin convoy-bench -- --model $(MODEL) --out bench-results

# convoy against mlx-lm 0.32.2 (pinned, in a venv in the cache) on the same machine, model
# (float32 MLX folder), MLX and BLAS, side by side in one run: closed loops at c = 1, 2, 4, 8,
# 16 and a mixed Poisson workload. Writes bench-results/compare/{report.md, summary.jsonl,
# compare.png, results.jsonl}. About 25 minutes on 2 cores.
bench-compare: setup
	scripts/bench-compare.sh $(BENCH_COMPARE_ARGS)

# The prefix cache off and on (issue 10): 8 chats of 6 turns arriving interleaved, and a burst of
# 8 requests sharing a long system prompt. Writes bench-results/prefix-cache.{md,jsonl}. About
# 6 minutes on 2 cores.
bench-prefix: setup
	$(CARGO) run --release --bin convoy-bench -- --model $(MODEL) --prefix-cache --out bench-results

# Structured output's cost: tokens/s with and without constraints at batch 1 and 8
# (bench-results/constraints.md). About 5 minutes.
bench-constraints: setup
	$(CARGO) run --release --bin convoy-bench -- --model $(MODEL) --constraints --out bench-results

# convoy in-process and through convoy-server (the openai client, 64 streams in flight) on
# one workload, alternating, twice each: bench-results/http/report.md. About 10 minutes.
bench-http: setup
	scripts/bench-http.sh

# The same pipeline at a tiny size: both engines run every workload and the report is built.
bench-compare-smoke: setup
	scripts/bench-compare.sh --smoke --out target/bench-compare-smoke

# The benchmark once at a tiny size: proves it runs and writes sane output.
SMOKE_ARGS = --model $(MODEL) --out target/bench-smoke --n 2 --max-tokens 4 --prompt-len 16 --concurrency 1,2 --smoke
bench-smoke:
	$(CARGO) run --bin convoy-bench -- $(SMOKE_ARGS)

# Installs the release library, headers, pkg-config files (convoy.pc, convoy-static.pc) and the
# MLX/OpenBLAS runtime it needs into $(DESTDIR)$(PREFIX), as a tree that can be moved
# (relative rpaths; see scripts/install.sh).
PREFIX ?= /usr/local
install:
	@scripts/setup.sh --no-model
	$(CARGO) build --release --lib
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" scripts/install.sh --lib-dir $(RELEASE)

# Regenerates include/convoy.h after changing src/ffi (tests fail while it is stale).
header:
	CONVOY_UPDATE_HEADER=1 $(CARGO) build --lib

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
