#!/usr/bin/env bash
# Checks that libgraft.so exports exactly the functions include/graft.h declares with GRAFT_API: no declared
# function missing, no undeclared graft_* function exported, and no other function symbol leaking out.
# Usage: tests/c/check-symbols.sh include/graft.h .build/release/libgraft.so
set -euo pipefail
header="${1:?header}" lib="${2:?library}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

grep -E '^GRAFT_API ' "$header" | grep -oE '\bgraft_[a-z0-9_]+\(' | tr -d '(' | sort -u >"$tmp/declared"
nm -D --defined-only "$lib" | awk '$2 ~ /^[TWi]$/ {print $3}' | sort -u >"$tmp/functions"
grep -E '^graft_' "$tmp/functions" >"$tmp/exported" || true

status=0
if ! diff -u "$tmp/declared" "$tmp/exported" >"$tmp/diff"; then
  echo "symbol check: exported graft_* functions differ from graft.h (- declared only, + exported only):" >&2
  cat "$tmp/diff" >&2
  status=1
fi
if grep -vE '^graft_' "$tmp/functions" >"$tmp/others"; then
  echo "symbol check: functions outside the C ABI are exported:" >&2
  head -20 "$tmp/others" >&2
  status=1
fi
if [[ $status -eq 0 ]]; then
  echo "symbol check: $(wc -l <"$tmp/declared") functions declared in $(basename "$header") = exported by $(basename "$lib")"
fi
exit $status
