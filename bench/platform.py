#!/usr/bin/env python3
"""Platform benchmarks (issue: PC platform), v3 beside qemu-system-x86_64 -accel kvm running
the same pctest kernel:

* timer delivery: PIT at 1 kHz and LAPIC periodic at 10 kHz. The guest counts N interrupts
  and exits; delivered/expected = N / (wall seconds * rate), and VMM CPU time per interrupt
  = (user+sys CPU of the VMM process) / N.
* IPI round trip between two cores: (T(n) - T(0)) / n over whole runs.
* idle halted guest: the guest halts with interrupts on until a LAPIC one-shot 5 s later;
  VMM CPU use = CPU time / wall time.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time


def v3_cmd(a, cmdline, cores):
    return [a.v3, "--log-level", "error", "run", "--kernel", a.guest, "--mem", "128", "--cores", str(cores), "--cmdline", cmdline]


def qemu_cmd(a, cmdline, cores):
    return ["qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-display", "none", "-nodefaults", "-no-user-config",
            "-serial", "null", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-device", "pc-testdev",
            "-smp", str(cores), "-kernel", a.guest, "-append", cmdline, "-m", "128"]


def run(cmd, expect=1):
    """(wall seconds, CPU seconds of the process)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != expect:
        err = p.stderr.read().decode()[-400:]
        sys.exit(f"bench: {' '.join(cmd)} exited {code}, expected {expect}: {err}")
    return wall, ru.ru_utime + ru.ru_stime


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
    vmms = (("v3", v3_cmd), ("qemu", qemu_cmd))
    want = lambda k: not a.only or k in a.only.split(",")

    for name, rate, n in (("pit", 1000, 5000), ("lapic", 10000, 50000)):
        if not want(name):
            continue
        print(f"{name} timer at {rate} Hz, {n} interrupts (about 5 s), median of {a.reps}:")
        res = {}
        for vmm, mk in vmms:
            wall, cpu = median(lambda: run(mk(a, f"bench={name} n={n} hz={rate}", 1)), a.reps)
            res[vmm] = (n / (wall * rate), cpu / n * 1e6)
            print(f"  {vmm:<5} delivered/expected {res[vmm][0]:.3f}   VMM CPU {res[vmm][1]:.2f} us/interrupt")
        print(f"  ratio v3/qemu CPU per interrupt {res['v3'][1] / res['qemu'][1]:.2f}")

    if want("ipi"):
        n = 20000
        print(f"IPI round trip between two cores ({n}, median of {a.reps}):")
        res = {}
        for vmm, mk in vmms:
            w0, _ = median(lambda: run(mk(a, "bench=ipi n=0", 2)), a.reps)
            wn, _ = median(lambda: run(mk(a, f"bench=ipi n={n}", 2)), a.reps)
            res[vmm] = (wn - w0) / n * 1e6
            print(f"  {vmm:<5} {res[vmm]:.2f} us/round trip")
        print(f"  ratio v3/qemu {res['v3'] / res['qemu']:.2f}")

    if want("idle"):
        print("idle halted guest for 5 s (VMM CPU use, median of the runs):")
        res = {}
        for vmm, mk in vmms:
            wall, cpu = median(lambda: run(mk(a, "bench=idle ms=5000", 1)), a.reps)
            res[vmm] = cpu / wall * 100
            print(f"  {vmm:<5} {res[vmm]:.2f}% of one core over {wall:.1f} s")
        print(f"  v3 target < 2%; ratio v3/qemu {res['v3'] / max(res['qemu'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
