#!/usr/bin/env bash
# Deterministic CPU cost per proxied request: user-space instructions counted by valgrind's
# callgrind, for nginx (proxy_pass to a keepalive upstream, the anchor) and for one or more
# polygate binaries, each proxying to the same 1 KiB upstream (1 worker, access log off).
# Each proxy runs under callgrind twice, with N1 and N2 keep-alive requests; the difference
# divided by N2-N1 is the cost of one request, start-up excluded. Repeatable on a busy machine.
#
#   bench/callgrind.sh                                  # this tree's release polygate
#   bench/callgrind.sh /path/to/old/polygate ./target/release/polygate
#
# GATEWAY_EXTRA adds lines to polygate's `gateway:` section and ROUTE_PLUGINS sets the route's
# plugins (a YAML flow map), to count what a plugin costs, e.g.
#   ROUTE_PLUGINS='{response-rewrite: {headers: {set: {x-wasm: bench}}}}' bench/callgrind.sh
#   GATEWAY_EXTRA='  wasm: {plugins: [{name: add_header, file: examples/wasm/add_header.wat, priority: 1}]}' \
#     ROUTE_PLUGINS='{add_header: {conf: bench}}' bench/callgrind.sh
# WORKER_ONLY=1 counts polygate's worker thread alone (not the threads of an FFI runtime or of
# the main thread), e.g. what the `ffi` plugin costs the worker:
#   WORKER_ONLY=1 GATEWAY_EXTRA='  ffi_lib_path: [/path/to/dir]' \
#     ROUTE_PLUGINS='{ffi: {lib: ffi_rust_echo, cfg: continue}}' bench/callgrind.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
N1="${N1:-200}"; N2="${N2:-1200}"
UP_PORT="${UP_PORT:-18180}"; PX_PORT="${PX_PORT:-18181}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"
command -v valgrind >/dev/null || { echo "missing valgrind" >&2; exit 1; }
command -v nginx >/dev/null || { echo "missing nginx" >&2; exit 1; }
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
  (cd "$root" && cargo build --release -q -p polygate)
  bins=("$CARGO_TARGET_DIR/release/polygate")
fi
source "$here/common.sh"
bench_workdir
upstream_conf "$work" "$UP_PORT"
nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$UP_PORT/" && break; sleep 0.1; done

# N keep-alive requests on one connection, then the proxy is stopped
load() {
  python3 - "$PX_PORT" "$1" <<'PY'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(300):
    try:
        s = socket.create_connection(("127.0.0.1", port)); break
    except OSError:
        time.sleep(0.1)
req = b"GET /x HTTP/1.1\r\nHost: bench\r\n\r\n"
buf = b""
for _ in range(n):
    s.sendall(req)
    while True:
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            head = buf[:i].decode("latin1").lower()
            cl = int(head.split("content-length:")[1].split("\r\n")[0])
            if len(buf) >= i + 4 + cl:
                buf = buf[i + 4 + cl:]
                break
        d = s.recv(65536)
        if not d: raise SystemExit("closed")
        buf += d
PY
}

# instructions of one run of PROXY-COMMAND... with N requests
measure() {
  local n="$1"; shift
  local out="$work/cg.$n"
  local sep=()
  [ "${WORKER_ONLY:-0}" = 1 ] && sep=(--separate-threads=yes)
  valgrind --tool=callgrind "${sep[@]}" --callgrind-out-file="$out.%p" --trace-children=no -q "$@" &
  local vp=$!
  load "$n"
  kill -TERM "$vp"; wait "$vp" 2>/dev/null || true
  # the totals of the files: every thread's, or with WORKER_ONLY=1 polygate's worker thread's
  # (a file holds its total twice, as `summary:` and `totals:`; before 2026-12-02 this summed
  # both and printed every figure twice, ratios unaffected)
  local files=("$out".*)
  if [ "${WORKER_ONLY:-0}" = 1 ]; then
    local w
    mapfile -t w < <(grep -l 'polygate_proxy::server::worker' "$out".* || true)
    [ ${#w[@]} -gt 0 ] && files=("${w[@]}")
  fi
  cat "${files[@]}" | awk '/^totals:/ {s += $2} END {print s}'
  rm -f "$out".*
}

per_request() { # label, command...
  local label="$1"; shift
  local a b
  a=$(measure "$N1" "$@"); b=$(measure "$N2" "$@")
  printf "%-60s %8d instructions/request\n" "$label" $(( (b - a) / (N2 - N1) ))
}

cat > "$work/proxy.conf" <<NGX
worker_processes 1; master_process off; daemon off; pid $work/px.pid; error_log $work/px.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 16; }
  server { listen 127.0.0.1:$PX_PORT;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGX
per_request "nginx $(nginx -v 2>&1 | sed 's|.*/||')" nginx -p "$work" -c "$work/proxy.conf"

cat > "$work/polygate.yaml" <<YAML
gateway:
  listeners: [{addr: "127.0.0.1:$PX_PORT"}]
  worker_threads: 1
  access_log: {enabled: false}
  log_level: warn
${GATEWAY_EXTRA:-}
routes:
  - id: bench
    uri: /*
    upstream: {nodes: {"127.0.0.1:$UP_PORT": 1}, keepalive_pool: {size: 16}}
    plugins: ${ROUTE_PLUGINS:-{\}}
#END
YAML
for b in "${bins[@]}"; do
  per_request "polygate $b" "$b" run -c "$work/polygate.yaml"
done
