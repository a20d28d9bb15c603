#!/usr/bin/env bash
# The cost of dirty-page tracking on the emulator: emubench with tracking off, and on with a
# round every 50 ms (as during a migration). Usage: bench/dirty-cost.sh [--reps N]
#   [--baseline PATH-TO-A-V3-BUILT-BEFORE-TRACKING] (then "off" is also compared with it)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
exec python3 bench/dirty-cost.py --v3 target/release/v3 --guest bench/out/guests/emubench.elf "$@"
