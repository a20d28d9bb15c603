#!/usr/bin/env bash
# Run every fuzz target for RUNS executions (default 1000000) with cargo-fuzz.
# cargo-fuzz needs nightly-only compiler flags; this machine has one stable toolchain, so
# RUSTC_BOOTSTRAP=1 lets it accept them.
set -euo pipefail
cd "$(dirname "$0")"
RUNS="${1:-1000000}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
export RUSTC_BOOTSTRAP=1
mkdir -p corpus
bash seeds.sh
for t in config_xml load_multiboot load_elf64 load_flat checkpoint_reader api_request migration_stream qcow2_header virtio_blk_chain pci_config gears_guest_memory concord_messages; do
  mkdir -p "corpus/$t"
  echo "== $t: $RUNS runs"
  cargo fuzz run "$t" "corpus/$t" -- -runs="$RUNS" -max_len=65536 -timeout=10 2>&1 | grep -E "^#[0-9]+.*(DONE|pulse)|Done|ERROR|panicked|SUMMARY" | tail -3
done
