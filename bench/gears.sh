#!/usr/bin/env bash
# GEARS on the Linux guest, emulator backend: what system-call interception costs (a pid rule
# for another process: target <= 1.02 of no rule; a rule that stops every call: the cost of
# one interception) and what a guarded module's border crossing costs with the stack check on
# and off, beside a plain hypercall measured in the same run. See bench/gears.py.
# Uses target/release/v3 as it is (V3=path to pick another); fetches the guest
# (scripts/fetch-linux-guest.sh) if it is missing, builds the GEARS overlay
# (scripts/build-gears-guest.sh target/gears-guest) and guests/symtest if missing.
# Usage: bench/gears.sh [--reps K] [--rounds R] [--n-loop N] [--n-hit N] [--n-bench N]
#        (defaults 3, 6, 100000, 20000, 20000: about 35 s a boot on a 2-core host; every figure
#        is the median of the K boots; exits 1 on an error, not on a missed target)
set -euo pipefail
cd "$(dirname "$0")/.."
V3=${V3:-target/release/v3}
if [ ! -x "$V3" ]; then
  echo "gears: $V3 is missing; build it with: cargo build --release -p v3" >&2
  exit 1
fi
if [ ! -s guests/linux/bzImage ] || [ ! -s guests/linux/initramfs.cpio.gz ]; then
  bash scripts/fetch-linux-guest.sh
fi
overlay=$(bash scripts/build-gears-guest.sh target/gears-guest)
[ -f guests/build/symtest.elf ] || make -s -C guests O=build
work=$(mktemp -d "${TMPDIR:-/tmp}/gears-bench.XXXXXX")
py=""
keep=0
cleanup() {
  if [ -n "$py" ]; then kill "$py" 2>/dev/null || true; wait "$py" 2>/dev/null || true; fi
  # Any VM still up (the Python side kills its own; this is for the worst case).
  for s in "$work"/*.sock; do
    if [ -S "$s" ]; then "$V3" --log-level error stop "$s" >/dev/null 2>&1 || true; fi
  done
  if [ "$keep" = 0 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
python3 bench/gears.py --v3 "$V3" --kernel guests/linux/bzImage --initrd guests/linux/initramfs.cpio.gz \
  --overlay "$overlay" --manifest target/gears-guest/guarded.manifest.json \
  --symtest guests/build/symtest.elf --workdir "$work" "$@" &
py=$!
rc=0
wait "$py" || rc=$?
py=""
# A run that failed with a VM's console log keeps its work directory for a look.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && ls "$work"/console-*.log >/dev/null 2>&1; then keep=1; fi
exit "$rc"
