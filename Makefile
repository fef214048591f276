# Graft — the two commands: `make demo` (set up, fetch assets, build, run the demo) and `make test`.
SWIFT ?= swift
# Where the optimized products live. `make test` points these at its own build (see TEST_FLAGS) so that one
# compile of the tree serves the C, Python, Lua, daemon, CLI, crash and MPI stages and the Swift suite alike.
SCRATCH ?= .build
BUILD_FLAGS ?= -c release --scratch-path $(SCRATCH)
RELEASE_BIN = $(SCRATCH)/release/graft

.PHONY: demo test test-stages test-c test-python test-lua test-daemon test-cli test-crash test-mpi bench-scale-out test-sanitize install-lua lib graftd client \
	install build release setup assets bench bench-compare bench-methods bench-moe clean fuzz fuzz-smoke fuzz-build

demo: setup assets release
	$(RELEASE_BIN) demo

# Tests run optimized (the SIMD kernels are unusably slow unoptimized) in their own build folder, with
# -enable-testing so @testable imports work. Optimized incremental builds can keep a test module compiled
# against an older private layout of a class (seen as a crash in a deinit); `make clean` and rebuild then.
TEST_FLAGS = -c release -Xswiftc -enable-testing --scratch-path .build-test

# Every stage runs against the one test build in .build-test: a second optimized compile of the tree (.build) would
# cost CI ten minutes and test nothing the first does not. `make lib`, `make release` and `make demo` still build .build.
test: assets
	$(SWIFT) build --build-tests $(TEST_FLAGS)
	$(MAKE) --no-print-directory test-stages SCRATCH=.build-test BUILD_FLAGS="$(TEST_FLAGS)"

# The Swift suite runs one test at a time: each test already spreads its GEMMs over every core, and two at once
# oversubscribe a 2-core machine (OpenBLAS and the worker pool spin while they wait) and take longer in all.
test-stages: test-c test-python test-lua test-daemon test-cli test-crash test-mpi
	$(SWIFT) test --skip-build --no-parallel $(TEST_FLAGS)

setup:
	scripts/setup

# libgraft.so: SwiftPM names the product GraftCAPI (the CLI owns "graft"); its soname is already libgraft.so.
LIB_DIR = $(SCRATCH)/release
LIBGRAFT = $(LIB_DIR)/libgraft.so
lib:
	$(SWIFT) build $(BUILD_FLAGS) --product GraftCAPI
	cp $(LIB_DIR)/libGraftCAPI.so $(LIBGRAFT)

# The C ABI: the tests (strict C11, then again under AddressSanitizer + UBSan), the exported-symbol check, the
# README's C snippet, an install into a temporary prefix, and examples/c/finetune.c built from it with pkg-config.
CC ?= cc
C_EXAMPLE_FLAGS = -std=c11 -Wall -Wextra -Werror -pedantic -g
C_FLAGS = $(C_EXAMPLE_FLAGS) -Iinclude
C_OUT = .build/c
C_LINK = -L$(LIB_DIR) -lgraft -Wl,-rpath,$(abspath $(LIB_DIR)) -lm -pthread
test-c: assets lib
	mkdir -p $(C_OUT)
	$(CC) $(C_FLAGS) -O2 tests/c/test_capi.c -o $(C_OUT)/test_capi $(C_LINK)
	$(C_OUT)/test_capi
	$(CC) $(C_FLAGS) -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all \
		tests/c/test_capi.c -o $(C_OUT)/test_capi_asan $(C_LINK)
	# LeakSanitizer stays on: the statically linked Swift runtime reports no leaks here. Should a toolchain
	# update make its process-lifetime caches show up, run this line with ASAN_OPTIONS=detect_leaks=0.
	$(C_OUT)/test_capi_asan
	tests/c/check-symbols.sh include/graft.h $(LIBGRAFT)
	tests/c/readme-snippet.sh README.md include $(LIB_DIR)
	@if ldd $(LIBGRAFT) | grep -q libswift; then echo "libgraft.so links the Swift runtime dynamically" >&2; exit 1; fi
	rm -rf $(C_OUT)/prefix
	$(MAKE) --no-print-directory install PREFIX=$(abspath $(C_OUT)/prefix)
	PKG_CONFIG_PATH=$(abspath $(C_OUT)/prefix)/lib/pkgconfig sh -c '$(CC) $(C_EXAMPLE_FLAGS) examples/c/finetune.c \
		-o $(C_OUT)/finetune $$(pkg-config --cflags --libs graft) -Wl,-rpath,$(abspath $(C_OUT)/prefix)/lib'
	$(C_OUT)/finetune "" $(C_OUT)/finetune-adapter

