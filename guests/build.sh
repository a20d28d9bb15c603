#!/usr/bin/env bash
# Build the guest programs: guests/build.sh OUTDIR
set -eu

if [ $# -ne 1 ] || [ -z "$1" ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi

missing=""
for tool in gcc as ld objcopy; do
	command -v "$tool" >/dev/null 2>&1 || missing="$missing${missing:+ }$tool"
done
if [ -n "$missing" ]; then
	echo "error: building the guests needs gcc, as, ld and objcopy (Debian: apt-get install build-essential binutils); missing: $missing" >&2
	exit 3
fi

here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)

exec make -C "$here" O="$out"
