#!/usr/bin/env bash
# Builds release binaries and runs the gVisor tier benchmarks (sandbox: gvisor, runsc) against
# the real `skiff serve` over loopback: cold start vs raw `runsc run` of the same bundle,
# branched (snapshot restore) vs plain cold start, warm invoke (vs native), and 100 concurrent
# sandboxes with their memory. Needs root and runsc (apt-get install runsc).
# Usage: bench/gvisor.sh [--cold 20] [--snap 15] [--warm 500] [--conc 100] [--pause-ms 300].
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v runsc >/dev/null || { echo "runsc not found (apt-get install runsc)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "the gVisor tier needs root" >&2; exit 1; }
cargo build --release -p skiff-cli -p skiff-bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
status=0
target/release/skiff-gvisor-bench "$@" || status=$?
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
exit $status
