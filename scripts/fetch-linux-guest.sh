#!/usr/bin/env bash
# Build the Linux guest from Debian's packages, by name, with apt-get download (nothing is
# fetched from anywhere else): the cloud kernel's bzImage and an initramfs holding
# - busybox-static, with a link in /bin for every applet it lists (`busybox --list`);
# - the cloud kernel's own virtio modules (virtio, virtio_ring, virtio_pci and its
#   modern/legacy helpers, virtio_blk, virtio_net, virtio_console, virtio_rng,
#   virtio_balloon), tun, vxlan and msr (/dev/cpu/N/msr, which guests/linux/symspy uses to
#   register its SymSpy page), with everything they depend on, uncompressed in
#   /lib/modules/NAME.ko. Dependencies come from the package's modules.dep or, as Debian
#   ships none (depmod makes it at install time), from each module's .modinfo `depends=`;
#   modules the kernel has built in (modules.builtin) are skipped;
# - an /init that mounts /proc, /sys and /dev (devtmpfs), makes /mnt, insmods those modules
#   in dependency order (a failure prints `init: insmod NAME failed` and the boot goes on),
#   prints PALACIOS-LINUX-READY and runs a shell on the console.
# Output (git-ignored, cached between runs):
#   guests/linux/{bzImage,initramfs.cpio.gz,release,layout}; `layout` is the version of the
#   initramfs's contents, and a cache with another (or none) is rebuilt.
# Safe to run from several processes at once (a lock on guests/linux/.build.lock); downloads
# are retried and verified against apt's package index (scripts/apt-fetch.sh); the outputs are
# written under temporary names and renamed, `release` and then `layout` last, so a cached
# guest is complete.
# Usage: scripts/fetch-linux-guest.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
out=guests/linux
cache=$out/cache
# Bump when the initramfs's contents change, so cached guests are rebuilt once.
layout=3
cached() {
  [ -s $out/bzImage ] && [ -s $out/initramfs.cpio.gz ] && [ -s $out/release ] &&
    [ "$(cat $out/layout 2>/dev/null)" = "$layout" ]
}
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
rm -f $out/release $out/layout
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$kdeb" "$tmp/k"
dpkg-deb -x "$bdeb" "$tmp/b"
cp "$tmp"/k/boot/vmlinuz-* "$out/bzImage.tmp"
mv "$out/bzImage.tmp" "$out/bzImage"
release=${kpkg#linux-image-}
moddir=$tmp/k/lib/modules/$release
[ -d "$moddir/kernel" ] || { echo "fetch-linux-guest: $kdeb has no $moddir/kernel" >&2; exit 1; }
python3 - "$tmp/b/bin/busybox" "$moddir" "$out/initramfs.cpio.gz.tmp" <<'PY'
import gzip, lzma, os, re, struct, subprocess, sys, time
busybox, moddir, dest = sys.argv[1:4]

def fail(msg):
    sys.exit(f"fetch-linux-guest: {msg}")

# --- modules -------------------------------------------------------------------------------
# Wanted, by module name; OPTIONAL ones may be absent from the kernel altogether (older or
# newer kernels split virtio_pci differently), the others must be modules or built in.
WANTED = ["virtio", "virtio_ring", "virtio_pci", "virtio_pci_modern_dev",
          "virtio_pci_legacy_dev", "virtio_blk", "virtio_net", "virtio_console",
          "virtio_rng", "virtio_balloon", "tun", "vxlan", "msr"]
OPTIONAL = {"virtio_pci_modern_dev", "virtio_pci_legacy_dev"}
KO = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")

def modname(path):
    base = os.path.basename(path.strip())
    return KO.sub("", base).replace("-", "_")

files = {}  # module name -> path in the package
for root, _, names in os.walk(os.path.join(moddir, "kernel")):
    for n in names:
        if KO.search(n):
            files[modname(n)] = os.path.join(root, n)
builtin = set()
if os.path.exists(os.path.join(moddir, "modules.builtin")):
    with open(os.path.join(moddir, "modules.builtin")) as f:
        builtin = {modname(l) for l in f if l.strip()}

def plain(path):
    """The module's ELF image, decompressed if the package ships it compressed."""
    if path.endswith(".ko.xz"):
        return lzma.decompress(open(path, "rb").read())
    if path.endswith(".ko.gz"):
        return gzip.decompress(open(path, "rb").read())
    if path.endswith(".ko.zst"):
        try:
            return subprocess.run(["zstd", "-dcq", path], check=True, stdout=subprocess.PIPE).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            fail(f"cannot decompress {path} (needs zstd): {e}")
    return open(path, "rb").read()

def modinfo(image, name):
    """The key=value strings of an ELF64 module's .modinfo section."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        fail(f"module {name} is not an ELF64 object")
    shoff = struct.unpack_from("<Q", image, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    secs = [struct.unpack_from("<IIQQQQ", image, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]
    for sh_name, _, _, _, off, size in secs:
        at = strtab + sh_name
        if image[at:image.index(b"\0", at)] == b".modinfo":
            info = {}
            for kv in image[off:off + size].split(b"\0"):
                k, sep, v = kv.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(k, v)
            return info
    fail(f"module {name} has no .modinfo section")

images = {}
def image(name):
    if name not in images:
        images[name] = plain(files[name])
    return images[name]

depfile = os.path.join(moddir, "modules.dep")
if os.path.exists(depfile):
    source = "modules.dep"
    deps = {}
    with open(depfile) as f:
        for line in f:
            if ":" in line:
                mod, _, rest = line.partition(":")
                deps[modname(mod)] = [modname(d) for d in rest.split()]
    depends = lambda name: deps.get(name, [])
else:
    source = ".modinfo depends= (the package has no modules.dep)"
    depends = lambda name: [d for d in modinfo(image(name), name).get("depends", "").split(",") if d]

order, state, skipped = [], {}, []
def visit(name, chain):
    if state.get(name) == "done":
        return
    if state.get(name) == "busy":
        fail(f"module dependency cycle: {' -> '.join(chain + [name])}")
    if name not in files:
        if name in builtin:
            if name not in skipped:
                skipped.append(name)
            return
        fail(f"module {name} (needed by {' -> '.join(chain) or 'this script'}) is neither in the package nor built in")
    state[name] = "busy"
    for d in depends(name):
        visit(d, chain + [name])
    state[name] = "done"
    order.append(name)

absent = []
for name in WANTED:
    if name not in files and name not in builtin and name in OPTIONAL:
        absent.append(name)
        continue
    visit(name, [])
print(f"fetch-linux-guest: {len(order)} modules, in load order (dependencies from {source}): {' '.join(order)}")
if skipped:
    print(f"fetch-linux-guest: built into the kernel, not loaded: {' '.join(skipped)}")
if absent:
    print(f"fetch-linux-guest: not in this kernel at all (optional): {' '.join(absent)}")

# --- busybox applets -----------------------------------------------------------------------
try:
    listed = subprocess.run([busybox, "--list"], check=True, stdout=subprocess.PIPE).stdout.decode()
except (OSError, subprocess.CalledProcessError) as e:
    fail(f"cannot list busybox's applets ({busybox} --list): {e}")
applets = sorted({a for a in listed.split() if a and "/" not in a and a != "busybox"})
if "sh" not in applets or "insmod" not in applets:
    fail(f"busybox lists no sh or insmod applet: {applets}")
print(f"fetch-linux-guest: {len(applets)} busybox applets linked in /bin")

# --- /init and the cpio archive ------------------------------------------------------------
init = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /mnt
for m in {' '.join(order)}; do
  insmod /lib/modules/$m.ko >/dev/null 2>&1 || echo "init: insmod $m failed"
done
echo PALACIOS-LINUX-READY
exec setsid cttyhack sh
""".encode()
entries = []  # (name, mode, data)
for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc", "mnt", "lib", "lib/modules"]:
    entries.append((d, 0o040755, b""))
entries.append(("bin/busybox", 0o100755, open(busybox, "rb").read()))
for applet in applets:
    entries.append((f"bin/{applet}", 0o120777, b"busybox"))
for name in order:
    entries.append((f"lib/modules/{name}.ko", 0o100644, image(name)))
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
echo "$layout" > "$out/layout.tmp"
mv "$out/layout.tmp" "$out/layout"
echo "fetch-linux-guest: $out/bzImage ($(stat -c %s $out/bzImage) bytes, kernel $release), $out/initramfs.cpio.gz ($(stat -c %s $out/initramfs.cpio.gz) bytes)"
