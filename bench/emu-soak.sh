#!/usr/bin/env bash
# Emulator soak: differential testing against the host CPU (crates/emu/tests/differential/)
# in release mode, a million random cases by default. Every general-purpose integer instruction
# form runs natively and in the emulator; registers, defined flags and memory must agree.
# Usage: bench/emu-soak.sh [cases] [seed]     (default: 1000000 cases, a random seed)
#        PALACIOS_DIFF_FORM=Shld bench/emu-soak.sh 100000   (only forms whose name matches)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -m)" != x86_64 ]; then
  echo "emu-soak: skipped, differential testing needs an x86_64 host (this is $(uname -m))"
  exit 0
fi
cases="${1:-${PALACIOS_DIFF_CASES:-1000000}}"
seed="${2:-${PALACIOS_DIFF_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}}"
echo "emu-soak: $cases cases, seed $seed"
cargo test --release -q -p palacios-emu --test differential --no-run
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
PALACIOS_DIFF_CASES="$cases" PALACIOS_DIFF_SEED="$seed" \
  cargo test --release -q -p palacios-emu --test differential -- --nocapture 2>&1 | tee "$log" \
  || status=$?
summary="$(grep -E '^differential: [0-9]+ cases run' "$log" | tail -1 || true)"
if [ -n "$summary" ]; then
  ran="$(sed -E 's/^differential: ([0-9]+) cases run.*/\1/' <<<"$summary")"
  bad="$(sed -E 's/.* ([0-9]+) mismatches.*/\1/' <<<"$summary")"
  echo "emu-soak: cases $ran, mismatches $bad, seed $seed"
else
  echo "emu-soak: the test did not finish (see above), seed $seed"
fi
exit "$status"
