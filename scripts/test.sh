#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then format check,
# clippy (warnings are errors), unit + end-to-end tests, docs, and `polygate validate` over
# the shipped example configurations.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-target}"
export CARGO_TERM_COLOR=never

# System packages the suite needs: kill(1) for signal tests, a C compiler for the C runtimes
# of the FFI tests, nginx for the raw-byte probes (tests/probes compare polygate with it),
# etcd for the Admin API and cluster tests, Redis for the limit plugins' tests.
# Go (for the Go runtimes) comes with the machine image.
need_pkgs=()
command -v kill >/dev/null || need_pkgs+=(procps)
command -v cc >/dev/null || need_pkgs+=(gcc libc6-dev)
# the TLS tests make RSA keys and check certificates with the openssl command
command -v openssl >/dev/null || need_pkgs+=(openssl)
[ -x /usr/sbin/nginx ] || need_pkgs+=(nginx-light)
command -v go >/dev/null || { echo "the FFI tests build Go runtimes: install Go (go1.22+)" >&2; exit 1; }
command -v javac >/dev/null || need_pkgs+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need_pkgs+=(maven)
# the Admin API and cluster tests start their own etcd (tests/e2e/etcd.rs, admin.rs)
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
# the limit plugins' tests start their own Redis (tests/e2e/limits.rs)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
if ((${#need_pkgs[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}"
    # the package starts a system nginx on port 80; the tests run their own
    if [[ " ${need_pkgs[*]} " == *" nginx-light "* ]]; then
      (systemctl stop nginx || service nginx stop || pkill -x nginx) >/dev/null 2>&1 || true
    fi
    # and etcd-server may start a system etcd on 2379; the tests run their own on free ports
    if [[ " ${need_pkgs[*]} " == *" etcd-server "* ]]; then
      (systemctl stop etcd || service etcd stop || pkill -x etcd) >/dev/null 2>&1 || true
    fi
    # and redis-server a system Redis on 6379; the tests run their own on free ports
    if [[ " ${need_pkgs[*]} " == *" redis-server "* ]]; then
      (systemctl stop redis-server || service redis-server stop || pkill -x redis-server) >/dev/null 2>&1 || true
    fi
  else
    echo "missing packages: ${need_pkgs[*]} (run as root or install them)" >&2; exit 1
  fi
fi

step() { echo; echo "==> $*"; }
step "cargo fmt --check";   cargo fmt --all --check
step "cargo clippy";        cargo clippy --workspace --all-targets -q -- -D warnings
step "build the Rust example runtime and the Python loader (loaded by the end-to-end tests)"
cargo build -q -p ffi-rust-echo -p polygate-python -p polygate-java
step "Java: the SDK, the examples and the test runtimes (Maven)"
mvn -q -B -f runtimes/java/sdk/pom.xml install
mvn -q -B -f examples/java/pom.xml package
mvn -q -B -f tests/e2e/java/pom.xml package
step "Node.js: Debian's libnode unpacked (scripts/libnode.sh), the loader built against it"
bash scripts/libnode.sh "$CARGO_TARGET_DIR/libnode"
bash runtimes/node/build.sh "$CARGO_TARGET_DIR/libnode" "$CARGO_TARGET_DIR/node"
step "Python packages: cffi (lua-resty-ffi-style runtimes), a virtualenv with jsonschema (examples/python)"
python3 -c "import cffi" 2>/dev/null || python3 -m pip install -q cffi
export POLYGATE_TEST_PYVENV="$CARGO_TARGET_DIR/pyvenv"
if ! "$POLYGATE_TEST_PYVENV/bin/python" -c "import jsonschema" 2>/dev/null; then
  rm -rf "$POLYGATE_TEST_PYVENV"
  python3 -m venv "$POLYGATE_TEST_PYVENV"
  "$POLYGATE_TEST_PYVENV/bin/pip" install -q jsonschema
fi
step "proxy-wasm test filters: AssemblyScript from npm (scripts/wasm-filters.sh)"
bash scripts/wasm-filters.sh "$CARGO_TARGET_DIR/wasm-filters"
step "h2spec (HTTP/2 conformance) from the Go module proxy"
export POLYGATE_H2SPEC="$CARGO_TARGET_DIR/h2spec/h2spec"
[ -x "$POLYGATE_H2SPEC" ] || GOBIN="$CARGO_TARGET_DIR/h2spec" go install github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible
step "cargo test"
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
step "one process, every runtime: ${POLYGATE_SOAK_SECS:-60} s of load with Go, Rust, Python, Java, Node.js, Lua and a trapping wasm filter, then SIGTERM / SIGINT"
cargo test -q -p polygate --test e2e soak -- --ignored --test-threads=1 --nocapture 2>&1 | tee -a "$log" | grep -E -A4 "soak with|test result|panicked|FAILED" | grep -v "^ *[0-9]*: \|^ *at " || true
grep -q "^test result: ok. 2 passed" <(grep "^test result" "$log" | tail -1) || {
  # what the failing soak saw: the assertion's values and the gateway's last log lines
  grep -E -A2 "left:|right:" "$log" | tail -20
  sed -n '/^---- soak/,/^failures:/p' "$log" | grep -v '^{' | tail -60
  echo "the soak tests failed" >&2; exit 1; }
passed=$(awk '/^test result:/ {s += $4} END {print s + 0}' "$log")
failed=$(awk '/^test result:/ {s += $6} END {print s + 0}' "$log")
step "FFI host tests under valgrind (memory errors, leaks)"
if command -v valgrind >/dev/null || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq valgrind; }; then
  vlog="$(mktemp)"
  if bash scripts/valgrind-ffi.sh >"$vlog" 2>&1; then vstatus=0; else vstatus=$?; fi
  cat "$vlog" >> "$log"
  grep -E -A6 "test result|ERROR|lost|panicked|^failures:" "$vlog" | grep -v "^ *[0-9]*: \|^ *at " || true
  rm -f "$vlog"
  [ "$vstatus" = 0 ] || { echo "valgrind found problems (exit $vstatus)" >&2; exit 1; }
fi
step "cargo doc";           RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q
step "validate examples"
cargo build -q -p polygate
# examples/languages.yaml finds the loaders through these
export POLYGATE_LIB_DIR="$CARGO_TARGET_DIR/debug" POLYGATE_NODE_LIB_DIR="$CARGO_TARGET_DIR/node"
for f in examples/*.yaml examples/*.json; do
  [ -e "$f" ] || continue
  "$CARGO_TARGET_DIR/debug/polygate" validate -c "$f"
done
step "go vet (Go SDK and examples)"
(cd runtimes/go && go vet ./...)
(cd examples/go && go vet ./...)
echo; echo "all checks passed"
echo "tests: $passed passed, $failed failed"
