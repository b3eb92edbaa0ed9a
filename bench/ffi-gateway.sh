#!/usr/bin/env bash
# Gateway requests/s with the ffi plugin calling the Go echo runtime on every request, vs the
# same route without the plugin, in one polygate process (same upstream, same worker count).
#
#   bench/ffi-gateway.sh                     # 1 worker, 50 connections, 10 s per run, 3 rounds
#   WORKERS=2 DURATION=15 bench/ffi-gateway.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
WORKERS="${WORKERS:-1}"; CONNS="${CONNS:-50}"; DURATION="${DURATION:-10}"; ROUNDS="${ROUNDS:-3}"
UP_PORT="${UP_PORT:-18080}"; PG_PORT="${PG_PORT:-18083}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"
source "$root/bench/common.sh"
need_tools nginx wrk
bench_workdir

(cd "$root" && cargo build --release -q -p polygate)
(cd "$root/examples/go" && go build -buildmode=c-shared -o "$work/libffi_go_echo.so" ./echo)
upstream_conf "$work" "$UP_PORT"
{ polygate_conf_head "$PG_PORT" "$WORKERS" "$UP_PORT"; cat <<YAML; } > "$work/polygate.yaml"
  - id: ffi
    uri: /ffi
    upstream_id: up
    plugins:
      ffi: {lib: "$work/libffi_go_echo.so", cfg: continue}
#END
YAML
nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)
"$CARGO_TARGET_DIR/release/polygate" run -c "$work/polygate.yaml" 2>"$work/pg.err" & pids+=($!)
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$PG_PORT/plain" && break; sleep 0.1; done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PG_PORT/ffi")" = 200 ] || { echo "ffi route failed"; cat "$work/pg.err"; exit 1; }

run() { wrk_run "$work/wrk.out" "$1"; } # url -> "rps p99_ms"
wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PG_PORT/plain" >/dev/null
wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PG_PORT/ffi" >/dev/null
: > "$work/res"
printf "%-6s %-8s %12s %10s\n" round route "req/s" "p99(ms)"
for r in $(seq "$ROUNDS"); do
  read -r pr pp < <(run "http://127.0.0.1:$PG_PORT/plain")
  read -r fr fp < <(run "http://127.0.0.1:$PG_PORT/ffi")
  printf "%-6s %-8s %12s %10s\n%-6s %-8s %12s %10s\n" "$r" plain "$pr" "$pp" "$r" ffi "$fr" "$fp"
  echo "$pr $fr" >> "$work/res"
done
python3 - "$work/res" "$WORKERS" <<'PY'
import sys, statistics
rows=[list(map(float,l.split())) for l in open(sys.argv[1]) if l.strip()]
p=statistics.median(r[0] for r in rows); f=statistics.median(r[1] for r in rows)
print(f"\nworkers={sys.argv[2]} (median of {len(rows)} rounds): plain {p:.0f} req/s, ffi {f:.0f} req/s, ffi/plain {f/p:.2f}x")
PY
