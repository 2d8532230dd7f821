#!/usr/bin/env bash
# One-time host set-up for Skiff on Debian/Ubuntu: the packages the sandbox tiers and the
# runtimes use. Idempotent; installs only what is missing. Needs root (the native sandbox
# itself needs root today).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "scripts/setup.sh: run as root (the native sandbox needs root for namespaces and cgroups)" >&2
  exit 1
fi
need=()
command -v slirp4netns >/dev/null || need+=(slirp4netns)   # network: outbound (userspace NAT)
command -v ip >/dev/null || need+=(iproute2)                # test hosts in network namespaces
command -v runsc >/dev/null || need+=(runsc)                # sandbox: gvisor (gVisor's runsc)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)  # sandbox: microvm
# microVM guest images: a static busybox for the initramfs, mkfs.ext4 for the disks, strip.
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need+=(busybox-static)
command -v mkfs.ext4 >/dev/null || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
command -v strip >/dev/null || need+=(binutils)
[ -x /usr/bin/python3 ] || need+=(python3)                  # runtime python3
[ -x /usr/bin/node ] || need+=(nodejs)                      # runtime node
# pip for the test clients (boto3, awscli) and fixtures (awslambdaric), installed with --target.
{ /usr/bin/python3 -m pip --version && python3 -m pip --version; } >/dev/null 2>&1 || need+=(python3-pip)
command -v npm >/dev/null || need+=(npm)                    # componentize-js (Wasm test guests)
command -v cc >/dev/null || need+=(build-essential)         # bundled SQLite, zstd
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
  echo "installed: ${need[*]}"
fi
