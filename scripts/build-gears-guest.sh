#!/usr/bin/env bash
# Build the guest side of GEARS and guarded modules (guests/gears/, see its README.md) for the
# Linux guest's kernel, and an initramfs overlay holding what runs in the guest:
#   OUTDIR/gears.ko, guarded.ko, attacker.ko  kernel modules, built out of tree against
#                                  Debian's headers of the guest kernel (release: the contents
#                                  of guests/linux/release, or $GEARS_KERNEL_RELEASE)
#   OUTDIR/guarded.manifest.json   `scripts/guard-wrap.py manifest` of guarded.ko (tag 0x6d67,
#                                  entries gm_init,gm_exit,gm_read,gm_write,gm_nop)
#   OUTDIR/gears-int80, gears-ioprobe, gears-sysloop, gears-wait
#                                  static user programs (gcc -static -no-pie -O2 -Wall -Wextra
#                                  -Werror)
#   OUTDIR/blob_getpid.bin, blob_fault.bin
#                                  position-independent code to inject, entry at offset 0
#                                  (not in the overlay)
#   OUTDIR/gears.cpio.gz           gzipped newc cpio: bin/ with the programs (0755) and
#                                  lib/gears/ with the three modules (0644); owned by root,
#                                  timestamps 0, padded to 512 bytes, the same bytes for the
#                                  same inputs
#   OUTDIR/kernel-release          the release the modules were built for
#   OUTDIR/kbuild/                 the module build directories (sources copied there, so the
#                                  source tree stays clean; each has its build.log)
# The kernel unpacks concatenated cpio archives in turn, so the overlay goes after the guest's
# own initramfs:
#   cat guests/linux/initramfs.cpio.gz OUTDIR/gears.cpio.gz > combined     # the initrd
# and in the guest: insmod /lib/gears/gears.ko; insmod /lib/gears/guarded.ko; ...
#
# Kernel headers: /usr/src/linux-headers-RELEASE when installed; otherwise Debian's
# linux-headers-RELEASE, linux-headers-ABI-common and linux-kbuild-X.Y are downloaded with
# apt-get download (scripts/apt-fetch.sh: verified against apt's index, no root needed) into
# guests/linux/cache and unpacked with dpkg-deb into guests/linux/cache/headers-RELEASE/, a
# private usr/src + usr/lib tree: nothing is installed. The packages' absolute paths are fixed
# up there: the arch Makefile's `include /usr/src/...-common/Makefile` becomes relative, and
# lib/modules/RELEASE/{build,source} (absolute links) are dropped; the other links are
# relative already. Debian drops the headers of superseded kernels from its archive: when
# apt no longer has them, refresh the guest (apt-get update; scripts/fetch-linux-guest.sh
# --force) so that the kernel and its headers match again.
# Every module's vermagic must name RELEASE, and each symbol it imports must be in the
# headers' Module.symvers (or guarded.ko's, for attacker.ko) with the CRC it recorded.
#
# Needs gcc (and gcc-NN, the kernel's own compiler, named in the headers' .kernelvariables),
# static glibc, make, python3, binutils (objcopy, objdump, readelf, nm), gzip, flock; and
# apt-get, apt-cache and dpkg-deb when headers must be fetched. Exits with status 3 when one
# of them, the guest's release or its headers are missing; 1 when a build or a check fails.
# Quiet on success but for the overlay's path on stdout. Outputs are written under temporary
# names and renamed; a part is rebuilt only when one of its inputs (its sources, this script,
# scripts/guard-wrap.py, the headers) is newer. Runs into the same OUTDIR are serialized
# (OUTDIR/.lock), as are header fetches (guests/linux/cache/.gears-headers.lock).
# Usage: scripts/build-gears-guest.sh OUTDIR
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/guests/gears
self=$root/scripts/build-gears-guest.sh
wrap=$root/scripts/guard-wrap.py
cache=$root/guests/linux/cache
me=build-gears-guest

die() { # STATUS MESSAGE
  echo "$me: $2" >&2
  exit "$1"
}
need() { # COMMAND WHERE-FROM
  command -v "$1" >/dev/null || die 3 "needs $1 ($2)"
}
need gcc "Debian: build-essential"
need make "Debian: make"
need python3 "Debian: python3"
for t in objcopy objdump readelf nm; do need $t "Debian: binutils"; done
need gzip "Debian: gzip"
need flock "Debian: util-linux"
libc=$(gcc -print-file-name=libc.a)
if [ "$libc" = "libc.a" ] || [ ! -f "$libc" ]; then
  die 3 "needs static glibc (libc.a; Debian: libc6-dev)"
