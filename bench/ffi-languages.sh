#!/usr/bin/env bash
# Every language's FFI runtime side by side, in one polygate process:
#
#  A. sequential round trips: one request runs CALLS (100,000) `rt:echo(buf)` calls with a
#     512 B payload from Lua (ngx.load_ffi) to each language's echo runtime; µs per call.
#  B. gateway requests/s with each language's `ffi` plugin (an empty answer: continue) on every
#     request vs the plain route, wrk with CONNS connections, DURATION s; each language run is
#     paired with a plain run just before it, median of ROUNDS pairs; with each, polygate's CPU
#     per request (all its threads, from /proc/PID/task/*/schedstat) and its ratio.
#     `rust-inline` is the Rust echo with `Options::inline`: its handler runs on the gateway's
#     worker thread (polygate_ffi_task_queue_inline), without the hop to a poller thread.
#
#   bench/ffi-languages.sh            # needs wrk, nginx (the upstream), Go, a JDK + Maven,
#                                     # Python with a shared libpython, and libnode (as the
#                                     # test command prepares it: $CARGO_TARGET_DIR/libnode)
#   CALLS=20000 WORKERS=2 bench/ffi-languages.sh
#   LANGS="go rust" bench/ffi-languages.sh   # only these languages
#   PIN=1 bench/ffi-languages.sh      # B with polygate's worker threads on CPU 0 and wrk and the
#                                     # upstream on CPU 1 (runtimes' threads float)
#   STEAL_MAX=5                       # B also gives the median over the pairs whose runs lost at
#                                     # most this % of the machine's CPU to other guests (steal)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
CALLS="${CALLS:-100000}"; SIZE="${SIZE:-512}"
PIN="${PIN:-0}"; WORKERS="${WORKERS:-1}"; CONNS="${CONNS:-50}"; DURATION="${DURATION:-10}"; ROUNDS="${ROUNDS:-3}"
UP_PORT="${UP_PORT:-18080}"; PG_PORT="${PG_PORT:-18083}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"
source "$root/bench/common.sh"
need_tools nginx wrk
bench_workdir

echo "building (release)..." >&2
(cd "$root" && cargo build --release -q -p polygate -p ffi-rust-echo -p polygate-python -p polygate-java)
(cd "$root/examples/go" && go build -buildmode=c-shared -o "$work/libffi_go_echo.so" ./echo)
mvn -q -B -f "$root/runtimes/java/sdk/pom.xml" install
mvn -q -B -f "$root/examples/java/pom.xml" package
bash "$root/scripts/libnode.sh" "$CARGO_TARGET_DIR/libnode"
bash "$root/runtimes/node/build.sh" "$CARGO_TARGET_DIR/libnode" "$work"
rel="$CARGO_TARGET_DIR/release"
cp "$rel/libffi_rust_echo.so" "$rel/libffi_python3.so" "$rel/libffi_java.so" "$work/"
export CLASSPATH="$root/runtimes/java/sdk/target/polygate-ffi-0.1.0.jar:$root/examples/java/target/polygate-java-examples-0.1.0.jar"

# lang -> (lib, echo cfg, continue cfg)
declare -A LIB=([go]=ffi_go_echo [rust]=ffi_rust_echo [rust-inline]=ffi_rust_echo [python]=ffi_python3 [java]=ffi_java [node]=ffi_nodejs)
declare -A ECHO=([go]="" [rust]="" [rust-inline]=",inline" [python]="$root/examples/python/echo,init" [java]="example.Echo,init" [node]="$root/examples/node/echo.js,init")
declare -A CONT=([go]="continue" [rust]="continue" [rust-inline]="continue,inline" [python]="$root/examples/python/echo,init_continue" [java]="example.Echo,initContinue" [node]="$root/examples/node/echo.js,continue_")
read -r -a LANGS <<< "${LANGS:-go rust rust-inline python java node}"

upstream_conf "$work" "$UP_PORT"
{
  polygate_conf_head "$PG_PORT" "$WORKERS" "$UP_PORT"
  cat <<YAML
  - id: seq
    uri: /seq
    plugins:
      lua:
        access: |
          local libs = {go = "ffi_go_echo", rust = "ffi_rust_echo", ["rust-inline"] = "ffi_rust_echo", python = "ffi_python3", java = "ffi_java", node = "ffi_nodejs"}
          local cfgs = {["rust-inline"] = "${ECHO[rust-inline]}", python = "${ECHO[python]}", java = "${ECHO[java]}", node = "${ECHO[node]}"}
          local lang = ngx.var.arg_lang
          local rt = assert(ngx.load_ffi(libs[lang], cfgs[lang]))
          local n, buf = tonumber(ngx.var.arg_n), string.rep("x", tonumber(ngx.var.arg_size))
          assert(select(2, rt:echo(buf)) == buf)
          ngx.update_time()
          local t0 = ngx.now()
          for i = 1, n do
            local ok, res = rt:echo(buf)
            if not ok or #res ~= #buf then error("call " .. i .. " failed: " .. tostring(res)) end
          end
          ngx.update_time()
          ngx.say(string.format("%.2f", (ngx.now() - t0) * 1e6 / n))
          return ngx.exit(200)
YAML
  for l in "${LANGS[@]}"; do
    printf '  - id: %s\n    uri: /ffi/%s\n    upstream_id: up\n    plugins:\n      ffi: {lib: %s, cfg: "%s"}\n' "$l" "$l" "${LIB[$l]}" "${CONT[$l]}"
  done
  echo "#END"
} > "$work/polygate.yaml"
sed -i "s|^  worker_threads: .*|&\n  ffi_lib_path: [\"$work\"]\n  timeouts: {client_send: 600}|" "$work/polygate.yaml"

