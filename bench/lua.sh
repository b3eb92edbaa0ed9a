#!/usr/bin/env bash
# Lua access-phase benchmark, side by side in one run:
#   polygate plain route  vs  polygate route with a `lua` access handler setting a request header
#   nginx plain proxy     vs  nginx + libnginx-mod-http-lua with the same access_by_lua_block
#
#   bench/lua.sh                          # 1 worker each, 50 connections, 10 s per run, 2 rounds
#   WORKERS=2 DURATION=15 ROUNDS=3 bench/lua.sh
#
# The handler is the same text in both: ngx.req.set_header("X-Lua", ngx.var.uri)
# Prints req/s and p99 per target and the ratios lua/plain (target >= 0.90) and
# polygate+lua / nginx+lua (target >= 1.0), medians over the rounds. Installs nginx, the Lua
# module and wrk with apt-get when they are missing (as root).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
WORKERS="${WORKERS:-1}"; CONNS="${CONNS:-50}"; DURATION="${DURATION:-10}"; ROUNDS="${ROUNDS:-2}"
THREADS="${THREADS:-1}"
UP_PORT="${UP_PORT:-18090}"; NGX_PORT="${NGX_PORT:-18091}"; PG_PORT="${PG_PORT:-18092}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"
MODS=/usr/lib/nginx/modules

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null || [ ! -f "$MODS/ngx_http_lua_module.so" ]; then
  echo "installing nginx, libnginx-mod-http-lua and wrk..." >&2
  apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-http-lua wrk >/dev/null
fi

echo "building polygate (release)..." >&2
(cd "$root" && cargo build --release -q -p polygate)
PG="$CARGO_TARGET_DIR/release/polygate"

source "$here/common.sh"
bench_workdir

upstream_conf "$work" "$UP_PORT"
HANDLER='ngx.req.set_header("X-Lua", ngx.var.uri)'
cat > "$work/proxy.conf" <<NGX
load_module $MODS/ndk_http_module.so;
load_module $MODS/ngx_http_lua_module.so;
worker_processes $WORKERS; daemon off; pid $work/px.pid; error_log $work/px.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 256; }
  server { listen 127.0.0.1:$NGX_PORT reuseport;
    location /plain { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location /lua {
      access_by_lua_block { $HANDLER }
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGX
{ polygate_conf_head "$PG_PORT" "$WORKERS" "$UP_PORT"; cat <<YAML; } > "$work/polygate.yaml"
  - id: lua
    uri: /lua
    upstream_id: up
    plugins:
      lua:
        access: '$HANDLER'
#END
YAML
nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)
nginx -p "$work" -c "$work/proxy.conf" & pids+=($!)
"$PG" run -c "$work/polygate.yaml" 2>"$work/pg.err" & pids+=($!)
for url in "http://127.0.0.1:$UP_PORT/" "http://127.0.0.1:$NGX_PORT/lua" "http://127.0.0.1:$PG_PORT/lua"; do
  for _ in $(seq 50); do curl -s -o /dev/null "$url" && break; sleep 0.1; done
done
for url in "http://127.0.0.1:$NGX_PORT/lua" "http://127.0.0.1:$PG_PORT/lua"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$url")
  [ "$code" = 200 ] || { echo "$url answered $code"; cat "$work/pg.err" "$work/px.err"; exit 1; }
done
wrk_rounds "nginx $NGX_PORT/plain" "nginx+lua $NGX_PORT/lua" "polygate $PG_PORT/plain" "polygate+lua $PG_PORT/lua"
python3 - "$work/results" "$WORKERS" "$CONNS" <<'PY'
import sys, statistics
rows=[list(map(float,l.split())) for l in open(sys.argv[1]) if l.strip()]
med=lambda i: statistics.median(r[i] for r in rows)
names=["nginx","nginx+lua","polygate","polygate+lua"]
v={n:(med(2*i),med(2*i+1)) for i,n in enumerate(names)}
print(f"\nworkers={sys.argv[2]} connections={sys.argv[3]} (median of {len(rows)} rounds)")
for n in names: print(f"{n:14s} {v[n][0]:10.0f} req/s  p99 {v[n][1]:.2f} ms")
print(f"polygate+lua / polygate plain: {v['polygate+lua'][0]/v['polygate'][0]:.2f}x (target >= 0.90)")
print(f"nginx+lua / nginx plain:       {v['nginx+lua'][0]/v['nginx'][0]:.2f}x")
print(f"polygate+lua / nginx+lua:      {v['polygate+lua'][0]/v['nginx+lua'][0]:.2f}x throughput, p99 {v['polygate+lua'][1]/v['nginx+lua'][1]:.2f}x (target >= 1.0)")
PY
