#!/usr/bin/env bash
# Builds release binaries and measures the warm invoke path through the gateway against the
# `GET /health` floor in one run (js, and `provided` for reference). Not part of CI.
# Usage: bench/warm-path.sh [--n 2000] [--block 100] [--no-provided]
# On a VM whose idle vCPUs halt, cross-vCPU wake-ups dominate; `taskset -c 0 bench/warm-path.sh`
# keeps client and server (which inherits the mask) on one vCPU to measure Skiff itself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p skiff-cli -p provided-hello -p skiff-bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
exec "${CARGO_TARGET_DIR:-target}/release/skiff-warm-path" "$@"
