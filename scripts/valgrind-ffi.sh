#!/usr/bin/env bash
# Runs the FFI host tests (Rust host + real C runtimes: queues, tasks, exports, unload,
# timeouts, cancellation, 10,000 concurrent calls) under valgrind's memcheck. Fails on any
# memory error and on definitely-lost memory. Part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install -y valgrind" >&2; exit 1; }
bin=$(cargo test -q -p polygate-ffi --test host --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "host" and m.get("executable"):
        print(m["executable"])')
POLYGATE_UNDER_VALGRIND=1 valgrind --error-exitcode=9 --leak-check=full --show-leak-kinds=definite \
  --errors-for-leak-kinds=definite -q "$bin" --test-threads=2
