#!/usr/bin/env bash
# lua-resty-ffi's published benchmark, reproduced: 100,000 sequential echo calls with 512 B,
# 4 KiB, 10 KiB and 100 KiB payloads, through polygate's FFI host to the Go echo runtime, vs
# the same Go echo logic behind a unix domain socket (length-prefixed). Run pinned to one CPU
# (taskset -c 0 for every process) and unpinned; prints seconds and the socket/FFI ratio.
#
#   bench/ffi.sh            # CALLS=100000
#   CALLS=20000 bench/ffi.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
CALLS="${CALLS:-100000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"
work="$(mktemp -d)"; srv=""
cleanup() { [ -n "$srv" ] && kill "$srv" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

echo "building (release)..." >&2
(cd "$root" && cargo build --release -q -p polygate-ffi-bench)
(cd "$root/examples/go" && go build -buildmode=c-shared -o "$work/libffi_go_echo.so" ./echo && go build -o "$work/udsecho" ./udsecho)
BENCH="$CARGO_TARGET_DIR/release/polygate-ffi-bench"

for mode in pinned unpinned; do
  if [ "$mode" = pinned ]; then PIN=(taskset -c 0); else PIN=(); fi
  "${PIN[@]}" "$work/udsecho" "$work/echo.sock" & srv=$!
  for _ in $(seq 50); do [ -S "$work/echo.sock" ] && break; sleep 0.1; done
  echo; echo "== $mode ($CALLS sequential calls per payload)"
  "${PIN[@]}" "$BENCH" "$work/libffi_go_echo.so" "$work/echo.sock" "$CALLS"
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
  rm -f "$work/echo.sock"
done
