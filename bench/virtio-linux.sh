#!/usr/bin/env bash
# Linux guest virtio-blk and virtio-net throughput: v3 on the emulator backend beside
# qemu-system-x86_64 -accel tcg, same kernel, initramfs, command line, 256 MiB of RAM, the same
# kind of disk image (300 MiB sparse raw, in /dev/shm) and TAP (in a network namespace), in the
# same run; prints the medians and the v3/QEMU throughput ratios (higher is better, >= 1.0 meets
# the target). Each boot measures, in the guest: 256 MiB dd write and read on /dev/vda with
# O_DIRECT, then 64 MiB over TCP guest->host and host->guest (busybox nc against a python3
# server in the namespace). See bench/virtio_linux.py for the details.
# Needs root (network namespaces, TAP devices) and /dev/net/tun.
# Usage: bench/virtio-linux.sh [--reps 3] [--mem 256] [--blk-mib 256] [--net-mib 64]
#        (builds the guest with scripts/fetch-linux-guest.sh; installs Debian's
#        qemu-system-x86 if it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "bench/virtio-linux.sh: needs root (network namespaces and TAP devices); try sudo" >&2
  exit 1
fi
if [ ! -c /dev/net/tun ]; then
  echo "bench/virtio-linux.sh: no /dev/net/tun here (TAP devices are needed for virtio-net)" >&2
  exit 1
fi
source bench/need-qemu.sh
cargo build --release -q -p v3
bash scripts/fetch-linux-guest.sh
exec python3 bench/virtio_linux.py --v3 target/release/v3 --dir guests/linux "$@"
