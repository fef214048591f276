#!/bin/sh
# Graft's GGUF LoRA export checked in real llama.cpp (see check.py). Sets up the llama venv (setup-venv), builds the
# graft CLI and libgraft.so when they are missing, and prints the Markdown report bench/results/gguf-lora-llama-cpp.md
# records. GRAFT and GRAFT_LIB override the binaries; GRAFT_BENCH_PYTHON names a python with torch + transformers for
# llama.cpp's converter (default: the bench/compare venv).
set -e
cd "$(dirname "$0")/../.."
py=$(bench/gguf-lora/setup-venv | tail -n 1)
GRAFT=${GRAFT:-.build/release/graft}
[ -x "$GRAFT" ] || swift build -c release --product graft
GRAFT_LIB=${GRAFT_LIB:-.build/release/libgraft.so}
[ -f "$GRAFT_LIB" ] || make lib
GRAFT="$GRAFT" GRAFT_LIB="$GRAFT_LIB" "$py" bench/gguf-lora/check.py "$@"
