# The two commands of the quick start: `make demo` and `make test`. Both install what is
# missing first (scripts/setup.sh), so they work on a fresh machine.
CARGO ?= cargo
MODEL ?= $(shell scripts/setup.sh --model-path)
RELEASE := target/release

.PHONY: setup demo test bench bench-smoke header lint clean

setup:
	@scripts/setup.sh

# Builds the library and the C demo, then streams four concurrent chat answers.
demo: setup
	$(CARGO) build --release --lib
	cc -std=c11 -O2 -Wall -Wextra -Werror examples/demo.c -Iinclude -L$(RELEASE) -lconvoy -lpthread \
	   -Wl,-rpath,$(CURDIR)/$(RELEASE) -o $(RELEASE)/convoy-demo
	$(RELEASE)/convoy-demo $(MODEL)

# Unit tests, integration tests on the real model, C API tests, and a tiny benchmark run.
test: setup
	$(CARGO) build --workspace --lib --bins   # the C tests link libconvoy.so / libconvoy.a
	$(CARGO) test --workspace
	target/debug/convoy-bench $(SMOKE_ARGS)

bench: setup
	$(CARGO) run --release --bin convoy-bench -- --model $(MODEL) --out bench-results

# The benchmark once at a tiny size: proves it runs and writes sane output.
SMOKE_ARGS = --model $(MODEL) --out target/bench-smoke --n 2 --max-tokens 4 --prompt-len 16 --concurrency 1,2 --smoke
bench-smoke:
	$(CARGO) run --bin convoy-bench -- $(SMOKE_ARGS)

# Regenerates include/convoy.h after changing src/ffi (tests fail while it is stale).
header:
	CONVOY_UPDATE_HEADER=1 $(CARGO) build --lib

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