fi

if [ -n "${GEARS_KERNEL_RELEASE:-}" ]; then
  release=$GEARS_KERNEL_RELEASE
elif [ -s "$root/guests/linux/release" ]; then
  release=$(cat "$root/guests/linux/release")
else
  die 3 "no guests/linux/release: fetch the Linux guest first (scripts/fetch-linux-guest.sh)"
fi
# Debian's releases: VERSION-ABI-FLAVOUR, like 6.1.0-48-cloud-amd64.
if ! [[ "$release" =~ ^([0-9]+\.[0-9]+)\.[0-9]+-[0-9]+-[a-z0-9][a-z0-9-]*$ ]]; then
  die 3 "'$release' is not a Debian kernel release (like 6.1.0-48-cloud-amd64)"
fi

mkdir -p "$1"
outdir=$(cd "$1" && pwd)
exec 7>"$outdir/.lock"
flock 7

# stale OUT IN...: true when OUT is missing or older than one of the INs.
stale() {
  local out=$1 f
  shift
  [ -e "$out" ] || return 0
  for f in "$@"; do
    [ "$f" -nt "$out" ] && return 0
  done
  return 1
}

# --- kernel headers ------------------------------------------------------------------------
fetch_headers() { # unpack Debian's headers of $release into $htree (holding the lock)
  local pkg=linux-headers-$release show ver deps common kbuild d mk bad
  for t in apt-get apt-cache dpkg-deb; do need $t "to fetch $pkg (Debian's apt and dpkg)"; done
  show=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null || true)
  if [ -z "$show" ]; then
    die 3 "apt knows no $pkg, the headers of the guest kernel (Debian drops them from its
archive once a kernel is superseded): run apt-get update, and if it is still missing,
refresh the guest so that kernel and headers match (scripts/fetch-linux-guest.sh --force)"
  fi
  ver=$(sed -n 's/^Version: //p' <<<"$show")
  deps=$(sed -n 's/^Depends: //p' <<<"$show")
  common=$(grep -o 'linux-headers-[^ ,]*-common' <<<"$deps" | head -1 || true)
  kbuild=$(grep -o 'linux-kbuild-[0-9.]*' <<<"$deps" | head -1 || true)
  [ -n "$ver" ] && [ -n "$common" ] && [ -n "$kbuild" ] ||
    die 1 "cannot tell the dependencies of $pkg from apt-cache (Depends: $deps)"
  # The arch and common packages come in pairs (=); kbuild only needs to be as new (>=).
  if ! mapfile -t debs < <("$root/scripts/apt-fetch.sh" "$cache" "$pkg=$ver" "$common=$ver" "$kbuild") ||
    [ "${#debs[@]}" != 3 ]; then
    die 3 "could not download $pkg=$ver, $common=$ver and $kbuild (see above; a stale apt
index lists packages the archive no longer has: run apt-get update, and if the headers
are then gone, refresh the guest with scripts/fetch-linux-guest.sh --force)"
  fi
  htmp=$(mktemp -d "$cache/headers-$release.tmp.XXXXXX")
  trap 'rm -rf "$htmp"' EXIT
  for d in "${debs[@]}"; do
    dpkg-deb -x "$d" "$htmp" || die 1 "unpacking $d failed"
  done
  # lib/modules/RELEASE/{build,source} point at /usr/src: not needed, and absolute.
  rm -rf "$htmp/lib" "$htmp/usr/share"
  mk=$htmp/usr/src/$pkg/Makefile
  [ -f "$mk" ] || die 1 "$pkg has no usr/src/$pkg/Makefile"
  # "include /usr/src/linux-headers-ABI-common/Makefile" -> relative to this Makefile.
  sed -i 's|^include /usr/src/\(linux-headers-[^/]*\)/Makefile$|include $(dir $(lastword $(MAKEFILE_LIST)))../\1/Makefile|' "$mk"
  if grep -n '/usr/' "$mk" "$htmp/usr/src/$pkg/.kernelvariables" >&2; then
    die 1 "$pkg still refers to absolute paths (above) after the fix-ups"
  fi
  bad=$(find "$htmp" -type l -lname '/*' -printf '%P -> %l\n')
  [ -z "$bad" ] || die 1 "absolute symbolic links in the headers: $bad"
  bad=$(find -L "$htmp" -type l -printf '%P\n' 2>/dev/null)
  [ -z "$bad" ] || die 1 "dangling symbolic links in the headers: $bad"
  printf '%s\n' "${debs[@]##*/}" >"$htmp/.ready"
  rm -rf "$htree"
  mv "$htmp" "$htree"
  trap - EXIT
}

