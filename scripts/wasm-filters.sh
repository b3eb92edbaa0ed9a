#!/usr/bin/env bash
# Builds the proxy-wasm test filters from source into OUT (default
# $CARGO_TARGET_DIR/wasm-filters): the AssemblyScript SDK example (assemblyscript 0.14.13 +
# @solo-io/proxy-runtime 0.1.8) and polygate's SDK-free AssemblyScript filter (assemblyscript
# 0.28.20), both from the npm registry at the versions their package-lock.json pins. The WAT
# fixtures in tests/wasm/wat need no build: polygate loads `.wat` files as they are.
#
#   scripts/wasm-filters.sh [OUT]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export OUT="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}/wasm-filters}"
mkdir -p "$OUT"
command -v npm >/dev/null || { echo "npm is needed to build the AssemblyScript test filters" >&2; exit 1; }
for dir in as-sdk as-filter; do
  d="$root/tests/wasm/$dir"
  # reinstall only when the lock file changed
  stamp="$d/node_modules/.polygate-lock"
  if ! cmp -s "$d/package-lock.json" "$stamp" 2>/dev/null; then
    (cd "$d" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    cp "$d/package-lock.json" "$stamp"
  fi
  (cd "$d" && npm run -s build >/dev/null 2>"$OUT/$dir.log") || { cat "$OUT/$dir.log" >&2; exit 1; }
done
ls "$OUT"/*.wasm