CP=()
if [ "$PIN" = 1 ]; then need_tools taskset; CP=(taskset -c 1); fi
"${CP[@]}" nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)
"$rel/polygate" run -c "$work/polygate.yaml" 2>"$work/pg.err" & pids+=($!); pgpid=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PG_PORT/plain" && break; sleep 0.1; done
if [ "$PIN" = 1 ]; then
  for t in /proc/"$pgpid"/task/*; do
    grep -q '^polygate-worker' "$t/comm" && taskset -pc 0 "$(basename "$t")" >/dev/null
  done
fi
for l in "${LANGS[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PG_PORT/ffi/$l")
  [ "$code" = 200 ] || { echo "ffi route $l answered $code"; tail -20 "$work/pg.err"; exit 1; }
done

echo; echo "== A. $CALLS sequential ${SIZE} B echo calls from Lua, µs per call (workers=$WORKERS)"
for l in "${LANGS[@]}"; do
  us=$(curl -s -m 600 "http://127.0.0.1:$PG_PORT/seq?lang=$l&n=$CALLS&size=$SIZE")
  printf "%-11s %10s µs/call\n" "$l" "$us"
done

pinning="unpinned"; [ "$PIN" = 1 ] && pinning="workers on CPU 0, wrk and upstream on CPU 1"
echo; echo "== B. gateway req/s, ffi plugin on every request vs plain (workers=$WORKERS, $CONNS conns, ${DURATION}s, median of $ROUNDS, $pinning)"
# each language's run is paired with a plain run just before it: the machine's speed drifts
# over a round, and a ratio taken between runs far apart measures the drift
# CPU time of every polygate thread (cpu_ns, bench/common.sh), read around each run:
# the CPU one request costs the whole process, language runtimes' threads included, moves less
# with the machine's speed than requests/s do
# the machine's CPU time and the part of it the hypervisor gave to other guests (steal), in
# ticks: on a shared VM steal reached 35% of a run, and a run that loses that much says nothing
# about polygate (a stolen tick also counts as CPU time of the thread it interrupted)
ticks() { awk 'NR == 1 {t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $9}' /proc/stat; }
run() { # url -> "req/s cpu-µs-per-request steal-%"
  local c0 c1 rps n t0 s0 t1 s1
  read -r t0 s0 < <(ticks)
  c0=$(cpu_ns "$pgpid"); read -r rps _ < <(wrk_run "$work/wrk.out" "$1" "${CP[@]}"); c1=$(cpu_ns "$pgpid")
  read -r t1 s1 < <(ticks)
  n=$(awk '/requests in/ {print $1}' "$work/wrk.out")
  echo "$rps $(python3 -c "print(round(($c1 - $c0) / 1000 / max($n, 1), 2), round(100 * ($s1 - $s0) / max($t1 - $t0, 1), 1))")"
}
: > "$work/res"
for r in $(seq "$ROUNDS"); do
  for l in "${LANGS[@]}"; do
    read -r pr pc ps < <(run "http://127.0.0.1:$PG_PORT/plain")
    read -r fr fc fs < <(run "http://127.0.0.1:$PG_PORT/ffi/$l")
    echo "$l $pr $fr $pc $fc $ps $fs" >> "$work/res"
  done
done
python3 - "$work/res" "${STEAL_MAX:-5}" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
steal_max = float(sys.argv[2])
by = {}
for lang, plain, ffi, pcpu, fcpu, psteal, fsteal in rows:
    by.setdefault(lang, []).append(tuple(map(float, (plain, ffi, pcpu, fcpu, psteal, fsteal))))
targets = {"go": 0.9, "rust": 0.9, "rust-inline": 0.9, "python": 0.6, "java": 0.75, "node": 0.6}
print(f"{'route':11} {'plain req/s':>12} {'ffi req/s':>10} {'ratio':>7} {'target':>7}        {'CPU µs/req plain, ffi':>21} {'CPU ratio':>9} {'low-steal':>10}  rounds (steal %)")
for k in [k for k in ["go", "rust", "rust-inline", "python", "java", "node"] if k in by]:
    pairs = by[k]
    ratios = [p[1] / p[0] for p in pairs]
    ratio = statistics.median(ratios)
    plain = statistics.median(p[0] for p in pairs)
    ffi = statistics.median(p[1] for p in pairs)
    pc = statistics.median(p[2] for p in pairs)
    fc = statistics.median(p[3] for p in pairs)
    cpu = statistics.median(p[2] / p[3] for p in pairs if p[3] > 0)
    calm = [p[1] / p[0] for p in pairs if max(p[4], p[5]) <= steal_max]
    low = f"{statistics.median(calm):.2f} ({len(calm)})" if calm else "-"
    verdict = "ok" if ratio >= targets[k] else "MISSED"
    each = ", ".join(f"{r:.2f} ({max(p[4], p[5]):.0f})" for r, p in zip(ratios, pairs))
    print(f"{k:11} {plain:>12.0f} {ffi:>10.0f} {ratio:>7.2f} {targets[k]:>7.2f} {verdict:6}  {pc:>10.1f}, {fc:>10.1f} {cpu:>9.2f} {low:>10}  {each}")
print("CPU ratio: the plain route's CPU per request over the ffi route's (every polygate thread)")
print(f"low-steal: the median ratio over the pairs whose two runs each lost at most {steal_max:g}% of the")
print("machine's CPU time to other guests (steal, /proc/stat), and how many pairs that is; the")
print("verdict stays on the median of every pair")
PY
