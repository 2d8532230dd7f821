#!/usr/bin/env bash
# Builds release binaries and runs the end-to-end benchmark. Not part of CI.
# Usage: bench/run.sh [--warm N] [--cold N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p skiff-cli -p provided-hello -p skiff-bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
exec target/release/skiff-bench "$@"
