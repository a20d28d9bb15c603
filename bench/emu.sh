#!/usr/bin/env bash
# Emulator CPU benchmarks: v3 --backend emu beside QEMU -accel tcg on the same emubench kernel
# (dec/jnz, memory, call/ret, flag-heavy ALU loops in MIPS; CRC-32 and a sieve as mixed workloads).
# Usage: bench/emu.sh [--reps 3] [--scale 1.0] [--only dec,crc32]
#        (installs Debian's qemu-system-x86 if it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/need-qemu.sh
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
exec python3 bench/emu.py --v3 target/release/v3 --guest bench/out/guests/emubench.elf "$@"
