#!/usr/bin/env bash
# Live migration over loopback, v3 (emulator) beside QEMU (TCG): a 1 GiB idle guest and one
# dirtying 16 MiB every 50 ms; total time and downtime as the guest's output shows it.
# Usage: bench/migrate.sh [--reps N]   (installs Debian's qemu-system-x86 if it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/need-qemu.sh
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
exec python3 bench/migrate.py --v3 target/release/v3 --guest bench/out/guests/dirtier.elf "$@"