# The Python binding (bindings/python, ctypes over libgraft.so) straight from the checkout: its pytest suite, then
# examples/python/finetune.py capped at 20 steps, and the README's Python snippet. `python3 -m pytest` fails on exit code 5 (no tests collected) too.
PYTHON ?= python3
PY_ENV = PYTHONPATH=$(abspath bindings/python) GRAFT_LIB=$(abspath $(LIBGRAFT))
test-python: assets lib
	$(PY_ENV) $(PYTHON) -m pytest -q bindings/python/tests
	$(PY_ENV) $(PYTHON) examples/python/finetune.py --max-steps 20 --output $(abspath .build/python-lora)
	$(PY_ENV) PYTHON=$(PYTHON) tests/bindings/readme-snippets.sh README.md python

# Data-parallel training over Open MPI (tests/mpi, issue 18; README "Scale-out"): 2 ranks over TCP on loopback against one process
# with the summed batch (MiniLM demo recipe and a SmolLM2 causal LM), a checkpoint of 2 ranks resumed by 1, a
# rank killed mid-run, ranks given different data, libmpi missing, and the Python binding (C ABI) under mpirun.
# About 1 minute; needs openmpi-bin (scripts/setup).
test-mpi: assets lib release
	GRAFT_BIN=$(abspath $(RELEASE_BIN)) GRAFT_LIB=$(abspath $(LIBGRAFT)) $(PYTHON) -m pytest -q -s -p no:cacheprovider tests/mpi

# Crash-safe saves (tests/crash): a trainer process is SIGKILLed 24 times at random moments, most inside checkpoint
# and adapter saves (GRAFT_TEST_SAVE_PAUSE_MS slows saves down for it); after each kill the checkpoint and the
# adapter must load and be one complete save. About 2 minutes; prints how many kills landed inside a save.
test-crash: assets lib
	$(PY_ENV) $(PYTHON) -m pytest -q -s -p no:cacheprovider tests/crash

# The Lua host: bindings/lua/graft.so (a Lua 5.4 C module over graft.h), its test, examples/lua/train.lua and the README's Lua snippet.
LUA ?= lua5.4
LUA_OUT = .build/lua
LUA_SOURCES = bindings/lua/graft.c bindings/lua/arguments.c bindings/lua/trainer.c bindings/lua/combine.c
test-lua: assets lib
	mkdir -p $(LUA_OUT)
	$(CC) $(C_EXAMPLE_FLAGS) -O2 -shared -fPIC $$(pkg-config --cflags lua5.4) -Iinclude $(LUA_SOURCES) \
		-o $(LUA_OUT)/graft.so -L$(LIB_DIR) -lgraft -Wl,-rpath,$(abspath $(LIB_DIR))
	LUA_CPATH="$(abspath $(LUA_OUT))/?.so;;" $(LUA) bindings/lua/test.lua
	LUA_CPATH="$(abspath $(LUA_OUT))/?.so;;" $(LUA) examples/lua/train.lua
	LUA_CPATH="$(abspath $(LUA_OUT))/?.so;;" LUA=$(LUA) tests/bindings/readme-snippets.sh README.md lua
	rm -rf $(LUA_OUT)/prefix
	$(MAKE) --no-print-directory install-lua PREFIX=$(abspath $(LUA_OUT)/prefix)
	LUA_CPATH="$(abspath $(LUA_OUT))/prefix/lib/lua/5.4/?.so" $(LUA) -e 'local g = require "graft"; print("installed Lua module: graft " .. g.version())'

# Installs lib/libgraft.so, include/graft.h and lib/pkgconfig/graft.pc under PREFIX.
PREFIX ?= /usr/local
GRAFT_VERSION = $(shell sed -n 's/^\#define GRAFT_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$$/\2/p' include/graft.h | paste -sd. -)
install: lib
	install -d $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/include
	install -m 755 $(LIBGRAFT) $(DESTDIR)$(PREFIX)/lib/libgraft.so
	install -m 644 include/graft.h $(DESTDIR)$(PREFIX)/include/graft.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(GRAFT_VERSION)|' scripts/graft.pc.in \
		> $(DESTDIR)$(PREFIX)/lib/pkgconfig/graft.pc

