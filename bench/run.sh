#!/usr/bin/env bash
# Benchmarks of issue 3, each beside QEMU (-accel kvm) running the same multiboot guest:
#   exit round trip, start to exit, memory overhead.
# Usage: bench/run.sh            (installs Debian's qemu-system-x86 if it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/need-qemu.sh
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
exec python3 bench/bench.py --v3 target/release/v3 --guest bench/out/guests/mbtest.elf "$@"
