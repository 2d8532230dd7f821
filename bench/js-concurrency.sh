#!/usr/bin/env bash
# Builds release binaries and runs the JS tier load test: js warm/cold latency through the
# gateway, then 10,000 concurrent in-flight invocations (1 s await each) on one isolate.
# Usage: bench/js-concurrency.sh [--n 10000] [--warm 2000] [--cold 200]. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p skiff-cli -p skiff-bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
# Both the client and `skiff serve` (which raises its own soft limit) need a socket per request.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec target/release/skiff-js-load "$@"