# The Lua module under PREFIX/lib/lua/5.4 (Lua's own search path when PREFIX is /usr/local), linked against the
# libgraft.so that `make install` put in PREFIX/lib (found through the rpath).
install-lua: install
	mkdir -p $(LUA_OUT)
	$(CC) $(C_EXAMPLE_FLAGS) -O2 -shared -fPIC $$(pkg-config --cflags lua5.4) -Iinclude $(LUA_SOURCES) \
		-o $(LUA_OUT)/graft-install.so -L$(DESTDIR)$(PREFIX)/lib -lgraft -Wl,-rpath,$(PREFIX)/lib
	install -d $(DESTDIR)$(PREFIX)/lib/lua/5.4
	install -m 755 $(LUA_OUT)/graft-install.so $(DESTDIR)$(PREFIX)/lib/lua/5.4/graft.so

# graftd and its clients: the C client library (bindings/c, protobuf-c) with examples/remote/client.c, and the
# daemon tests (tests/daemon: the Python client end to end, hostile inputs, 64 clients, a killed client, SIGTERM).
GRAFTD = $(SCRATCH)/release/graftd
C_CLIENT_SOURCES = bindings/c/graft_client.c bindings/c/graft.pb-c.c
graftd:
	$(SWIFT) build $(BUILD_FLAGS) --product graftd

client:
	mkdir -p $(C_OUT)/client
	cd $(C_OUT)/client && $(CC) $(C_EXAMPLE_FLAGS) -O2 -fPIC -I$(abspath bindings/c) -c $(abspath $(C_CLIENT_SOURCES))
	ar rcs $(C_OUT)/libgraft_client.a $(C_OUT)/client/graft_client.o $(C_OUT)/client/graft.pb-c.o
	$(CC) $(C_EXAMPLE_FLAGS) -O2 -Ibindings/c examples/remote/client.c -o $(C_OUT)/remote-client -L$(C_OUT) -lgraft_client -lprotobuf-c
	$(CC) $(C_EXAMPLE_FLAGS) -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all \
		-Ibindings/c examples/remote/client.c $(C_CLIENT_SOURCES) -o $(C_OUT)/remote-client-asan -lprotobuf-c

test-daemon: assets lib graftd client release
	$(PY_ENV) GRAFTD=$(abspath $(GRAFTD)) GRAFT_CLI=$(abspath $(RELEASE_BIN)) $(PYTHON) -m pytest -q tests/daemon
	tests/daemon/run-c-client.sh $(GRAFTD) $(C_OUT)/remote-client $(C_OUT)/remote-client-asan

# The CLI as a user runs it (tests/cli): step budgets, held-out evaluation, what the saved adapter records.
test-cli: assets release
	GRAFT_CLI=$(abspath $(RELEASE_BIN)) $(PYTHON) -m pytest -q tests/cli

