#!/usr/bin/env bash
# proxy-wasm benchmark, side by side in one run (every target proxies to the same 1 KiB nginx
# upstream and answers with one added response header where it adds one):
#   nginx            plain proxy (the anchor)
#   polygate         plain route
#   response-rewrite the native plugin adding `x-wasm: bench`
#   wasm (WAT)       examples/wasm/add_header.wat adding the same header
#   wasm (AS SDK)    the add-header filter on the published AssemblyScript SDK
#                    (tests/wasm/as-sdk, built by scripts/wasm-filters.sh; the SDK logs five
#                    debug lines per request, formatted even when not printed)
#
#   bench/wasm.sh                       # 1 worker, 50 connections, 10 s per run, 2 rounds
#   WORKERS=2 DURATION=15 ROUNDS=3 bench/wasm.sh
#
# Prints req/s and p99 per target and the ratios wasm / response-rewrite (target >= 0.90)
# and wasm / plain, medians over the rounds. Installs nginx and wrk with apt-get when
# missing (as root).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
WORKERS="${WORKERS:-1}"; CONNS="${CONNS:-50}"; DURATION="${DURATION:-10}"; ROUNDS="${ROUNDS:-2}"
THREADS="${THREADS:-1}"
UP_PORT="${UP_PORT:-18190}"; NGX_PORT="${NGX_PORT:-18191}"; PG_PORT="${PG_PORT:-18192}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  echo "installing nginx and wrk..." >&2
  apt-get update -qq && apt-get install -y -qq nginx-light wrk >/dev/null
fi
echo "building polygate (release) and the AssemblyScript filters..." >&2
(cd "$root" && cargo build --release -q -p polygate)
bash "$root/scripts/wasm-filters.sh" "$CARGO_TARGET_DIR/wasm-filters" >/dev/null
PG="$CARGO_TARGET_DIR/release/polygate"

source "$here/common.sh"
bench_workdir

upstream_conf "$work" "$UP_PORT"
nginx_proxy_conf "$work" "$WORKERS" "$NGX_PORT" "$UP_PORT"
{ polygate_conf_head "$PG_PORT" "$WORKERS" "$UP_PORT" | sed "s|^upstreams:|  wasm:\n    plugins:\n      - {name: add_header, file: \"$root/examples/wasm/add_header.wat\", priority: 7999}\n      - {name: as_sdk_add_header, file: \"$CARGO_TARGET_DIR/wasm-filters/as_sdk_add_header.wasm\", priority: 7998}\nupstreams:|"
  cat <<YAML; } > "$work/polygate.yaml"
  - {id: rr, uri: /rr, upstream_id: up, plugins: {response-rewrite: {headers: {set: {x-wasm: bench}}}}}
  - {id: wat, uri: /wat, upstream_id: up, plugins: {add_header: {conf: bench}}}
  - {id: as, uri: /as, upstream_id: up, plugins: {as_sdk_add_header: {conf: bench}}}
#END
YAML
nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)
nginx -p "$work" -c "$work/proxy.conf" & pids+=($!)
"$PG" run -c "$work/polygate.yaml" 2>"$work/pg.err" & pids+=($!)
for url in "http://127.0.0.1:$UP_PORT/" "http://127.0.0.1:$NGX_PORT/" "http://127.0.0.1:$PG_PORT/plain"; do
  for _ in $(seq 50); do curl -s -o /dev/null "$url" && break; sleep 0.1; done
done
for p in rr wat as; do
  h=$(curl -s -D - -o /dev/null "http://127.0.0.1:$PG_PORT/$p" | tr -d '\r' | grep -i '^x-wasm\|^x-as-sdk' || true)
  [ -n "$h" ] || { echo "/$p added no header"; cat "$work/pg.err"; exit 1; }
done
targets=("nginx $NGX_PORT/" "polygate $PG_PORT/plain" "response-rewrite $PG_PORT/rr" "wasm-wat $PG_PORT/wat" "wasm-as-sdk $PG_PORT/as")
wrk_rounds "${targets[@]}"
python3 - "$work/results" "$WORKERS" "$CONNS" <<'PY'
import sys, statistics
rows=[list(map(float,l.split())) for l in open(sys.argv[1]) if l.strip()]
med=lambda i: statistics.median(r[i] for r in rows)
names=["nginx","polygate","response-rewrite","wasm-wat","wasm-as-sdk"]
v={n:(med(2*i),med(2*i+1)) for i,n in enumerate(names)}
print(f"\nworkers={sys.argv[2]} connections={sys.argv[3]} (median of {len(rows)} rounds)")
for n in names: print(f"{n:17s} {v[n][0]:10.0f} req/s  p99 {v[n][1]:.2f} ms")
rr=v['response-rewrite'][0]
print(f"wasm (WAT) / response-rewrite:    {v['wasm-wat'][0]/rr:.2f}x (target >= 0.90)")
print(f"wasm (AS SDK) / response-rewrite: {v['wasm-as-sdk'][0]/rr:.2f}x")
print(f"wasm (WAT) / polygate plain:      {v['wasm-wat'][0]/v['polygate'][0]:.2f}x")
print(f"polygate plain / nginx:           {v['polygate'][0]/v['nginx'][0]:.2f}x")
PY
