#!/usr/bin/env bash
# Hypercall and SymCall round trips against the port-I/O exit floor, on the emulator and on KVM
# (when /dev/kvm works), with the issue's targets: hypercall <= 1.1 exits, SymCall <= 3 exits.
# Uses target/release/v3 as it is (V3=path to pick another); builds the guests if missing.
# Usage: bench/hypercall.sh [--reps K]   (default 3; every figure is the median of K runs)
set -euo pipefail
cd "$(dirname "$0")/.."
V3=${V3:-target/release/v3}
if [ ! -x "$V3" ]; then
  echo "hypercall: $V3 is missing; build it with: cargo build --release -p v3" >&2
  exit 1
fi
[ -f guests/build/symtest.elf ] || make -s -C guests O=build
prefix="hcbench-$$"
py=""
cleanup() {
  if [ -n "$py" ]; then kill "$py" 2>/dev/null || true; wait "$py" 2>/dev/null || true; fi
  # Any background VM still up (the Python side kills its own; this is for the worst case).
  for s in "${XDG_RUNTIME_DIR:-/nonexistent}/palacios-rs/$prefix"-*.sock "/tmp/palacios-rs-$(id -u)/$prefix"-*.sock; do
    if [ -S "$s" ]; then "$V3" --log-level error stop "$s" >/dev/null 2>&1 || true; fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
python3 bench/hypercall.py --v3 "$V3" --guest guests/build/symtest.elf --prefix "$prefix" "$@" &
py=$!
rc=0
wait "$py" || rc=$?
py=""
exit "$rc"