# The Swift side under sanitizers: libgraft (GraftCAPI) and graftd built with -sanitize=address in .build-asan,
# graftd with -sanitize=thread in .build-tsan. The C tests run against the ASan libgraft, compiled by the Swift
# toolchain's clang so that one AddressSanitizer runtime (clang's, linked into the test program) serves both;
# gcc's libasan cannot be mixed with it. The daemon tests (Python and C clients) run against each sanitized
# graftd; the Python side keeps the plain libgraft. Any report fails the run (halt_on_error; LeakSanitizer on).
# lld (shipped with the toolchain) links the test quietly; gold warns about every ASan-internal symbol.
# Not in .ci/run (two more optimized builds of the tree would take CI past its time budget): run it before
# each release, see the README.
ASAN_BUILD = $(SWIFT) build -c release --scratch-path .build-asan -Xswiftc -sanitize=address
TSAN_BUILD = $(SWIFT) build -c release --scratch-path .build-tsan -Xswiftc -sanitize=thread
SWIFT_CLANG = $(dir $(realpath $(shell command -v $(SWIFT))))clang
ASAN_LIB_DIR = .build-asan/release
SAN_OPTIONS = ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:abort_on_error=0 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$(abspath tests/sanitize/tsan.supp)"
test-sanitize: assets lib client
	$(ASAN_BUILD) --product GraftCAPI
	cp $(ASAN_LIB_DIR)/libGraftCAPI.so $(ASAN_LIB_DIR)/libgraft.so
	mkdir -p .build-asan/c
	$(SWIFT_CLANG) $(C_FLAGS) -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all \
		-fuse-ld=lld tests/c/test_capi.c -o .build-asan/c/test_capi -L$(ASAN_LIB_DIR) -lgraft \
		-Wl,-rpath,$(abspath $(ASAN_LIB_DIR)) -lm -pthread
	$(SAN_OPTIONS) .build-asan/c/test_capi
	$(ASAN_BUILD) --product graftd
	$(SAN_OPTIONS) $(PY_ENV) GRAFTD=$(abspath .build-asan/release/graftd) $(PYTHON) -m pytest -q -p no:cacheprovider tests/daemon
	$(SAN_OPTIONS) tests/daemon/run-c-client.sh .build-asan/release/graftd $(C_OUT)/remote-client $(C_OUT)/remote-client-asan
	$(TSAN_BUILD) --product graftd
	$(SAN_OPTIONS) $(PY_ENV) GRAFTD=$(abspath .build-tsan/release/graftd) $(PYTHON) -m pytest -q -p no:cacheprovider tests/daemon
	$(SAN_OPTIONS) tests/daemon/run-c-client.sh .build-tsan/release/graftd $(C_OUT)/remote-client $(C_OUT)/remote-client-asan

assets:
	scripts/fetch-assets

# libFuzzer targets (scripts/fuzz, Fuzz/): the safetensors and GGUF readers, adapter_config.json, graftd's frame
# decoder + Request decoding, and the tokenizers, built with -sanitize=fuzzer,address in .build-fuzz.
# `make fuzz` runs each for FUZZ_SECONDS; `make fuzz-smoke` runs each for FUZZ_SMOKE_RUNS executions and replays
# every committed crasher in Fuzz/regressions (CI runs it from .ci/run).
FUZZ_SECONDS ?= 60
FUZZ_SMOKE_RUNS ?= 3000
fuzz-build:
	scripts/fuzz build

fuzz: assets fuzz-build
	scripts/fuzz all $(FUZZ_SECONDS)

# The smoke run builds its targets unoptimized (FUZZ_CONFIG=debug): a few thousand executions need no optimizer, and
# the unoptimized compile of the tree is several times faster than the release one.
fuzz-smoke: assets
	FUZZ_CONFIG=debug scripts/fuzz build
	FUZZ_CONFIG=debug scripts/fuzz smoke $(FUZZ_SMOKE_RUNS)

build:
	$(SWIFT) build

release:
	$(SWIFT) build $(BUILD_FLAGS) --product graft

# Data-parallel scale-out (issue 18): 1, 2, 4 ranks and two network namespaces over veth (root + iproute2).
bench-scale-out: assets release
	bench/scale-out/run

bench: assets release
	bench/forward
	bench/train-step
	bench/mixed-adapters
	bench/ctypes-overhead
	bench/daemon

# Graft against PyTorch + transformers + PEFT on the same work in one run (issue 12): bench/compare/setup-venv makes
# a private venv (pinned, outside the checkout; ~2.8 GB the first time), then bench/compare/run.py runs each
# workload on both engines, each in its own process, and prints one table (48 min under heavy load). Asserts nothing.
# BENCH_ARGS passes options on, e.g. BENCH_ARGS="--only a,b --runs 7".
BENCH_ARGS ?=
# Every method in the catalog at a common trainable budget (issue 15): MiniLM demo recipe over 3 seeds, SmolLM2
# perplexity; resumable (runs already in bench/results/methods/runs.jsonl are skipped), hours for the whole catalog.
bench-methods: assets release lib
	bench/methods/run $(BENCH_ARGS)

bench-moe: assets release
	bench/moe/run $(BENCH_ARGS)

bench-compare: assets release
	@py="$$(bench/compare/setup-venv)" && "$$py" bench/compare/run.py --graft $(RELEASE_BIN) $(BENCH_ARGS)

clean:
	rm -rf .build .build-test .build-fuzz .build-asan .build-tsan
