#!/usr/bin/env bash
# Make an ext4 disk image for a guest, without root: mke2fs (e2fsprogs) formats OUT, SIZE_MB
# mebibytes, and copies DIR's contents into it (`mke2fs -d`); with no DIR the file system is
# empty. With --qcow2, the raw image is converted to qcow2 with qemu-img and OUT is the qcow2
# file. OUT is replaced if it exists; it is written under a temporary name and renamed, so a
# failed run leaves no half-made image.
# Usage: scripts/mkdisk.sh [--qcow2] OUT SIZE_MB [DIR]
set -euo pipefail
usage() { echo "usage: $0 [--qcow2] OUT SIZE_MB [DIR]" >&2; exit 2; }
qcow2=
args=()
for a in "$@"; do
  case $a in
    --qcow2) qcow2=1 ;;
    -h|--help) usage ;;
    -*) echo "mkdisk: unknown option $a" >&2; usage ;;
    *) args+=("$a") ;;
  esac
done
[ "${#args[@]}" -ge 2 ] && [ "${#args[@]}" -le 3 ] || usage
out=${args[0]}
size=${args[1]}
dir=${args[2]:-}
[[ $size =~ ^[1-9][0-9]*$ ]] || { echo "mkdisk: SIZE_MB must be a positive whole number of MiB, not '$size'" >&2; exit 2; }
[ -z "$dir" ] || [ -d "$dir" ] || { echo "mkdisk: $dir is not a directory" >&2; exit 2; }
mke2fs=$(command -v mke2fs || command -v /sbin/mke2fs || command -v /usr/sbin/mke2fs || true)
[ -n "$mke2fs" ] || { echo "mkdisk: needs mke2fs (install e2fsprogs)" >&2; exit 1; }
if [ -n "$qcow2" ]; then
  command -v qemu-img >/dev/null || { echo "mkdisk: --qcow2 needs qemu-img (install qemu-utils)" >&2; exit 1; }
fi
raw=$out.raw.tmp
trap 'rm -f "$raw" "$out.qcow2.tmp"' EXIT
: > "$raw" # (so mke2fs does not announce "Creating regular file")
"$mke2fs" -q -F -t ext4 ${dir:+-d "$dir"} "$raw" "${size}M"
if [ -n "$qcow2" ]; then
  qemu-img convert -q -f raw -O qcow2 "$raw" "$out.qcow2.tmp"
  mv "$out.qcow2.tmp" "$out"
else
  mv "$raw" "$out"
fi
