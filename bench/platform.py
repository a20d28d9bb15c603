#!/usr/bin/env python3
"""Platform benchmarks (issue: PC platform), v3 beside qemu-system-x86_64 -accel kvm running
the same pctest kernel:

Every figure is taken between the guest's "pctest: bench start" line and the VMM's exit, so
boot time (SeaBIOS for QEMU) is left out.
* timer delivery: PIT at 1 kHz and LAPIC periodic at 10 kHz. The guest counts N interrupts
  and exits; delivered/expected = N / (wall seconds * rate), and VMM CPU time per interrupt
  = (user+sys CPU of the VMM process, which includes KVM's work on its behalf) / N.
* IPI round trip between two cores: wall time / n.
* idle halted guest: the guest halts with interrupts on until a LAPIC one-shot 5 s later;
  VMM CPU use = CPU time / wall time.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time


def v3_cmd(a, cmdline, cores, irqchip="user"):
    return [a.v3, "--log-level", "error", "run", "--irqchip", irqchip, "--kernel", a.guest, "--mem", "128",
            "--cores", str(cores), "--cmdline", f"{cmdline} cpus={cores}"]


def v3k_cmd(a, cmdline, cores):
    return v3_cmd(a, cmdline, cores, "kernel")


def qemu_cmd(a, cmdline, cores):
    return ["qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-display", "none", "-nodefaults", "-no-user-config",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-device", "pc-testdev",
            "-smp", f"{cores},sockets={cores}", "-kernel", a.guest, "-append", f"{cmdline} cpus={cores}", "-m", "128"]


def cpu_seconds(pid):
    """user+system CPU of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cmd):
    """(wall, CPU) of the VMM process between the guest's 'bench start' line and its exit."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in p.stdout:
        if b"bench start" in line:
            break
    t0, c0 = time.perf_counter(), cpu_seconds(p.pid)
    p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 1:
        sys.exit(f"bench: {' '.join(cmd)} exited {os.waitstatus_to_exitcode(status)}")
    return time.perf_counter() - t0, ru.ru_utime + ru.ru_stime - c0


def median(f, reps):
    runs = [f() for _ in range(reps)]
    return tuple(statistics.median(x[i] for x in runs) for i in range(len(runs[0])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", required=True)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    # v3 with its own controllers, v3 with KVM's in-kernel ones, and QEMU (in-kernel by default;
    # QEMU with kernel-irqchip=off does not run on this machine's KVM).
    vmms = (("v3", v3_cmd), ("v3-kvm", v3k_cmd), ("qemu", qemu_cmd))
    want = lambda k: not a.only or k in a.only.split(",")

    for name, rate, n in (("pit", 1000, 5000), ("lapic", 10000, 50000)):
        if not want(name):
            continue
        print(f"{name} timer at {rate} Hz, {n} interrupts (about 5 s), median of {a.reps}:")
        res = {}
        for vmm, mk in vmms:
            wall, cpu = median(lambda: run(mk(a, f"bench={name} n={n} hz={rate}", 1)), a.reps)
            res[vmm] = (n / (wall * rate), cpu / n * 1e6)
            print(f"  {vmm:<6} delivered/expected {res[vmm][0]:.3f}   VMM CPU {res[vmm][1]:.2f} us/interrupt")
        print(f"  ratio CPU per interrupt v3/qemu {res['v3'][1] / res['qemu'][1]:.2f}, v3-kvm/qemu {res['v3-kvm'][1] / res['qemu'][1]:.2f}")

    if want("ipi"):
        n = 20000
        print(f"IPI round trip between two cores ({n}, median of {a.reps}):")
        res = {}
        for vmm, mk in vmms:
            wall, _ = median(lambda: run(mk(a, f"bench=ipi n={n}", 2)), a.reps)
            res[vmm] = wall / n * 1e6
            print(f"  {vmm:<6} {res[vmm]:.2f} us/round trip")
        print(f"  ratio v3/qemu {res['v3'] / res['qemu']:.2f}, v3-kvm/qemu {res['v3-kvm'] / res['qemu']:.2f}")

    if want("idle"):
        print("idle halted guest for 5 s (VMM CPU use, median of the runs):")
        res = {}
        for vmm, mk in vmms:
            wall, cpu = median(lambda: run(mk(a, "bench=idle ms=5000", 1)), a.reps)
            res[vmm] = cpu / wall * 100
            print(f"  {vmm:<6} {res[vmm]:.2f}% of one core over {wall:.1f} s")
        print(f"  v3 target < 2%; ratio v3/qemu {res['v3'] / max(res['qemu'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