sysdir=/usr/src/linux-headers-$release
if [ -f "$sysdir/Makefile" ] && [ -f "$sysdir/Module.symvers" ]; then
  kdir=$sysdir
  kstamp=$sysdir/Module.symvers
else
  htree=$cache/headers-$release
  kdir=$htree/usr/src/linux-headers-$release
  kstamp=$htree/.ready
  if [ ! -f "$kstamp" ]; then
    mkdir -p "$cache"
    exec 8>"$cache/.gears-headers.lock"
    flock 8
    [ -f "$kstamp" ] || fetch_headers
    exec 8>&-
  fi
fi
[ -f "$kdir/Module.symvers" ] || die 1 "$kdir has no Module.symvers"
# The kernel's own compiler (CC = ...gcc-12 in Debian's .kernelvariables).
kcc=$(grep -o 'gcc-[0-9][0-9]*' "$kdir/.kernelvariables" 2>/dev/null | head -1 || true)
[ -z "$kcc" ] || need "$kcc" "the compiler of the guest kernel; Debian: $kcc"
objtool=$kdir/tools/objtool/objtool
if [ -x "$objtool" ] && command -v ldd >/dev/null && ldd "$objtool" 2>/dev/null | grep -q 'not found'; then
  die 3 "the headers' objtool cannot run: $(ldd "$objtool" | grep 'not found' | tr -s ' \t\n' ' ')(Debian: libelf1)"
fi

# --- kernel modules ------------------------------------------------------------------------
# check_ko KO SYMVERS...: vermagic names $release; every imported symbol is exported by one of
# the SYMVERS files, with the CRC that the module recorded in __versions.
check_ko() {
  python3 - "$release" "$@" <<'PY'
import struct, sys
release, ko, symvers = sys.argv[1], sys.argv[2], sys.argv[3:]

def fail(msg):
    sys.exit(f"build-gears-guest: {ko}: {msg}")

data = open(ko, "rb").read()
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
def cstr(off):
    return data[off:data.index(b"\0", off)].decode()
names = [cstr(secs[shstrndx][4] + s[0]) for s in secs]
def body(name):
    if name not in names:
        fail(f"no {name} section")
    s = secs[names.index(name)]
    return data[s[4]:s[4] + s[5]]

info = dict(kv.split(b"=", 1) for kv in body(".modinfo").split(b"\0") if b"=" in kv)
vermagic = info.get(b"vermagic", b"").decode()
if vermagic.split()[:1] != [release]:
    fail(f"vermagic '{vermagic.strip()}' does not name the guest kernel {release}")
for flag in ("SMP", "mod_unload", "modversions"):
    if flag not in vermagic.split():
        fail(f"vermagic '{vermagic.strip()}' lacks {flag}")

crcs = {}
for path in symvers:
    for line in open(path):
        f = line.rstrip("\n").split("\t")
        if len(f) >= 2:
            crcs.setdefault(f[1], int(f[0], 16))
versions = {}
v = body("__versions")
for off in range(0, len(v), 64):
    crc, = struct.unpack_from("<Q", v, off)
    versions[v[off + 8:off + 64].split(b"\0", 1)[0].decode()] = crc
symtab = secs[[s[1] for s in secs].index(2)]
strs = secs[symtab[6]][4]
undef = set()
for off in range(symtab[4], symtab[4] + symtab[5], 24):
    name, info_, _o, shndx = struct.unpack_from("<IBBH", data, off)
    if shndx == 0 and name and info_ >> 4 in (1, 2):
        undef.add(cstr(strs + name))
missing = sorted(undef - crcs.keys())
if missing:
    fail("imports symbols that neither the kernel nor its dependencies export: " +
         ", ".join(missing))
for sym in sorted(undef):
    if sym not in versions:
        fail(f"no symbol version (__versions) for {sym}")
    if versions[sym] != crcs[sym]:
        fail(f"CRC of {sym} is {versions[sym]:#x}, Module.symvers has {crcs[sym]:#x}")
if "module_layout" in crcs and versions.get("module_layout") != crcs["module_layout"]:
    fail("module_layout's CRC does not match the kernel's")
PY
}

