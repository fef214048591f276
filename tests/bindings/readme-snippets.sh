#!/usr/bin/env bash
# Runs the README's Python or Lua snippet exactly as printed, so it keeps working when pasted.
# Usage: tests/bindings/readme-snippets.sh README.md python|lua   (PYTHONPATH/GRAFT_LIB or LUA_CPATH set by make)
set -euo pipefail
readme="${1:?README}" lang="${2:?python|lua}"
case "$lang" in python) heading="## Python" ;; lua) heading="## Lua" ;; *) echo "unknown language $lang" >&2; exit 2 ;; esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
awk -v h="$heading" -v fence="\`\`\`$lang" '$0 == h {sect=1; next} sect && /^## / {exit} sect && $0 == fence {code=1; next}
  code && /^```$/ {exit} code {print}' "$readme" >"$tmp/snippet"
[[ -s "$tmp/snippet" ]] || { echo "readme snippet: no \`\`\`$lang block under '$heading' in $readme" >&2; exit 1; }
# Run from a scratch directory so the snippet's relative output paths (out/...) land there.
root=$(pwd)
cd "$tmp"
if [[ $lang == python ]]; then ${PYTHON:-python3} snippet; else ${LUA:-lua5.4} snippet; fi
cd "$root"
echo "readme snippet: the $lang example in $(basename "$readme") runs ($(wc -l <"$tmp/snippet") lines)"
