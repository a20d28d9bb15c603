#!/usr/bin/env bash
# ConCORD (memory-content tracking), emulator backend; every ratio is to a reference measured
# in the same run (see bench/concord.py):
# 1. update monitor throughput in a 1 GiB concord.elf VM: pages hashed per second on one core
#    (and GiB/s), directory updates published per second (no reference in v3: no ratio);
# 2. cost to a running guest: emubench mem and sieve with the concord extension over without
#    it (interval 100 ms), median of K runs; target <= 1.10;
# 3. query latency (copies of one content, sharing over 4 VMs) with 4 concord.elf VMs on an
#    embedded directory, then on a 3-node Redis Cluster in network namespaces
#    (scripts/redis-cluster-ns.sh; SKIP with the reason if it cannot be set up): redis/embedded;
# 4. collective checkpoint of 4 Linux guests against 4 individual checkpoints: time, size,
#    and the space saved against the shared fraction the `sharing` query reports (target:
#    saved >= 0.9 x shared).
# Uses target/release/v3 as it is (V3=path to pick another); fetches the Linux guest
# (scripts/fetch-linux-guest.sh) if it is missing, builds guests/ if concord.elf or
# emubench.elf is missing. Redis needs root, ip, redis-server and redis-cli.
# Usage: bench/concord.sh [--reps K] [--no-linux] [--no-redis] [--only 1,2,3,4]
#        (default K 3; about 10 minutes on a 2-core host, most of it booting the Linux guests;
#        exits 1 on an error, not on a missed target)
set -euo pipefail
cd "$(dirname "$0")/.."
V3=${V3:-target/release/v3}
if [ ! -x "$V3" ]; then
  echo "concord: $V3 is missing; build it with: cargo build --release -p v3" >&2
  exit 1
fi
linux=1
for arg in "$@"; do
  if [ "$arg" = --no-linux ]; then linux=0; fi
done
if [ "$linux" = 1 ] && { [ ! -s guests/linux/bzImage ] || [ ! -s guests/linux/initramfs.cpio.gz ]; }; then
  bash scripts/fetch-linux-guest.sh
fi
if [ ! -f guests/build/concord.elf ] || [ ! -f guests/build/emubench.elf ]; then
  make -s -C guests O=build
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/concord-bench.XXXXXX")
py=""
keep=0
cleanup() {
  if [ -n "$py" ]; then kill "$py" 2>/dev/null || true; wait "$py" 2>/dev/null || true; fi
  # Any VM still up (the Python side stops its own; this is for the worst case).
  for s in "$work"/*.sock; do
    if [ -S "$s" ]; then "$V3" --log-level error stop "$s" >/dev/null 2>&1 || true; fi
  done
  # A Redis Cluster the Python side did not take down: "PREFIX WORKDIR SUBNET".
  if [ -s "$work/redis-prefix" ]; then
    read -r prefix rwork subnet <"$work/redis-prefix" || true
    CONCORD_SUBNET=$subnet bash scripts/redis-cluster-ns.sh down "$prefix" "$rwork" >/dev/null 2>&1 || true
  fi
  if [ "$keep" = 0 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
kernel=()
if [ "$linux" = 1 ]; then
  kernel=(--kernel guests/linux/bzImage --initrd guests/linux/initramfs.cpio.gz)
fi
python3 bench/concord.py --v3 "$V3" --concord-elf guests/build/concord.elf --emubench guests/build/emubench.elf \
  "${kernel[@]}" --workdir "$work" "$@" &
py=$!
rc=0
wait "$py" || rc=$?
py=""
# A run that failed keeps its work directory (console logs) for a look.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && ls "$work"/console-*.log >/dev/null 2>&1; then
  keep=1
  echo "concord: work directory kept: $work" >&2
fi
exit "$rc"
