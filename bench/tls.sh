#!/usr/bin/env bash
# TLS and HTTP/2 benchmark: polygate vs nginx side by side, same certificate (ECDSA P-256),
# same upstream, same worker count, in one run:
#
#   1. HTTPS with keep-alive (wrk, HTTP/1.1 over TLS 1.3)
#   2. a new TLS connection per request (wrk with `Connection: close`; wrk resumes sessions,
#      so these are mostly abbreviated handshakes, still with an ECDHE exchange in TLS 1.3)
#      wrk does a client's side of every handshake on one thread, and is itself CPU-bound here
#      (92-98% of a CPU, printed for each run): its latencies then include its own queue. The
#      test runs at CONNS and again at CLOSE_CONNS (10) connections
#   3. full TLS handshakes per second (`openssl s_time -new`, $HS_CLIENTS in parallel: no
#      resumption, ECDHE + certificate signature every time, then one request)
#   4. HTTP/2 over TLS (h2load, ALPN h2, several streams per connection)
#   5. new connections at a fixed rate, the same for both ($RATE per second for $RATE_SECS s,
#      one HTTP/1.1 request each, h2load --h1 -r): p50 and p99 of the requests' latency. wrk
#      (2.) is a closed loop, where the server that finishes handshakes faster has more
#      requests in flight at once; here both get the same offered load
#
#   bench/tls.sh
#   WORKERS=2 CONNS=100 DURATION=15 ROUNDS=3 bench/tls.sh
#
# Prints requests/s (and p99 where the tool reports it) for both and polygate/nginx ratios
# (median over rounds), and the CPU each server spends per request (keep-alive and h2: every
# thread of polygate, every worker process of nginx; the upstream and the load tools not
# counted). Needs nginx, wrk, h2load (nghttp2-client) and openssl; with tcpdump (optional) it
# also gives the server-side latencies of the new-connection runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
WORKERS="${WORKERS:-1}"; CONNS="${CONNS:-50}"; DURATION="${DURATION:-10}"; ROUNDS="${ROUNDS:-2}"
RATE="${RATE:-1000}"; RATE_SECS="${RATE_SECS:-4}"; CLOSE_CONNS="${CLOSE_CONNS:-10}"
H2_CLIENTS="${H2_CLIENTS:-10}"; H2_STREAMS="${H2_STREAMS:-10}"; HS_CLIENTS="${HS_CLIENTS:-4}"
UP_PORT="${UP_PORT:-18180}"; NGX_PORT="${NGX_PORT:-18181}"; PG_PORT="${PG_PORT:-18182}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"

source "$here/common.sh"
need_tools nginx wrk h2load openssl curl

echo "building polygate (release)..." >&2
(cd "$root" && cargo build --release -q -p polygate)
PG="$CARGO_TARGET_DIR/release/polygate"
bench_workdir

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
  -keyout "$work/key.pem" -out "$work/cert.pem" -subj "/CN=bench.test" \
  -addext "subjectAltName=DNS:bench.test" 2>/dev/null

