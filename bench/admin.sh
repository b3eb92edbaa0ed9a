#!/usr/bin/env bash
# Control-plane benchmark: one etcd, two polygate processes reading it, $ROUTES routes.
#
#   1. RSS of each process with $ROUTES routes loaded (target <= 100 MB)
#   2. propagation: $CHANGES route changes through one process's Admin API, each timed from
#      the PUT until both processes serve it (p50/p99/max; target p99 <= 100 ms)
#   3. the data plane during a burst of route updates (at least $BURST, and for the whole wrk
#      run) vs without (wrk on a route that does not change; target >= 0.9x)
#
#   bench/admin.sh
#   ROUTES=10000 CHANGES=200 BURST=1000 DURATION=10 bench/admin.sh
#
# Needs etcd (etcd-server), nginx (the upstream), wrk, python3.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
ROUTES="${ROUTES:-10000}"; CHANGES="${CHANGES:-200}"; BURST="${BURST:-1000}"
DURATION="${DURATION:-10}"; CONNS="${CONNS:-50}"; WORKERS="${WORKERS:-1}"
ETCD_PORT="${ETCD_PORT:-18379}"; UP_PORT="${UP_PORT:-18380}"
PG1="${PG1:-18381}"; PG2="${PG2:-18382}"; AD1="${AD1:-18391}"; AD2="${AD2:-18392}"
KEY=edd1c9f034335f136f87ad84b625c8f1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"

source "$here/common.sh"
need_tools etcd nginx wrk python3 curl

echo "building polygate (release)..." >&2
(cd "$root" && cargo build --release -q -p polygate)
PG="$CARGO_TARGET_DIR/release/polygate"
bench_workdir
drv() { python3 "$here/admin_driver.py" "$@"; }

etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" --log-level error \
  > "$work/etcd.log" 2>&1 &
pids+=($!)
upstream_conf "$work" "$UP_PORT"
nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
for i in $(seq 50); do curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null && break; sleep 0.2; done

echo "loading $ROUTES routes into etcd..." >&2
t0=$(date +%s.%N)
drv load "http://127.0.0.1:$ETCD_PORT" "$ROUTES" "127.0.0.1:$UP_PORT"
drv_load=$(echo "$(date +%s.%N) - $t0" | bc)

for n in 1 2; do
  port=$([ $n = 1 ] && echo $PG1 || echo $PG2); adm=$([ $n = 1 ] && echo $AD1 || echo $AD2)
  cat > "$work/pg$n.yaml" <<YAML
gateway:
  listeners: [{addr: "127.0.0.1:$port"}]
  worker_threads: $WORKERS
  access_log: {enabled: false}
  log_level: warn
  config_provider: etcd
  etcd: {host: ["http://127.0.0.1:$ETCD_PORT"]}
  admin: {addr: "127.0.0.1:$adm", admin_key: [{key: $KEY}]}
#END
YAML
  "$PG" run -c "$work/pg$n.yaml" 2> "$work/pg$n.err" & pids+=($!)
  eval "pid$n=$!"
done
t0=$(date +%s.%N)
drv wait "$PG1" "/r/$((ROUTES - 1))" 120
drv wait "$PG2" "/r/$((ROUTES - 1))" 120
ready=$(echo "$(date +%s.%N) - $t0" | bc)
sleep 1
rss1=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid1/status")
rss2=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid2/status")

echo "propagating $CHANGES changes..." >&2
read -r p50 p99 pmax < <(drv propagate "$AD1" "$KEY" "$PG1,$PG2" "$CHANGES")

echo "data plane with and without a burst of $BURST updates..." >&2
read -r base_rps base_p99 < <(wrk_run "$work/wrk1.out" "http://127.0.0.1:$PG1/r/1")
drv burst "$AD1" "$KEY" "$BURST" "$DURATION" > "$work/burst.out" &
bpid=$!
read -r burst_rps burst_p99 < <(wrk_run "$work/wrk2.out" "http://127.0.0.1:$PG1/r/1")
wait "$bpid"
read -r updates updates_per_s < "$work/burst.out"

echo
echo "routes in etcd:                 $ROUTES (written in ${drv_load}s)"
echo "both processes serving them:    ${ready}s after start"
echo "RSS with $ROUTES routes:        ${rss1} MB / ${rss2} MB (target <= 100 MB)"
echo "Admin API PUT -> served by both: p50 ${p50} ms, p99 ${p99} ms, max ${pmax} ms (target p99 <= 100 ms)"
echo "data plane req/s, no updates:   $base_rps (p99 ${base_p99} ms)"
echo "data plane req/s, $updates updates at ${updates_per_s}/s: $burst_rps (p99 ${burst_p99} ms)"
echo "ratio during the burst:         $(echo "scale=2; $burst_rps / $base_rps" | bc)x (target >= 0.9x)"
