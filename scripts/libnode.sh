#!/usr/bin/env bash
# Unpacks Debian's libnode (Node.js 18, the embedder API) into <dir> for the Node.js loader:
# scripts/libnode.sh <dir>. libnode-dev cannot be installed beside the machine's Node.js
# package (they conflict), so the packages are downloaded and unpacked instead; libnode's
# shared-library dependencies are installed (as root) when missing, and the JavaScript files
# Debian's libnode loads from fixed paths under /usr/share/nodejs (acorn, cjs-module-lexer,
# undici) are put there.
set -euo pipefail
dir="$1"
share() {
  for d in "$dir"/usr/share/nodejs/*; do
    [ -e "/usr/share/nodejs/$(basename "$d")" ] && continue
    mkdir -p /usr/share/nodejs && cp -a "$d" /usr/share/nodejs/ || {
      echo "cannot install $(basename "$d") into /usr/share/nodejs (run as root)" >&2; exit 1; }
  done
}
if [ -e "$dir/usr/lib/x86_64-linux-gnu/libnode.so.108" ] && [ -e "$dir/usr/include/node/node.h" ]; then
  share
  exit 0
fi
mkdir -p "$dir/debs"
(cd "$dir/debs" && apt-get download libnode108 libnode-dev libuv1-dev node-acorn node-cjs-module-lexer node-undici >/dev/null 2>&1) || {
  [ "$(id -u)" = 0 ] && apt-get update -qq && (cd "$dir/debs" && apt-get download libnode108 libnode-dev libuv1-dev node-acorn node-cjs-module-lexer node-undici)
}
for f in "$dir"/debs/*.deb; do dpkg-deb -x "$f" "$dir"; done
missing=$(ldd "$dir/usr/lib/x86_64-linux-gnu/libnode.so.108" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
  pkgs=()
  for m in $missing; do
    case "$m" in
      libcares.so.2) pkgs+=(libc-ares2) ;;
      libuv.so.1) pkgs+=(libuv1) ;;
      libnghttp2.so.14) pkgs+=(libnghttp2-14) ;;
      libbrotli*) pkgs+=(libbrotli1) ;;
      libicu*) pkgs+=(libicu72) ;;
      libssl.so.3|libcrypto.so.3) pkgs+=(libssl3) ;;
      *) echo "libnode needs $m: install it" >&2; exit 1 ;;
    esac
  done
  apt-get install -y -qq "${pkgs[@]}" || { apt-get update -qq && apt-get install -y -qq "${pkgs[@]}"; }
fi
share
