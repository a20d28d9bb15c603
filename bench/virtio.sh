#!/usr/bin/env bash
# virtio-blk device path (independent of guest CPU speed): guests/virtio issuing N random 4 KiB
# reads, one in flight, against a disk held in RAM, with MSI-X completions; v3 beside QEMU on
# the same guest: the emulator against QEMU TCG, KVM against QEMU -accel kvm.
# Usage: bench/virtio.sh [--reps N] [--reads N]   (installs Debian's qemu-system-x86 if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/need-qemu.sh
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
exec python3 bench/virtio_blk.py --v3 target/release/v3 --guest bench/out/guests/virtio.elf "$@"
