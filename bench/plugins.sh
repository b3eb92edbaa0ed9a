#!/usr/bin/env bash
# The cost of the plugins most routes carry, in one run, against the same gateway's plain route:
#   plain   /plain                               no plugins
#   stack   /stack   key-auth + limit-count (local) + prometheus   (target >= 0.90x plain)
#   redis   /redis   limit-count with the redis policy              (target >= 0.75x plain)
#
#   bench/plugins.sh                      # 1 worker, 50 connections, 10 s per run, 3 rounds
#   WORKERS=2 CONNS=100 DURATION=15 ROUNDS=3 PIN=1 bench/plugins.sh
#
# The upstream is an nginx answering 1 KiB; Redis is Debian's redis-server on loopback
# (persistence off). Every limit is far above what a run sends, so all requests pass the
# plugins' full path. Prints req/s and p99 per route and the ratios to the plain route
# (median over rounds); the routes take turns within each round.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
WORKERS="${WORKERS:-1}"; CONNS="${CONNS:-50}"; DURATION="${DURATION:-10}"; ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-1}"; PIN="${PIN:-0}"
UP_PORT="${UP_PORT:-18180}"; PG_PORT="${PG_PORT:-18182}"; REDIS_PORT="${REDIS_PORT:-18183}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"

source "$here/common.sh"
need_tools nginx wrk redis-server curl
echo "building polygate (release)..." >&2
(cd "$root" && cargo build --release -q -p polygate)
PG="$CARGO_TARGET_DIR/release/polygate"
bench_workdir

upstream_conf "$work" "$UP_PORT"
{
  polygate_conf_head "$PG_PORT" "$WORKERS" "$UP_PORT"
  cat <<YAML
  - id: stack
    uri: /stack
    upstream_id: up
    plugins:
      key-auth: {}
      limit-count: {count: 1000000000000, time_window: 3600, key: consumer_name}
      prometheus: {}
  - id: redis
    uri: /redis
    upstream_id: up
    plugins:
      limit-count: {count: 1000000000000, time_window: 3600, policy: redis, redis_host: 127.0.0.1, redis_port: $REDIS_PORT}
consumers:
  - username: bench
    plugins:
      key-auth: {key: bench-key}
#END
YAML
} > "$work/polygate.yaml"
LOAD=(); PROXY=()
if [ "$PIN" = 1 ]; then
  need_tools taskset
  LOAD=(taskset -c 0); PROXY=(taskset -c 1)
fi
"${LOAD[@]}" nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)
"${LOAD[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --loglevel warning >/dev/null & pids+=($!)
"${PROXY[@]}" "$PG" run -c "$work/polygate.yaml" 2>"$work/pg.err" & pids+=($!)
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$PG_PORT/plain" && break; sleep 0.1; done
for path in plain stack redis; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'apikey: bench-key' "http://127.0.0.1:$PG_PORT/$path")
  [ "$code" = 200 ] || { echo "/$path answered $code:"; cat "$work/pg.err"; exit 1; }
done

run() { # path -> "rps p99_ms"
  local out="$work/wrk.out"
  "${LOAD[@]}" wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H 'apikey: bench-key' \
    "http://127.0.0.1:$PG_PORT/$1" > "$out" 2>&1
  if grep -q "Non-2xx" "$out"; then echo "warning: /$1: $(grep Non-2xx "$out")" >&2; fi
  awk '/Requests\/sec/ {r=$2} $1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; p=v} END {print r, p}' "$out"
}
for path in plain stack redis; do wrk -t1 -c"$CONNS" -d2s -H 'apikey: bench-key' "http://127.0.0.1:$PG_PORT/$path" >/dev/null; done

printf "%-6s %-7s %12s %10s\n" round route "req/s" "p99(ms)"
: > "$work/results"
for r in $(seq "$ROUNDS"); do
  line=""
  for path in plain stack redis; do
    read -r rps p99 < <(run "$path")
    printf "%-6s %-7s %12s %10s\n" "$r" "$path" "$rps" "$p99"
    line="$line $rps $p99"
  done
  echo "$line" >> "$work/results"
done
python3 - "$work/results" "$WORKERS" "$CONNS" "$PIN" <<'PY'
import sys, statistics
rows=[list(map(float,l.split())) for l in open(sys.argv[1]) if l.strip()]
med=lambda i: statistics.median(r[i] for r in rows)
plain, stack, redis = med(0), med(2), med(4)
print(f"\nmedian of {len(rows)} rounds, {sys.argv[2]} worker(s), {sys.argv[3]} connections, pinned={sys.argv[4]}")
print(f"plain  {plain:10.0f} req/s  p99 {med(1):.2f} ms")
print(f"stack  {stack:10.0f} req/s  p99 {med(3):.2f} ms   {stack/plain:.2f}x plain (target >= 0.90)")
print(f"redis  {redis:10.0f} req/s  p99 {med(5):.2f} ms   {redis/plain:.2f}x plain (target >= 0.75)")
PY
