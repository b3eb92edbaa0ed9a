#!/usr/bin/env bash
# Whole-gateway benchmark: polygate vs nginx side by side, same upstream, same worker count.
#
#   bench/proxy.sh                 # 1 worker each, 50 connections, 10 s per run, 2 rounds
#   WORKERS=2 CONNS=100 DURATION=15 ROUNDS=3 bench/proxy.sh
#   PIN=1 bench/proxy.sh           # proxies on CPU 1, wrk and the upstream on CPU 0
#
# The upstream is an nginx returning a 1 KiB body (1 worker, access log off). The proxying
# nginx uses `proxy_pass` to a keepalive upstream block; polygate proxies a `/*` route with no
# plugins and the access log off. Each round runs nginx then polygate with wrk on loopback.
# Prints requests/s and p99 for both and polygate/nginx ratios (median over rounds).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
WORKERS="${WORKERS:-1}"; CONNS="${CONNS:-50}"; DURATION="${DURATION:-10}"; ROUNDS="${ROUNDS:-2}"
THREADS="${THREADS:-1}"; PIN="${PIN:-0}"
UP_PORT="${UP_PORT:-18080}"; NGX_PORT="${NGX_PORT:-18081}"; PG_PORT="${PG_PORT:-18082}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"

need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install -y $2" >&2; exit 1; }; }
need nginx nginx; need wrk wrk

echo "building polygate (release)..." >&2
(cd "$root" && cargo build --release -q -p polygate)
PG="$CARGO_TARGET_DIR/release/polygate"

source "$here/common.sh"
bench_workdir

upstream_conf "$work" "$UP_PORT"
cat > "$work/proxy.conf" <<NGX
worker_processes $WORKERS; daemon off; pid $work/px.pid; error_log $work/px.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 256; }
  server { listen 127.0.0.1:$NGX_PORT reuseport;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGX
cat > "$work/polygate.yaml" <<YAML
gateway:
  listeners: [{addr: "127.0.0.1:$PG_PORT"}]
  worker_threads: $WORKERS
  access_log: {enabled: false}
  log_level: warn
routes:
  - id: bench
    uri: /*
    upstream: {nodes: {"127.0.0.1:$UP_PORT": 1}, keepalive_pool: {size: 256}}
#END
YAML
LOAD=(); PROXY=()
if [ "$PIN" = 1 ]; then
  command -v taskset >/dev/null || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 1; }
  LOAD=(taskset -c 0); PROXY=(taskset -c 1)
fi
"${LOAD[@]}" nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)
"${PROXY[@]}" nginx -p "$work" -c "$work/proxy.conf" & pids+=($!)
"${PROXY[@]}" "$PG" run -c "$work/polygate.yaml" 2>"$work/pg.err" & pids+=($!)
for port in $UP_PORT $NGX_PORT $PG_PORT; do
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
curl -s -o /dev/null "http://127.0.0.1:$PG_PORT/" || { echo "polygate did not start:"; cat "$work/pg.err"; exit 1; }

run() { wrk_run "$work/wrk.out" "$1" "${LOAD[@]}"; } # url -> "rps p99_ms"
# warm up both
wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$NGX_PORT/" >/dev/null; wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PG_PORT/" >/dev/null

printf "%-6s %-10s %12s %10s\n" round target "req/s" "p99(ms)"
: > "$work/results"
for r in $(seq "$ROUNDS"); do
  read -r nr np < <(run "http://127.0.0.1:$NGX_PORT/")
  read -r pr pp < <(run "http://127.0.0.1:$PG_PORT/")
  printf "%-6s %-10s %12s %10s\n" "$r" nginx "$nr" "$np" "$r" polygate "$pr" "$pp"
  echo "$nr $np $pr $pp" >> "$work/results"
done
python3 - "$work/results" "$WORKERS" "$CONNS" "$PIN" <<'PY'
import sys, statistics
rows=[list(map(float,l.split())) for l in open(sys.argv[1]) if l.strip()]
med=lambda i: statistics.median(r[i] for r in rows)
nr,np_,pr,pp=med(0),med(1),med(2),med(3)
print(f"\nworkers={sys.argv[2]} connections={sys.argv[3]} pinned={sys.argv[4]} (median of {len(rows)} rounds)")
print(f"nginx    {nr:12.0f} req/s  p99 {np_:.2f} ms")
print(f"polygate {pr:12.0f} req/s  p99 {pp:.2f} ms")
print(f"ratio polygate/nginx: throughput {pr/nr:.2f}x, p99 {pp/np_:.2f}x (lower is better)")
PY
