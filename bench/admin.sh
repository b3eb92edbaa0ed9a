#!/usr/bin/env bash
# Control-plane benchmark: one etcd, two polygate processes reading it, $ROUTES routes.
#
#   1. RSS of each process with $ROUTES routes loaded (target <= 100 MB)
#   2. propagation: $CHANGES route changes through one process's Admin API, each timed from
#      the PUT until both processes serve it (p50/p99/max; target p99 <= 100 ms)
#   3. the data plane during a burst of $BURST route updates through the Admin API, spread
#      over the $DURATION s of a wrk run, vs the same wrk run without updates (wrk on a route
#      that does not change; target >= 0.9x)
#
#   bench/admin.sh
#   ROUTES=10000 CHANGES=200 BURST=1000 DURATION=10 bench/admin.sh
#   THREADS_CPU=1 bench/admin.sh   (also shows the first process's threads' CPU during the burst)
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

# PIN=1 (default with 2+ CPUs): the data plane (the first process's worker threads, wrk and the
# upstream) on CPU 0, the control plane (etcd, the driver, the second process, the first
# process's other threads) on CPU 1, so the burst measures what updates cost polygate's data
# path rather than the machine's CPU shared with etcd and the load driver. PIN=0 shares both.
PIN="${PIN:-$([ "$(nproc)" -ge 2 ] && echo 1 || echo 0)}"
DP=(); CP=()
if [ "$PIN" = 1 ]; then DP=(taskset -c 0); CP=(taskset -c 1); fi
"${CP[@]}" etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 100))" --log-level error \
  > "$work/etcd.log" 2>&1 &
pids+=($!)
upstream_conf "$work" "$UP_PORT"
"${DP[@]}" nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
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
  "${CP[@]}" "$PG" run -c "$work/pg$n.yaml" 2> "$work/pg$n.err" & pids+=($!)
  eval "pid$n=$!"
done
t0=$(date +%s.%N)
if [ "$PIN" = 1 ]; then
  sleep 0.5
  for t in /proc/"$pid1"/task/*; do
    grep -q '^polygate-worker' "$t/comm" && taskset -pc 0 "$(basename "$t")" >/dev/null
  done
fi
drv wait "$PG1" "/r/$((ROUTES - 1))" 120
drv wait "$PG2" "/r/$((ROUTES - 1))" 120
ready=$(echo "$(date +%s.%N) - $t0" | bc)
sleep 1
rss1=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid1/status")
rss2=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid2/status")

echo "propagating $CHANGES changes..." >&2
read -r p50 p99 pmax < <(drv propagate "$AD1" "$KEY" "$PG1,$PG2" "$CHANGES")

echo "data plane with and without a burst of $BURST updates..." >&2
read -r base_rps base_p99 < <(wrk_run "$work/wrk1.out" "http://127.0.0.1:$PG1/r/1" "${DP[@]}")
"${CP[@]}" python3 "$here/admin_driver.py" burst "$AD1" "$KEY" "$BURST" "$DURATION" > "$work/burst.out" &
bpid=$!
# THREADS_CPU=1: CPU per thread of the first process during the middle of the burst
thread_cpu() {
  local pid="$1" secs="$2" t
  snap() { for t in /proc/"$pid"/task/*; do echo "$(basename "$t") $(tr ' ' _ < "$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done | sort; }
  snap > "$work/cpu1"; sleep "$secs"; snap > "$work/cpu2"
  join "$work/cpu1" "$work/cpu2" | awk -v s="$secs" '{d=$5-$3; if (d>0) printf "  %-18s %5.1f%% of a core\n", $2, d/s}' >&2
}
if [ -n "${THREADS_CPU:-}" ]; then (sleep 2; echo "threads of the first polygate during the burst:" >&2; thread_cpu "$pid1" $((DURATION / 2))) & fi
read -r burst_rps burst_p99 < <(wrk_run "$work/wrk2.out" "http://127.0.0.1:$PG1/r/1" "${DP[@]}")
wait "$bpid"
read -r updates updates_per_s < "$work/burst.out"

echo
echo "routes in etcd:                 $ROUTES (written in ${drv_load}s)"
echo "both processes serving them:    ${ready}s after start"
echo "RSS with $ROUTES routes:        ${rss1} MB / ${rss2} MB (target <= 100 MB)"
echo "Admin API PUT -> served by both: p50 ${p50} ms, p99 ${p99} ms, max ${pmax} ms (target p99 <= 100 ms)"
echo "data plane req/s, no updates:   $base_rps (p99 ${base_p99} ms)"
echo "data plane req/s, $updates updates at ${updates_per_s}/s: $burst_rps (p99 ${burst_p99} ms)"
echo "ratio during the burst:         $(echo "scale=2; $burst_rps / $base_rps" | bc)x (target >= 0.9x; PIN=$PIN)"
