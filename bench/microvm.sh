#!/usr/bin/env bash
# Builds release binaries and runs the microVM tier benchmarks (sandbox: microvm, QEMU
# `microvm`) against the real `skiff serve` over loopback: boot and snapshot restore to first
# reply (vs a native cold start), warm invoke (vs native) and the memory of idle VMs. Needs
# root and QEMU (apt-get install qemu-system-x86; scripts/setup.sh installs it).
# Usage: bench/microvm.sh [--boot 5] [--restore 15] [--warm 300] [--idle 3] [--pause-ms 300].
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-system-x86_64 >/dev/null || { echo "QEMU not found (apt-get install qemu-system-x86)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "the microVM tier needs root" >&2; exit 1; }
cargo build --release -p skiff-cli -p skiff-bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "$(qemu-system-x86_64 --version | head -1); accelerator: $(target/release/skiff doctor 2>/dev/null | grep -o 'accelerator [a-z]* ([^)]*)' || echo unknown)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
status=0
target/release/skiff-microvm-bench "$@" || status=$?
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
exit $status
