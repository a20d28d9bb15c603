#!/usr/bin/env bash
# Is dirty tracking free while it is off? Host instructions (valgrind's callgrind, which counts
# instructions and so is not disturbed by other load) of the same emubench runs, with v3 built
# at the commit before dirty tracking (0bde444^) and with this tree, tracking off.
# Usage: bench/dirty-off-cost.sh   (builds the older v3 in a git worktree under bench/out)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release -q -p v3
bash guests/build.sh bench/out/guests >/dev/null
base=bench/out/before-tracking
if [ ! -x "$base/target/release/v3" ]; then
  rm -rf "$base"; git worktree prune
  git worktree add -f "$base" 0bde444^ >/dev/null
  (cd "$base" && CARGO_TARGET_DIR="$PWD/target" cargo build --release -q -p v3)
fi
for w in "mem n=2000000" "sieve n=3"; do
  count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$1" --log-level error run --backend emu \
      --clock deterministic --mem 128 --kernel bench/out/guests/emubench.elf --cmdline "bench=$w" \
      </dev/null 2>&1 | sed -n 's/.*Collected : //p'
  }
  a=$(count "$base/target/release/v3"); b=$(count target/release/v3)
  python3 -c "import sys; a,b=int(sys.argv[1]),int(sys.argv[2]); print(f'  {sys.argv[3]:<16} before tracking {a:>12}  tracking off {b:>12}  ratio {b/a:.5f}')" "$a" "$b" "$w"
done
