#!/usr/bin/env bash
# Runs the cargo fuzz targets (fuzz/): config loading, the vars DSL, the path normaliser and
# the upstream response parser, each for SECONDS (default 300), one after the other.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); the toolchain is stable, so the sanitizer
# flags cargo-fuzz passes are enabled with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${SECONDS_PER_TARGET:-300}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/polygate-fuzz-target}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config vars path response)
for t in "${targets[@]}"; do
  echo "==> fuzz $t for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 2>&1 | tail -4
done
