#!/usr/bin/env bash
# Linux boot benchmark (issue 6): time from process start to the initramfs's
# PALACIOS-LINUX-READY line, v3 on the emulator backend beside qemu-system-x86_64 -accel tcg,
# with the same kernel, initramfs, command line and memory, in the same run; prints the ratio.
# Usage: bench/linux-boot.sh [--reps 3] [--cmdline "console=ttyS0 ..."] [--mem 256]
#        (builds the guest with scripts/fetch-linux-guest.sh; installs Debian's
#        qemu-system-x86 if it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/need-qemu.sh
cargo build --release -q -p v3
bash scripts/fetch-linux-guest.sh
exec python3 bench/linux_boot.py --v3 target/release/v3 --dir guests/linux "$@"
