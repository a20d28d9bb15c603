#!/usr/bin/env bash
# Build the Linux guest from Debian's packages, by name, with apt-get download (nothing is
# fetched from anywhere else): the cloud kernel's bzImage and an initramfs with busybox whose
# /init mounts /proc and /sys, prints PALACIOS-LINUX-READY and runs a shell on the console.
# Output (git-ignored, cached between runs): guests/linux/{bzImage,initramfs.cpio.gz,release}.
# Safe to run from several processes at once (a lock on guests/linux/.lock); downloads are
# retried and verified against apt's package index (scripts/apt-fetch.sh); the outputs are
# written under temporary names and renamed, `release` last, so a cached guest is complete.
# Usage: scripts/fetch-linux-guest.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
out=guests/linux
cache=$out/cache
cached() { [ -s $out/bzImage ] && [ -s $out/initramfs.cpio.gz ] && [ -s $out/release ]; }
if [ "${1:-}" != "--force" ] && cached; then
  echo "fetch-linux-guest: cached in $out (kernel $(cat $out/release))"
  exit 0
fi
mkdir -p "$out"
exec 8>"$out/.build.lock"
flock 8
# Another process may have built it while this one waited for the lock.
if [ "${1:-}" != "--force" ] && cached; then
  echo "fetch-linux-guest: cached in $out (kernel $(cat $out/release))"
  exit 0
fi
command -v apt-get >/dev/null || { echo "fetch-linux-guest: needs apt-get (Debian or a derivative)" >&2; exit 1; }
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  echo "fetch-linux-guest: apt knows no linux-image-cloud-amd64 (run apt-get update?)" >&2
  exit 1
fi
echo "fetch-linux-guest: $kpkg and busybox-static"
mapfile -t debs < <(scripts/apt-fetch.sh "$cache" "$kpkg" busybox-static)
[ "${#debs[@]}" = 2 ] || { echo "fetch-linux-guest: downloading $kpkg and busybox-static failed" >&2; exit 1; }
kdeb=${debs[0]}
bdeb=${debs[1]}
rm -f $out/release
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$kdeb" "$tmp/k"
dpkg-deb -x "$bdeb" "$tmp/b"
cp "$tmp"/k/boot/vmlinuz-* "$out/bzImage.tmp"
mv "$out/bzImage.tmp" "$out/bzImage"
release=${kpkg#linux-image-}
python3 - "$tmp/b/bin/busybox" "$out/initramfs.cpio.gz.tmp" <<'PY'
import gzip, os, sys, time
busybox, dest = sys.argv[1], sys.argv[2]
init = b"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo PALACIOS-LINUX-READY
exec setsid cttyhack sh
"""
entries = []  # (name, mode, data)
for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc"]:
    entries.append((d, 0o040755, b""))
entries.append(("bin/busybox", 0o100755, open(busybox, "rb").read()))
for applet in ["sh", "mount", "echo", "cat", "ls", "uname", "poweroff", "setsid", "cttyhack",
               "reboot", "dmesg", "ps", "mkdir", "grep", "head", "sleep"]:
    entries.append((f"bin/{applet}", 0o120777, b"busybox"))
entries.append(("init", 0o100755, init))
entries.append(("dev/console", 0o020600, b""))
out = bytearray()
now = int(time.time())
for ino, (name, mode, data) in enumerate(entries, 1):
    nb = name.encode() + b"\0"
    rdev = (5, 1) if name == "dev/console" else (0, 0)
    hdr = "070701" + "".join(f"{v:08x}" for v in [ino, mode, 0, 0, 1, now, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0])
    out += hdr.encode() + nb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
nb = b"TRAILER!!!\0"
out += ("070701" + "".join(f"{v:08x}" for v in [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(nb), 0])).encode() + nb
out += b"\0" * (-len(out) % 512)
with gzip.open(dest, "wb") as f:
    f.write(out)
PY
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "$release" > "$out/release.tmp"
mv "$out/release.tmp" "$out/release"
echo "fetch-linux-guest: $out/bzImage ($(stat -c %s $out/bzImage) bytes, kernel $release), $out/initramfs.cpio.gz"
