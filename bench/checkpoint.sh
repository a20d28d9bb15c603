#!/usr/bin/env bash
# Checkpoint benchmarks (restore time at 256 MiB and 2 GiB, save time and size, pause latency),
# each beside QEMU (TCG) measured in the same run.
# Usage: bench/checkpoint.sh [--reps N]   (installs Debian's qemu-system-x86 if it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/need-qemu.sh
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
kvm=()
[ -w /dev/kvm ] && kvm=(--kvm)
exec python3 bench/checkpoint.py --v3 target/release/v3 --guest bench/out/guests/countdown.elf "${kvm[@]}" "$@"
