#!/usr/bin/env bash
# The FFI call path side by side with lua-resty-ffi on nginx: a Lua loop of CALLS sequential
# `demo:echo(buf)` calls inside one request, with lua-resty-ffi's own Go echo runtime, for
# 16 B, 1 KiB and 100 KiB payloads; one worker each, every process pinned to the same CPU;
# nginx and polygate alternate, ROUNDS times; prints µs per call (median) and the ratio.
#
#   bench/ffi-vs-nginx.sh NGINX RESTY_FFI_DIR LUA_DIR ECHO_LIB
#
#   NGINX          an nginx binary built with lua-nginx-module and --with-threads
#   RESTY_FFI_DIR  a directory with lua-resty-ffi's resty_ffi.lua and libresty_ffi.so built for
#                  that nginx (lua-resty-ffi's build_shared.sh)
#   LUA_DIR        where resty.core and resty.lrucache are (e.g. Debian's lua-resty-core and
#                  lua-resty-lrucache unpacked: .../usr/share/lua/5.1)
#   ECHO_LIB       lua-resty-ffi's examples/go/echo.go built with -buildmode=c-shared
#
# None of these is built by this repository (benchmark references only).
#   CALLS=20000 ROUNDS=3 SIZES="16 1024 102400" CPU=0 LIMITS=default|off
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -eq 4 ] || { sed -n '2,17p' "$0"; exit 2; }
NGINX="$(realpath "$1")"; RF="$(realpath "$2")"; LUADIR="$(realpath "$3")"; ECHO="$(realpath "$4")"
CALLS="${CALLS:-20000}"; ROUNDS="${ROUNDS:-3}"; SIZES="${SIZES:-16 1024 102400}"; CPU="${CPU:-0}"
LIMITS="${LIMITS:-default}"
NG_PORT="${NG_PORT:-18190}"; PG_PORT="${PG_PORT:-18191}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"
source "$root/bench/common.sh"
bench_workdir
(cd "$root" && cargo build --release -q -p polygate)
cp "$ECHO" "$work/libffi_go_echo.so"
chmod 755 "$work"   # nginx workers run as another user

LOOP='local n, buf = tonumber(ngx.var.arg_n), string.rep("x", tonumber(ngx.var.arg_size))
local ok, res = demo:echo(buf)
assert(ok and res == buf, "echo failed")
ngx.update_time()
local t0 = ngx.now()
for i = 1, n do
  local ok, res = demo:echo(buf)
  if not ok then error("call failed: " .. tostring(res)) end
end
ngx.update_time()
ngx.say(string.format("%.3f", (ngx.now() - t0) * 1e6 / n))'

mkdir -p "$work/logs"
cat > "$work/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $work/ng.pid; error_log $work/ng.err warn;
env LD_LIBRARY_PATH;
events { worker_connections 1024; }
http {
  access_log off;
  lua_package_path "$RF/?.lua;$LUADIR/?.lua;;";
  server {
    listen 127.0.0.1:$NG_PORT;
    location /bench {
      content_by_lua_block {
        require("resty_ffi")
        local demo = ngx.load_ffi("$work/libffi_go_echo.so")
$(printf '%s\n' "$LOOP" | sed 's/^/        /')
      }
    }
  }
}
NGX
limits=""
[ "$LIMITS" = off ] && limits="  lua: {time_limit: 0, instruction_limit: 0}"
cat > "$work/polygate.yaml" <<YAML
gateway:
  listeners: [{addr: "127.0.0.1:$PG_PORT"}]
  worker_threads: 1
  access_log: {enabled: false}
  log_level: warn
  ffi_lib_path: ["$work"]
  timeouts: {client_send: 600}
$limits
routes:
  - id: bench
    uri: /bench
    plugins:
      lua:
        access: |
          local demo = ngx.load_ffi("$work/libffi_go_echo.so")
$(printf '%s\n' "$LOOP" | sed 's/^/          /')
          return ngx.exit(200)
#END
YAML

LD_LIBRARY_PATH="$work:$RF" taskset -c "$CPU" "$NGINX" -p "$work" -c "$work/nginx.conf" 2>"$work/ng.stderr" & pids+=($!)
taskset -c "$CPU" "$CARGO_TARGET_DIR/release/polygate" run -c "$work/polygate.yaml" 2>"$work/pg.err" & pids+=($!)
for _ in $(seq 100); do
  curl -s -o /dev/null "http://127.0.0.1:$NG_PORT/bench?n=1&size=1" && curl -s -o /dev/null "http://127.0.0.1:$PG_PORT/bench?n=1&size=1" && break
  sleep 0.1
done
one() { curl -s -m 600 "http://127.0.0.1:$1/bench?n=$CALLS&size=$2"; }
for p in "$NG_PORT" "$PG_PORT"; do
  out="$(one "$p" 16)"
  [[ "$out" =~ ^[0-9.]+$ ]] || { echo "port $p: $out"; cat "$work/ng.err" "$work/pg.err" | tail -20; exit 1; }
done
: > "$work/res"
for r in $(seq "$ROUNDS"); do
  for s in $SIZES; do
    echo "$s $(one "$NG_PORT" "$s") $(one "$PG_PORT" "$s")" >> "$work/res"
  done
done
echo "$CALLS sequential echo calls per run, one worker each, pinned to CPU $CPU, median of $ROUNDS rounds (polygate Lua limits: $LIMITS)"
python3 - "$work/res" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for s, n, p in rows:
    by.setdefault(int(s), ([], []))
    by[int(s)][0].append(float(n)); by[int(s)][1].append(float(p))
print(f"{'payload':>9} {'nginx+lua-resty-ffi':>20} {'polygate':>10} {'polygate/nginx':>15}")
for s in sorted(by):
    n = statistics.median(by[s][0]); p = statistics.median(by[s][1])
    size = f"{s} B" if s < 1024 else f"{s // 1024} KiB"
    print(f"{size:>9} {n:>17.2f} µs {p:>7.2f} µs {p / n:>14.2f}x")
PY