# kbuild NAME: make the module in $outdir/kbuild/NAME (already populated), check it, and
# install it as $outdir/NAME.ko. Extra make arguments follow the name.
kbuild() {
  local name=$1 bdir=$outdir/kbuild/$1
  shift
  if ! make -C "$kdir" M="$bdir" -j2 "$@" modules >"$bdir/build.log" 2>&1; then
    echo "$me: building $name.ko failed; the end of $bdir/build.log:" >&2
    tail -n 25 "$bdir/build.log" >&2
    exit 1
  fi
  [ -f "$bdir/$name.ko" ] || die 1 "make left no $bdir/$name.ko"
}
install_ko() { # NAME
  cp "$outdir/kbuild/$1/$1.ko" "$outdir/$1.ko.tmp"
  mv "$outdir/$1.ko.tmp" "$outdir/$1.ko"
}
fresh_dir() { # NAME: an empty build directory
  rm -rf "$outdir/kbuild/$1"
  mkdir -p "$outdir/kbuild/$1"
}

guarded_tag=0x6d67
guarded_entries=gm_init,gm_exit,gm_read,gm_write,gm_nop

# Modules built for another release are out of date whatever their times say.
if [ "$(cat "$outdir/kernel-release" 2>/dev/null || true)" != "$release" ]; then
  rm -f "$outdir/gears.ko" "$outdir/guarded.ko" "$outdir/attacker.ko" \
    "$outdir/guarded.manifest.json"
  echo "$release" >"$outdir/kernel-release"
fi

if stale "$outdir/gears.ko" "$src/gears.c" "$self" "$kstamp"; then
  fresh_dir gears
  cp "$src/gears.c" "$outdir/kbuild/gears/"
  printf 'obj-m := gears.o\nccflags-y := -Werror\n' >"$outdir/kbuild/gears/Kbuild"
  kbuild gears
  check_ko "$outdir/kbuild/gears/gears.ko" "$kdir/Module.symvers"
  install_ko gears
fi

if stale "$outdir/guarded.ko" "$src/guarded.c" "$wrap" "$self" "$kstamp"; then
  fresh_dir guarded
  b=$outdir/kbuild/guarded
  # The module is guarded.o, linked from its C part and the generated wrappers.
  cp "$src/guarded.c" "$b/guarded_main.c"
  python3 "$wrap" gen --module guarded --tag $guarded_tag --entries $guarded_entries \
    --init gm_init --exit gm_exit --out-dir "$b"
  cat >"$b/Kbuild" <<'EOF'
obj-m := guarded.o
guarded-y := guarded_main.o gm_wrap.o
# No cold partitions (.text.unlikely): all of the module's code stays in .text.
ccflags-y := -Werror -fno-reorder-blocks-and-partition
EOF
  kbuild guarded
  check_ko "$b/guarded.ko" "$kdir/Module.symvers"
  install_ko guarded
fi

if stale "$outdir/guarded.manifest.json" "$outdir/guarded.ko" "$wrap"; then
  python3 "$wrap" manifest --ko "$outdir/guarded.ko" --module guarded --tag $guarded_tag \
    --entries $guarded_entries >"$outdir/guarded.manifest.json.tmp" ||
    die 1 "guard-wrap.py manifest failed for $outdir/guarded.ko"
  mv "$outdir/guarded.manifest.json.tmp" "$outdir/guarded.manifest.json"
fi

if stale "$outdir/attacker.ko" "$src/attacker.c" "$self" "$kstamp" "$outdir/guarded.ko"; then
  fresh_dir attacker
  cp "$src/attacker.c" "$outdir/kbuild/attacker/"
  printf 'obj-m := attacker.o\nccflags-y := -Werror\n' >"$outdir/kbuild/attacker/Kbuild"
  # gm_read_secret comes from guarded.ko: modpost needs its Module.symvers.
  kbuild attacker KBUILD_EXTRA_SYMBOLS="$outdir/kbuild/guarded/Module.symvers"
  check_ko "$outdir/kbuild/attacker/attacker.ko" "$kdir/Module.symvers" \
    "$outdir/kbuild/guarded/Module.symvers"
  install_ko attacker
