# Graft — the two commands: `make demo` (set up, fetch assets, build, run the demo) and `make test`.
SWIFT ?= swift
RELEASE_BIN = .build/release/graft

.PHONY: demo test build release setup assets bench clean

demo: setup assets release
	$(RELEASE_BIN) demo

# Tests run optimized (the SIMD kernels are unusably slow unoptimized) in their own build folder, with
# -enable-testing so @testable imports work. Optimized incremental builds can keep a test module compiled
# against an older private layout of a class (seen as a crash in a deinit); `make clean` and rebuild then.
TEST_FLAGS = -c release -Xswiftc -enable-testing --scratch-path .build-test

test: assets
	$(SWIFT) build --build-tests $(TEST_FLAGS)
	$(SWIFT) test --skip-build $(TEST_FLAGS)

setup:
	scripts/setup

assets:
	scripts/fetch-assets

build:
	$(SWIFT) build

release:
	$(SWIFT) build -c release --product graft

bench: assets release
	bench/forward
	bench/train-step

clean:
	rm -rf .build .build-test