upstream_conf "$work" "$UP_PORT"
cat > "$work/proxy.conf" <<NGX
worker_processes $WORKERS; daemon off; pid $work/px.pid; error_log $work/px.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 256; }
  server { listen 127.0.0.1:$NGX_PORT ssl http2 reuseport; server_name bench.test;
    ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGX
indent() { sed 's/^/      /' "$1"; }
cat > "$work/polygate.yaml" <<YAML
gateway:
  listeners: [{addr: "127.0.0.1:$PG_PORT", tls: true, http2: true}]
  worker_threads: $WORKERS
  access_log: {enabled: false}
  log_level: warn
  ssl: {fallback_sni: bench.test}
routes:
  - id: bench
    uri: /*
    upstream: {nodes: {"127.0.0.1:$UP_PORT": 1}, keepalive_pool: {size: 256}}
ssls:
  - id: "1"
    sni: bench.test
    cert: |
$(indent "$work/cert.pem")
    key: |
$(indent "$work/key.pem")
#END
YAML
nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)
nginx -p "$work" -c "$work/proxy.conf" & pids+=($!); ngx_master=$!
"$PG" run -c "$work/polygate.yaml" 2>"$work/pg.err" & pids+=($!); pg_pid=$!
for port in $NGX_PORT $PG_PORT; do
  for _ in $(seq 50); do curl -sk -o /dev/null "https://127.0.0.1:$port/" && break; sleep 0.1; done
done
curl -sk -o /dev/null "https://127.0.0.1:$PG_PORT/" || { echo "polygate did not start:"; cat "$work/pg.err"; exit 1; }

server_pids() { # port -> the pids serving it: nginx's workers, or polygate
  if [ "$1" = "$NGX_PORT" ]; then pgrep -P "$ngx_master" | tr '\n' ' '; else echo "$pg_pid"; fi
}
us_per() { # cpu-ns-before cpu-ns-after requests -> µs per request
  awk -v a="$1" -v b="$2" -v n="${3:-0}" 'BEGIN {printf "%.2f", (b - a) / 1000 / (n > 0 ? n : 1)}'
}
ka_run() { # url port -> "req/s p99 cpu-µs-per-request"
  local c0 c1 rps p99 n procs
  procs=$(server_pids "$2")
  # shellcheck disable=SC2086
  c0=$(cpu_ns $procs); read -r rps p99 < <(wrk_run "$work/wrk.out" "$1"); c1=$(cpu_ns $procs)
  n=$(awk '/requests in/ {print $1}' "$work/wrk.out")
  echo "$rps $p99 $(us_per "$c0" "$c1" "$n")"
}
h2_run() { # url -> "req/s"
  h2load -D "$DURATION" -c "$H2_CLIENTS" -m "$H2_STREAMS" -t 1 "$1" > "$work/h2.out" 2>&1 || true
  awk '/^finished in/ {gsub(",", "", $4); print $4}' "$work/h2.out"
  if grep -qE "(^|[^0-9])0 succeeded" "$work/h2.out"; then echo "warning: h2load: no request succeeded" >&2; cat "$work/h2.out" >&2; fi
}
h2_cpu_run() { # url port -> "req/s cpu-µs-per-request"
  local c0 c1 rps n procs
  procs=$(server_pids "$2")
  # shellcheck disable=SC2086
  c0=$(cpu_ns $procs); rps=$(h2_run "$1"); c1=$(cpu_ns $procs)
  n=$(awk '/^requests:/ {print $8}' "$work/h2.out")
  echo "$rps $(us_per "$c0" "$c1" "$n")"
}
# With tcpdump, the new-connection runs are also captured on loopback, and the server's own
# latencies are read from the packets' times (bench/pcap_latency.py): wrk's latency starts when
# it writes the request and ends when its one thread, busy with the client's side of every
# handshake, gets back to the socket, so most of it is wrk's own queue; and it leaves out the
# wait for the handshake, which a server can shorten or lengthen by how soon it accepts.
CAPTURE=0; command -v tcpdump >/dev/null && CAPTURE=1
close_run() { # url port [conns] -> "req/s p99 wrk-cpu% req_p50 req_p99 conn_p50 conn_p99"
  local rps p99 cpu tp="" lat="- - - -"
  if [ "$CAPTURE" = 1 ]; then
    rm -f "$work/cap.pcap"
    tcpdump -i lo -s 128 -U -w "$work/cap.pcap" "tcp port $2" 2>/dev/null & tp=$!
    for _ in $(seq 50); do [ -s "$work/cap.pcap" ] && break; sleep 0.05; done
    sleep 0.2
  fi
  cpu=$( { TIMEFORMAT=%P; time wrk -t1 -c"${3:-$CONNS}" -d"${DURATION}s" --latency -H "Connection: close" "$1" > "$work/close.out" 2>&1; } 2>&1 )
  if [ -n "$tp" ]; then
    sleep 0.3; kill "$tp" 2>/dev/null || true; wait "$tp" 2>/dev/null || true
    lat=$(python3 "$here/pcap_latency.py" "$work/cap.pcap" "$2")
  fi
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/close.out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$work/close.out")
  echo "$rps $p99 ${cpu%.*} $lat"
}
full_run() { # port -> "handshakes/s" (sum over $HS_CLIENTS parallel s_time loops)
  local i
  for i in $(seq "$HS_CLIENTS"); do
    openssl s_time -connect "127.0.0.1:$1" -new -time "$DURATION" -www / > "$work/st.$i" 2>&1 &
  done
  wait
  cat "$work"/st.* | awk '/connections in .* real seconds/ {n += $1; t = $4} END {if (t > 0) printf "%.0f\n", n / t; else print 0}'
  rm -f "$work"/st.*
}
rate_run() { # url -> "p50 p99" in ms: one request per new connection, $RATE connections/s
  local n=$((RATE * RATE_SECS))
  rm -f "$work/rate.log"
  h2load --h1 -r "$((RATE / 100 > 0 ? RATE / 100 : 1))" --rate-period 10ms -c "$n" -n "$n" \
    --log-file="$work/rate.log" "$1" > "$work/rate.out" 2>&1 || true
  python3 - "$work/rate.log" <<'PY'
import sys
try:
    v = sorted(int(l.split("\t")[2]) for l in open(sys.argv[1]) if l.strip())
except OSError:
    v = []
q = lambda p: v[min(len(v) - 1, int(p * len(v)))] / 1000 if v else 0
print(f"{q(.5):.2f} {q(.99):.2f}")
PY
}
ngx="https://127.0.0.1:$NGX_PORT/"; pg="https://127.0.0.1:$PG_PORT/"
wrk -t1 -c"$CONNS" -d2s "$ngx" >/dev/null; wrk -t1 -c"$CONNS" -d2s "$pg" >/dev/null

printf "%-6s %-26s %12s %10s\n" round "target" "req/s" "p99(ms)"
: > "$work/results"
for r in $(seq "$ROUNDS"); do
  read -r nk nkp nkc < <(ka_run "$ngx" "$NGX_PORT")
  read -r pk pkp pkc < <(ka_run "$pg" "$PG_PORT")
  read -r nc ncp ncc ncs < <(close_run "$ngx" "$NGX_PORT")
  read -r pc pcp pcc pcs < <(close_run "$pg" "$PG_PORT")
  read -r nl nlp nlc nls < <(close_run "$ngx" "$NGX_PORT" "$CLOSE_CONNS")
  read -r pl plp plc pls < <(close_run "$pg" "$PG_PORT" "$CLOSE_CONNS")
  nf=$(full_run "$NGX_PORT"); pf=$(full_run "$PG_PORT")
  read -r nh nhc < <(h2_cpu_run "$ngx" "$NGX_PORT"); read -r ph phc < <(h2_cpu_run "$pg" "$PG_PORT")
  read -r nr50 nr99 < <(rate_run "$ngx")
  read -r pr50 pr99 < <(rate_run "$pg")
  printf "%-6s %-26s %12s %10s\n" "$r" "nginx https keep-alive" "$nk" "$nkp" "$r" "polygate https keep-alive" "$pk" "$pkp" \
    "$r" "nginx new connections" "$nc" "$ncp" "$r" "polygate new connections" "$pc" "$pcp" \
    "$r" "nginx new conns, c$CLOSE_CONNS" "$nl" "$nlp" "$r" "polygate new conns, c$CLOSE_CONNS" "$pl" "$plp" \
    "$r" "nginx full handshakes" "$nf" "-" "$r" "polygate full handshakes" "$pf" "-" \
    "$r" "nginx h2" "$nh" "-" "$r" "polygate h2" "$ph" "-"
  printf "%-6s %-26s %12s %10s\n" "$r" "nginx ${RATE}/s new conns p50" "$nr50" "$nr99" \
    "$r" "polygate ${RATE}/s new conns p50" "$pr50" "$pr99"
  printf "%-6s wrk's CPU in the new-connection runs: c%s nginx %s%%, polygate %s%%; c%s nginx %s%%, polygate %s%%\n" \
    "$r" "$CONNS" "$ncc" "$pcc" "$CLOSE_CONNS" "$nlc" "$plc"
  if [ "$CAPTURE" = 1 ]; then
    printf "%-6s server side (capture), ms: request p50 p99 / SYN to response p50 p99: c%s nginx %s, polygate %s; c%s nginx %s, polygate %s\n" \
      "$r" "$CONNS" "$ncs" "$pcs" "$CLOSE_CONNS" "$nls" "$pls"
  fi
  printf "%-6s CPU per request (every thread of the server), µs: keep-alive nginx %s, polygate %s; h2 nginx %s, polygate %s\n" \
    "$r" "$nkc" "$pkc" "$nhc" "$phc"
  echo "$nk $nkp $pk $pkp $nc $ncp $pc $pcp $nh $ph $nf $pf $nr50 $nr99 $pr50 $pr99 $nl $nlp $pl $plp $ncs $pcs $nls $pls $nkc $pkc $nhc $phc" >> "$work/results"
done
python3 - "$work/results" "$WORKERS" "$CONNS" "$H2_CLIENTS" "$H2_STREAMS" "$CLOSE_CONNS" <<'PY'
import sys, statistics
rows=[[float(x) if x != "-" else None for x in l.split()] for l in open(sys.argv[1]) if l.strip()]
def m(i):
    v = [r[i] for r in rows if r[i] is not None]
    return statistics.median(v) if v else None
print(f"\nworkers={sys.argv[2]} connections={sys.argv[3]} h2: {sys.argv[4]} clients x {sys.argv[5]} streams (median of {len(rows)} rounds)")
for name,(n,np_,p,pp) in {"https keep-alive":(m(0),m(1),m(2),m(3)),"new conn. per request":(m(4),m(5),m(6),m(7)),f"new conn., c{sys.argv[6]}":(m(16),m(17),m(18),m(19))}.items():
    print(f"{name:20s} nginx {n:9.0f} req/s p99 {np_:.2f} ms | polygate {p:9.0f} req/s p99 {pp:.2f} ms | ratio {p/n:.2f}x, p99 {pp/np_:.2f}x")
n,p=m(10),m(11)
print(f"{'full handshakes':20s} nginx {n:9.0f} /s                | polygate {p:9.0f} /s                | ratio {p/n:.2f}x")
n,p=m(8),m(9)
print(f"{'h2 (h2load)':20s} nginx {n:9.0f} req/s             | polygate {p:9.0f} req/s             | ratio {p/n:.2f}x")
n50, n99, p50, p99 = m(12), m(13), m(14), m(15)
print(f"{'fixed-rate new conns':20s} nginx p50 {n50:.2f} p99 {n99:.2f} ms | polygate p50 {p50:.2f} p99 {p99:.2f} ms | p99 {p99/n99 if n99 else 0:.2f}x")
n, p = m(36), m(37)
print(f"CPU per request, every thread of the server: keep-alive nginx {n:.2f} polygate {p:.2f} µs ({p/n:.2f}x);", end=" ")
n, p = m(38), m(39)
print(f"h2 nginx {n:.2f} polygate {p:.2f} µs ({p/n:.2f}x)")
if m(20) is not None:
    print("new connection per request, server side (packet capture): the request's time in the server,")
    print("and from the client's SYN to the response (accept queue and handshake included), ms")
    for c, base in ((sys.argv[3], 20), (sys.argv[6], 28)):
        n = [m(base + k) for k in range(4)]
        p = [m(base + 4 + k) for k in range(4)]
        if None in n or None in p:
            continue
        print(f"  c{c:<3} request p50 nginx {n[0]:.2f} polygate {p[0]:.2f} ({p[0]/n[0]:.2f}x), p99 {n[1]:.2f} / {p[1]:.2f} ({p[1]/n[1]:.2f}x);"
              f" SYN to response p50 {n[2]:.2f} / {p[2]:.2f} ({p[2]/n[2]:.2f}x), p99 {n[3]:.2f} / {p[3]:.2f} ({p[3]/n[3]:.2f}x)")
PY
