#!/usr/bin/env bash
# Time a new user's first `make serve`: a fresh clone of REV, an empty pip cache and a fresh model and kernel
# cache, until /ready answers 200; then the size of the venv. Stops the server it started.
# usage: loadtests/fresh_clone.sh [REV] [PORT] [DIR]      (defaults: HEAD, 8199, a new temporary folder)
set -eu
rev=${1:-HEAD}; port=${2:-8199}; dir=${3:-$(mktemp -d)/loraplex}
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
rev=$(git -C "$src" rev-parse --short "$rev")
git clone -q "$src" "$dir" && git -C "$dir" checkout -q "$rev"
cd "$dir"
start=$(date +%s.%N)
PIP_NO_CACHE_DIR=1 make serve ARGS="--port $port --cache-dir $dir/.fresh-cache" > serve.log 2>&1 &
until curl -sf "http://127.0.0.1:$port/ready" > /dev/null; do
  sleep 0.5
  if ! kill -0 $! 2> /dev/null; then echo "make serve exited; see $dir/serve.log" >&2; exit 1; fi
done
echo "rev $rev: ready after $(echo "$(date +%s.%N) - $start" | bc) s; venv $(du -sm .venv | cut -f1) MiB"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cores"
pkill -f "loraplex serve --port $port" || true
