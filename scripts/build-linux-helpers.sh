#!/usr/bin/env bash
# Build the Linux guest's user-space helpers (guests/linux/*.c), static, and an initramfs overlay
# holding them:
#   OUTDIR/symspy           guests/linux/symspy.c (gcc -static -O2 -Wall -Wextra -Werror)
#   OUTDIR/helpers.cpio.gz  a gzipped newc cpio with bin/ and bin/symspy (mode 0755), owned by
#                           root, timestamps 0 (the same bytes on every build)
# The kernel unpacks concatenated cpio archives in turn, so the overlay goes after the guest's
# own initramfs (scripts/fetch-linux-guest.sh):
#   cat guests/linux/initramfs.cpio.gz OUTDIR/helpers.cpio.gz > combined   # the initrd
# Needs gcc and static glibc (Debian: libc6-dev); exits with status 3 if either is missing.
# Quiet on success but for the overlay's path on stdout; outputs are written under temporary
# names and renamed, and a helper is recompiled only when its source or this script is newer.
# Usage: scripts/build-linux-helpers.sh OUTDIR
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
src=$(cd "$(dirname "$0")/.." && pwd)/guests/linux
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
outdir=$1
if ! command -v gcc >/dev/null; then
  echo "build-linux-helpers: needs gcc (Debian: build-essential)" >&2
  exit 3
fi
libc=$(gcc -print-file-name=libc.a)
if [ "$libc" = "libc.a" ] || [ ! -f "$libc" ]; then
  echo "build-linux-helpers: needs static glibc (libc.a; Debian: libc6-dev)" >&2
  exit 3
fi
command -v gzip >/dev/null || { echo "build-linux-helpers: needs gzip" >&2; exit 3; }
mkdir -p "$outdir"

helpers=(symspy)
for h in "${helpers[@]}"; do
  if [ ! -x "$outdir/$h" ] || [ "$src/$h.c" -nt "$outdir/$h" ] || [ "$self" -nt "$outdir/$h" ]; then
    gcc -static -O2 -Wall -Wextra -Werror -o "$outdir/$h.tmp" "$src/$h.c" || {
      rm -f "$outdir/$h.tmp"
      echo "build-linux-helpers: compiling $src/$h.c failed" >&2
      exit 1
    }
    mv "$outdir/$h.tmp" "$outdir/$h"
  fi
done

# newc cpio: a 110-byte header of "070701" and 13 eight-digit hex fields (ino, mode, uid, gid,
# nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the name
# with its NUL, padding to 4 bytes, the data, padding to 4 bytes; then TRAILER!!!.
pos=0
ino=0
pad() { # to a multiple of 4
  local n=$(((4 - pos % 4) % 4))
  head -c "$n" /dev/zero
  pos=$((pos + n))
}
entry() { # NAME MODE [FILE]
  local name=$1 mode=$2 file=${3:-} size=0
  [ -n "$file" ] && size=$(stat -c %s "$file")
  ino=$((ino + 1))
  printf '070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%s\0' \
    "$ino" "$mode" 0 0 1 0 "$size" 0 0 0 0 $((${#name} + 1)) 0 "$name"
  pos=$((pos + 110 + ${#name} + 1))
  pad
  if [ -n "$file" ]; then
    cat "$file"
    pos=$((pos + size))
    pad
  fi
}
{
  entry bin $((0040755))
  for h in "${helpers[@]}"; do
    entry "bin/$h" $((0100755)) "$outdir/$h"
  done
  ino=-1 # the trailer has inode 0
  entry 'TRAILER!!!' 0
  # The kernel's own archives end on a 512-byte block, as cpio's do.
  head -c $(((512 - pos % 512) % 512)) /dev/zero
} | gzip -9n >"$outdir/helpers.cpio.gz.tmp"
mv "$outdir/helpers.cpio.gz.tmp" "$outdir/helpers.cpio.gz"
echo "$outdir/helpers.cpio.gz"