fi

# --- user programs -------------------------------------------------------------------------
programs=(gears-int80 gears-ioprobe gears-sysloop gears-wait)
for p in "${programs[@]}"; do
  if stale "$outdir/$p" "$src/$p.c" "$self"; then
    # -no-pie: gears-int80 hands int $0x80 a pointer into .bss, which must be below 4 GiB.
    gcc -static -no-pie -O2 -Wall -Wextra -Werror -o "$outdir/$p.tmp" "$src/$p.c" || {
      rm -f "$outdir/$p.tmp"
      die 1 "compiling $src/$p.c failed"
    }
    mv "$outdir/$p.tmp" "$outdir/$p"
  fi
done

# --- code blobs ----------------------------------------------------------------------------
# Flat binaries of .text; entry() must be at offset 0 and nothing may need relocating (no
# data, no calls out).
for bl in blob_getpid blob_fault; do
  if stale "$outdir/$bl.bin" "$src/$bl.c" "$self"; then
    o=$outdir/$bl.o
    gcc -O2 -fpie -nostdlib -ffreestanding -fno-stack-protector \
      -fno-asynchronous-unwind-tables -fcf-protection=none -mgeneral-regs-only -mno-red-zone \
      -Wall -Wextra -Werror -c -o "$o" "$src/$bl.c" || die 1 "compiling $src/$bl.c failed"
    at=$(nm "$o" | awk '$3 == "entry" && $2 == "T" { print $1 }')
    [ -n "$at" ] && [ $((16#$at)) = 0 ] ||
      die 1 "$bl: entry is not a .text function at offset 0 (nm: $(nm "$o" | tr '\n' ' '))"
    if ! readelf -r "$o" | grep -q 'There are no relocations'; then
      readelf -r "$o" >&2
      die 1 "$bl: the object has relocations (above): blobs must not use data or calls"
    fi
    objcopy -O binary -j .text "$o" "$outdir/$bl.bin.tmp"
    [ -s "$outdir/$bl.bin.tmp" ] || die 1 "$bl: objcopy made an empty binary"
    mv "$outdir/$bl.bin.tmp" "$outdir/$bl.bin"
  fi
done

# --- the overlay ---------------------------------------------------------------------------
modules=(gears guarded attacker)
inputs=("$self")
for p in "${programs[@]}"; do inputs+=("$outdir/$p"); done
for m in "${modules[@]}"; do inputs+=("$outdir/$m.ko"); done
if stale "$outdir/gears.cpio.gz" "${inputs[@]}"; then
  # newc: "070701", then 13 fields of 8 hex digits (ino, mode, uid, gid, nlink, mtime,
  # filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the name and its
  # NUL, zeros to a multiple of 4, the data, zeros to a multiple of 4. TRAILER!!! ends it.
  pos=0
  ino=0
  align4() {
    local n=$(((4 - pos % 4) % 4))
    head -c "$n" /dev/zero
    pos=$((pos + n))
  }
  member() { # NAME MODE [FILE]
    local name=$1 mode=$2 file=${3:-} size=0
    [ -z "$file" ] || size=$(stat -c %s "$file")
    ino=$((ino + 1))
    printf '070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%s\0' \
      "$ino" "$mode" 0 0 1 0 "$size" 0 0 0 0 $((${#name} + 1)) 0 "$name"
    pos=$((pos + 110 + ${#name} + 1))
    align4
    if [ -n "$file" ]; then
      cat "$file"
      pos=$((pos + size))
      align4
    fi
  }
  {
    member bin $((0040755))
    for p in "${programs[@]}"; do
      member "bin/$p" $((0100755)) "$outdir/$p"
    done
    member lib $((0040755))
    member lib/gears $((0040755))
    for m in "${modules[@]}"; do
      member "lib/gears/$m.ko" $((0100644)) "$outdir/$m.ko"
    done
    ino=-1 # so that the trailer has inode 0
    member 'TRAILER!!!' 0
    # End on a 512-byte block, as the kernel's own archives do.
    head -c $(((512 - pos % 512) % 512)) /dev/zero
  } | gzip -9n >"$outdir/gears.cpio.gz.tmp"
  mv "$outdir/gears.cpio.gz.tmp" "$outdir/gears.cpio.gz"
fi
echo "$outdir/gears.cpio.gz"
