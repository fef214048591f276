#!/usr/bin/env bash
# Runs examples/remote/client.c against a fresh graftd: over the Unix socket, over TCP with the token, and
# the AddressSanitizer build over the Unix socket. Usage: run-c-client.sh GRAFTD CLIENT CLIENT_ASAN
set -euo pipefail
graftd=$1 client=$2 client_asan=$3
dir=$(mktemp -d "${TMPDIR:-/tmp}/graftd-c.XXXXXX")
echo "c-client-token-$$" > "$dir/token"
"$graftd" --socket "$dir/graftd.sock" --port 0 --token-file "$dir/token" --threads 2 > "$dir/out" 2> "$dir/log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do grep -q listening "$dir/out" 2>/dev/null && break; sleep 0.1; done
port=$(sed -n 's/.*tcp:127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/out")
[[ -n $port ]] || { echo "graftd did not start:"; cat "$dir/out" "$dir/log"; exit 1; }
"$client" unix "$dir/graftd.sock" "$dir/lora-unix"
"$client" tcp 127.0.0.1 "$port" "$dir/token" "$dir/lora-tcp"
"$client_asan" unix "$dir/graftd.sock" "$dir/lora-asan" > /dev/null
test -f "$dir/lora-unix/adapter_model.safetensors" -a -f "$dir/lora-tcp/adapter_config.json"
kill -TERM $pid
wait $pid
trap 'rm -rf "$dir"' EXIT
echo "C client: unix, tcp and sanitized runs passed; graftd exited 0 on SIGTERM"
