#!/usr/bin/env bash
# Seed corpora from the examples and the built guests.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/config_xml corpus/load_multiboot corpus/load_elf64 corpus/load_flat
cp ../examples/*.xml corpus/config_xml/ 2>/dev/null || true
G=../guests/build
[ -f "$G/mbtest.elf" ] || bash ../guests/build.sh "$G" >/dev/null
cp "$G/mbtest.elf" "$G/mbaout.bin" corpus/load_multiboot/
cp "$G/elf64test.elf" corpus/load_elf64/
cp "$G/flat16.bin" corpus/load_flat/
