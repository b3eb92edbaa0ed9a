#!/usr/bin/env bash
# Builds polygate's Node.js loader: runtimes/node/build.sh <libnode root> <output dir>
# <libnode root> holds Debian's libnode108 and libnode-dev unpacked (scripts/libnode.sh makes
# it); the loader gets an rpath to its libnode.
set -euo pipefail
root="$(cd "$1" && pwd)"; out="$2"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
libdir="$root/usr/lib/x86_64-linux-gnu"
[ -d "$libdir" ] || libdir="$(dirname "$(find "$root" -name 'libnode.so.*' | head -1)")"
g++ -std=c++17 -O2 -fPIC -shared -pthread -fvisibility=hidden \
  -I"$root/usr/include/node" -I"$root/usr/include" \
  -o "$out/libffi_nodejs.so" "$here/loader.cc" \
  -L"$libdir" -l:libnode.so.108 -Wl,-rpath,"$libdir"
