# Shared by the bench scripts (sourced).

# need_tools TOOL...: stops with the package to install when a tool is missing.
need_tools() {
  for t in "$@"; do
    command -v "$t" >/dev/null || { echo "needs $t (apt-get install -y $t)" >&2; exit 1; }
  done
}

# bench_workdir: makes $work (a temporary directory) and $pids (processes started into it);
# both are cleaned up when the script exits.
bench_workdir() {
  work="$(mktemp -d)"; pids=()
  trap bench_cleanup EXIT
}
bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true; rm -rf "$work"
}

# polygate_conf_head PG_PORT WORKERS UP_PORT: the start of a polygate config for a gateway
# benchmark (access log off, upstream `up` with keepalive, a plain `/plain` route); the caller
# appends its own routes and `#END`.
polygate_conf_head() {
  cat <<YAML
gateway:
  listeners: [{addr: "127.0.0.1:$1"}]
  worker_threads: $2
  access_log: {enabled: false}
  log_level: warn
upstreams:
  - {id: up, nodes: {"127.0.0.1:$3": 1}, keepalive_pool: {size: 256}}
routes:
  - {id: plain, uri: /plain, upstream_id: up}
YAML
}

# upstream_conf DIR PORT writes DIR/upstream.conf: an
# nginx with one worker and the access log off, answering every request with 1 KiB.
upstream_conf() {
  local dir="$1" port="$2" body
  body="$(head -c 1024 /dev/zero | tr '\0' 'x')"
  cat > "$dir/upstream.conf" <<NGX
worker_processes 1; daemon off; pid $dir/up.pid; error_log $dir/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$port reuseport; location / { default_type text/plain; return 200 "$body"; } } }
NGX
}

# cpu_ns PID...: CPU time (ns) of every thread of these processes, the scheduler's exact figure
# (/proc/PID/task/*/schedstat): the CPU a request costs moves less with a shared machine's
# speed than requests/s do.
cpu_ns() { for p in "$@"; do cat /proc/"$p"/task/*/schedstat 2>/dev/null; done | awk '{s += $1} END {printf "%.0f\n", s}'; }

# wrk_run OUT URL [WRAPPER...]: one wrk run of $DURATION seconds with $CONNS connections and
# ${THREADS:-1} threads (prefixed by WRAPPER, e.g. taskset); prints "req/s p99_ms" and warns
# about non-2xx responses.
wrk_run() {
  local out="$1" url="$2"; shift 2
  "$@" wrk -t"${THREADS:-1}" -c"$CONNS" -d"${DURATION}s" --latency "$url" > "$out" 2>&1
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$out")
  if grep -q "Non-2xx" "$out"; then echo "warning: non-2xx responses: $(grep Non-2xx "$out")" >&2; fi
  echo "$rps $p99"
}

# nginx_proxy_conf DIR WORKERS PORT UP_PORT [EXTRA_LOCATIONS]: writes DIR/proxy.conf, an nginx
# proxying `location /` (plus EXTRA_LOCATIONS) to the keepalive upstream on UP_PORT.
nginx_proxy_conf() {
  local dir="$1" workers="$2" port="$3" up="$4" extra="${5:-}"
  cat > "$dir/proxy.conf" <<NGX
worker_processes $workers; daemon off; pid $dir/px.pid; error_log $dir/px.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$up; keepalive 256; }
  server { listen 127.0.0.1:$port reuseport;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
    $extra } }
NGX
}

# wrk_rounds TARGET...: each TARGET is "name port/path". A 2 s warm-up of each, then $ROUNDS
# interleaved rounds of wrk_run over all of them, printed as a table; each round's
# "rps p99 rps p99 ..." line is appended to $work/results (read by the scripts' summaries).
wrk_rounds() {
  local targets=("$@") t r line rps p99 name path
  for t in "${targets[@]}"; do
    read -r name path <<< "$t"
    wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$path" >/dev/null
  done
  printf "%-6s %-17s %12s %10s\n" round target "req/s" "p99(ms)"
  : > "$work/results"
  for r in $(seq "$ROUNDS"); do
    line=""
    for t in "${targets[@]}"; do
      read -r name path <<< "$t"
      read -r rps p99 < <(wrk_run "$work/wrk.out" "http://127.0.0.1:$path")
      printf "%-6s %-17s %12s %10s\n" "$r" "$name" "$rps" "$p99"
      line="$line $rps $p99"
    done
    echo "$line" >> "$work/results"
  done
}
