#!/usr/bin/env python3
"""Side-by-side benchmarks of v3 and qemu-system-x86_64 -accel kvm on the same multiboot guest.

* exit round trip: the guest does N `outb` to an unclaimed port between two serial lines; the
  figure is the wall time between those lines as they reach our pipe, divided by N. (The older
  whole-process (T(N) - T(0)) / N is printed beside it; it carries QEMU's ~3.5 s firmware start
  in both terms, so its noise is a few microseconds per exit.)
* start to exit:  whole-process wall time for a guest that writes the debug-exit port at once.
* memory overhead: resident memory of the VMM process minus the resident guest RAM, for a
  1-vCPU 128 MiB guest, read from /proc/PID/smaps while the guest runs.
Every figure is the median of several runs; ratios are ours / QEMU's (lower is better).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

MIB = 1 << 20


def v3_cmd(a, cmdline, mem=128):
    return [a.v3, "--log-level", "error", "run", "--kernel", a.guest, "--mem", str(mem), "--cmdline", cmdline]


def qemu_cmd(a, cmdline, mem=128):
    return [
        "qemu-system-x86_64", "-accel", "kvm", "-display", "none", "-nodefaults", "-no-user-config",
        "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel", a.guest, "-append", cmdline, "-m", str(mem),
    ]


def timed(cmd, expect):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    t = time.perf_counter() - t0
    if p.returncode != expect:
        sys.exit(f"bench: {' '.join(cmd)} exited {p.returncode}, expected {expect}: {p.stderr.decode()[-500:]}")
    return t


def loop_time(cmd, n):
    """Seconds between the guest's "iobench N" and "iobench done" lines, stamped on arrival."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    start = end = None
    try:
        for line in p.stdout:
            now = time.perf_counter()
            if line.startswith(f"mbtest: iobench {n}".encode()):
                start = now
            elif line.startswith(b"mbtest: iobench done"):
                end = now
    finally:
        p.wait(timeout=300)
    if start is None or end is None:
        sys.exit(f"bench: {' '.join(cmd)} did not print both iobench lines")
    return end - start


def median_time(cmd, expect, reps):
    return statistics.median(timed(cmd, expect) for _ in range(reps))


def smaps_overhead(pid, guest_bytes):
    """(total RSS, RSS of guest RAM) in bytes: guest RAM is the anonymous mapping(s) of at least
    the guest's size."""
    total = guest = 0
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and ":" not in parts[0]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
            elif parts and parts[0] == "Rss:":
                rss = int(parts[1]) * 1024
                total += rss
                if size >= guest_bytes:
                    guest += rss
    return total, guest


def memory(cmd, guest_bytes):
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)  # the guest is waiting for input on COM1
        samples = [smaps_overhead(p.pid, guest_bytes)]
        time.sleep(0.5)
        samples.append(smaps_overhead(p.pid, guest_bytes))
    finally:
        p.kill()
        p.wait()
    total, guest = max(samples)
    return total, guest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", required=True)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--exits", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        sys.exit("bench: /dev/kvm is missing; these benchmarks compare KVM VMMs")
    n = a.exits
    print(f"exit round trip ({n} port-I/O exits, median of {a.reps}):")
    res = {}
    for name, mk in (("v3", v3_cmd), ("qemu", qemu_cmd)):
        cmd = mk(a, f"test=iobench n={n}")
        res[name] = statistics.median(loop_time(cmd, n) for _ in range(a.reps)) / n * 1e6
        t0 = median_time(mk(a, "test=iobench n=0"), 1, a.reps)
        tn = median_time(cmd, 1, a.reps)
        print(f"  {name:<5} {res[name]:8.2f} us/exit   (whole-process (T(N)-T(0))/N: {(tn - t0) / n * 1e6:.2f})")
    print(f"  ratio v3/qemu {res['v3'] / res['qemu']:.2f} (target <= 0.9)")

    print(f"start to exit (whole process, median of {a.reps}):")
    st = {}
    for name, mk in (("v3", v3_cmd), ("qemu", qemu_cmd)):
        st[name] = median_time(mk(a, "test=quick"), 1, a.reps) * 1e3
        print(f"  {name:<5} {st[name]:8.1f} ms")
    print(f"  ratio v3/qemu {st['v3'] / st['qemu']:.2f} (target <= 0.5)")

    print("memory overhead (RSS minus resident guest RAM, 1 vCPU, 128 MiB guest):")
    mo = {}
    for name, mk in (("v3", v3_cmd), ("qemu", qemu_cmd)):
        total, guest = memory(mk(a, "test=echo"), 128 * MIB)
        mo[name] = (total - guest) / MIB
        print(f"  {name:<5} {mo[name]:8.2f} MiB  (RSS {total / MIB:.1f} MiB, guest RAM resident {guest / MIB:.1f} MiB)")
    print(f"  ratio v3/qemu {mo['v3'] / mo['qemu']:.2f} (target: v3 <= 5 MiB)")


if __name__ == "__main__":
    main()
