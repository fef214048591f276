#!/usr/bin/env bash
# Compiles the C snippet of README.md's "## C" section exactly as printed, so it keeps compiling when pasted.
# Usage: tests/c/readme-snippet.sh README.md <include dir> <lib dir>
set -euo pipefail
readme="${1:?README}" include="${2:?include dir}" libdir="${3:?lib dir}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The first ```c block after the "## C" heading.
awk '/^## C$/ {sect=1} sect && /^```c$/ {code=1; next} code && /^```$/ {exit} code {print}' "$readme" >"$tmp/snippet.c"
[[ -s "$tmp/snippet.c" ]] || { echo "readme snippet: no \`\`\`c block under '## C' in $readme" >&2; exit 1; }
${CC:-cc} -std=c11 -Wall -Wextra -Werror -pedantic -I"$include" "$tmp/snippet.c" -o "$tmp/snippet" -L"$libdir" -lgraft
echo "readme snippet: the C example in $(basename "$readme") compiles ($(wc -l <"$tmp/snippet.c") lines)"
