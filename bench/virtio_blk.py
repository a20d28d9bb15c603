"""virtio-blk random 4 KiB reads: v3 (emulator, KVM) beside QEMU (TCG, KVM), same guest.

The guest (guests/virtio, `bench=N`) times N reads with the TSC and prints
`BENCH reads=N usec_per_req=X iops=Y`. The disk is a RAMDISK for v3 and a raw image in
/dev/shm (page cache, so RAM) for QEMU. Figures are medians; the ratio is v3 / QEMU in
microseconds per request (lower is better; <= 1.0 meets the target).
"""
import argparse, os, re, statistics, subprocess, sys, tempfile

def disk(path, mib=64):
    d = bytearray(mib << 20)
    d[:20] = b"PALACIOS-VIRTIO-DISK"
    for i in range(20, 512):
        d[i] = i & 0xff
    with open(path, "wb") as f:
        f.write(d)

CONFIG = """<vm class="PC"><memory>64</memory><cores count="1"><core/></cores>{irqchip}
<files><file id="disk" filename="{disk}"/></files><devices>
<device class="8259A" id="pic"/><device class="LAPIC" id="lapic"/><device class="IOAPIC" id="ioapic"/>
<device class="8254_PIT" id="pit"/><device class="SERIAL" id="serial"/><device class="DEBUG_EXIT" id="exit"/>
<device class="PCI" id="pci0"/><device class="i440FX" id="nb"><bus>pci0</bus></device>
<device class="PIIX3" id="sb"><bus>pci0</bus></device>
<device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus></device>
<device class="RAMDISK" id="d0" file="disk"><frontend tag="blk0"/></device>
</devices><boot format="multiboot" kernel="{guest}" cmdline="test=none bench={n}"/></vm>"""

def bench(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    m = re.search(r"BENCH reads=(\d+) usec_per_req=(\d+) iops=(\d+)", r.stdout)
    if not m:
        sys.exit(f"no BENCH line from {' '.join(cmd)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return int(m.group(2)), int(m.group(3))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", required=True)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reads", type=int, default=5000)
    a = ap.parse_args()
    a.guest = os.path.abspath(a.guest)
    tmp = tempfile.mkdtemp(prefix="v3-virtio-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    img = os.path.join(tmp, "disk.img")
    disk(img)
    kvm = os.access("/dev/kvm", os.W_OK)
    runs = {}
    def cfg(irqchip):
        p = os.path.join(tmp, f"cfg{len(irqchip)}.xml")
        with open(p, "w") as f:
            f.write(CONFIG.format(irqchip=irqchip, disk=img, guest=a.guest, n=a.reads))
        return p
    qemu = ["qemu-system-x86_64", "-M", "pc", "-m", "64", "-nodefaults", "-nographic", "-serial", "stdio",
            "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", a.guest,
            "-append", f"test=none bench={a.reads}",
            "-drive", f"file={img},if=none,id=d0,format=raw,cache=writeback",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]
    pairs = [("emulator", [a.v3, "run", "--backend", "emu", cfg("")], "QEMU TCG", qemu + ["-accel", "tcg"])]
    if kvm:
        pairs.append(("KVM", [a.v3, "run", "--backend", "kvm", cfg("<irqchip>kernel</irqchip>")],
                      "QEMU KVM", qemu + ["-accel", "kvm"]))
    else:
        print("no usable /dev/kvm: the KVM pair is skipped")
    print(f"virtio-blk, {a.reads} random 4 KiB reads, one in flight, RAM-held disk, MSI-X; median of {a.reps}")
    for ours, ocmd, ref, rcmd in pairs:
        o, r = [], []
        for _ in range(a.reps):  # interleaved, so drift hits both alike
            o.append(bench(ocmd))
            r.append(bench(rcmd))
        ou = statistics.median(x[0] for x in o)
        ru = statistics.median(x[0] for x in r)
        oi = statistics.median(x[1] for x in o)
        ri = statistics.median(x[1] for x in r)
        print(f"  v3 {ours:9s} {ou:6d} us/req {oi:7d} IOPS | {ref:9s} {ru:6d} us/req {ri:7d} IOPS | ratio {ou / ru:.2f}")
    subprocess.run(["rm", "-rf", tmp])

main()
