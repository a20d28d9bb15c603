#!/usr/bin/env bash
# Platform benchmarks: timer delivery (PIT 1 kHz, LAPIC 10 kHz), IPI round trip, idle CPU use,
# v3 beside QEMU -accel kvm on the same pctest kernel. Usage: bench/platform.sh [--only pit,ipi]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q qemu-system-x86 >/dev/null
fi
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
exec python3 bench/platform.py --v3 target/release/v3 --guest bench/out/guests/pctest.elf "$@"
