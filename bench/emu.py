#!/usr/bin/env python3
"""Emulator backend CPU benchmarks: v3 --backend emu beside qemu-system-x86_64 -accel tcg, both
running the same emubench kernel (guests/emubench) in the same invocation of this script.

Workloads (64-bit long mode): dec/jnz loop, memory-heavy loop, call/ret, flag-heavy ALU chain, and
two mixed C workloads (table-driven CRC-32, byte sieve). For each, every VMM runs the guest with
0 and N iterations; each time is taken from the guest's "emubench: start" line to the process
exit (so boot is left out), and T(N) - T(0) also removes the exit and the rest, so
    MIPS = (instructions(N) - instructions(0)) / (T(N) - T(0)).
(A zero-iteration baseline rather than N and 2N: the host noise grows with the run time, and the
difference of two long runs has the noise of both.)
The same runs also give CPU time of the VMM process (all threads) over the same interval: the
threads' run time from /proc/PID/task/*/schedstat at the start line, user+system from wait4 at the
exit. Its N - 0 difference is less sensitive to other load on the host; it is printed second.
Instruction counts: the emulator's own counter (v3 --stats, "emu instructions") when it prints
one, else the per-iteration counts below, which are taken from the disassembly (guests/emubench/
loops.S; crc32_run is 9 instructions per byte at -O2). The two are cross-checked. Times are the
median (or --stat min) of --reps runs; the ratio is ours / QEMU's (higher is better). Both VMMs
must print the same "emubench: result" value, which checks the emulator's arithmetic and flags.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time

# name: (N, instructions per iteration or None when data-dependent, what). The loops run about
# 200 million instructions, the mixed workloads about 1 billion: QEMU TCG runs those at 1.5-2
# GIPS, and a shorter run would leave its figure to the noise of its own start and exit.
WORKLOADS = {
    "dec": (100_000_000, 2, "dec/jnz loop"),
    "mem": (25_000_000, 8, "loads/stores, 256 KiB buffer"),
    "call": (50_000_000, 4, "call/ret"),
    "alu": (12_500_000, 16, "adc/sbb/shift/setcc chain"),
    "crc32": (125_000_000, 9, "CRC-32, table-driven (C)"),
    "sieve": (50, None, "byte sieve to 2^20 (C)"),
}
LOOPS = ("dec", "mem", "call", "alu")  # target: >= 100 MIPS each
MIXED = ("crc32", "sieve")  # target: >= 0.3x QEMU TCG
LOOP_MIPS_TARGET = 100.0
MIXED_RATIO_TARGET = 0.3


def v3_cmd(a, cmdline):
    return [a.v3, "--log-level", "error", "run", "--backend", "emu", "--stats", "--kernel", a.guest,
            "--mem", "128", "--cmdline", cmdline]


def qemu_cmd(a, cmdline):
    return [a.qemu, "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", a.guest, "-append", cmdline, "-m", "128"]


VMMS = (("v3-emu", v3_cmd), ("qemu-tcg", qemu_cmd))
CLOCKS = ("wall", "cpu")
TIMEOUT = 600  # seconds a single VMM run may take


def cpu_seconds(pid):
    """Run time so far of all the live threads of a process (ns resolution)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def run(cmd):
    """(wall and CPU seconds from the guest's start line to the process exit, result string,
    instruction count or None)."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(TIMEOUT, p.kill)
    watchdog.start()
    head = []
    t0 = None
    for line in p.stdout:
        head.append(line)
        if b"emubench: start" in line:
            t0 = time.perf_counter()
            c0 = cpu_seconds(p.pid)
            break
    rest = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    t = time.perf_counter() - (t0 or 0)
    watchdog.cancel()
    out = (b"".join(head) + rest).decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if t0 is None or code != 1:
        sys.exit(f"bench: {' '.join(cmd)} exited {code}, expected 1:\n{out[-1500:]}")
    m = re.search(r"emubench: result (\S+)", out)
    n = re.search(r"emu instructions\s+(\d+)", out)
    return t, ru.ru_utime + ru.ru_stime - c0, (m.group(1) if m else "?"), (int(n.group(1)) if n else None)


def fmt_n(n):
    for div, suf in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 100) == 0:
            return f"{n / div:g}{suf}"
    return str(n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", required=True)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--reps", type=int, default=3, help="runs per size and VMM")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="how the runs of one size combine (min resists other load on the host)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every N by this")
    ap.add_argument("--only", default="", help="comma-separated workloads (default: all)")
    a = ap.parse_args()
    names = [w for w in WORKLOADS if not a.only or w in a.only.split(",")]
    if not names:
        sys.exit(f"bench: --only names none of {', '.join(WORKLOADS)}")

    print(f"emulator CPU benchmarks: 0 and N iterations, MIPS from the N - 0 differences, {a.stat} of "
          f"{a.reps} runs each", flush=True)
    rows = []
    for name in names:
        base, per_iter, what = WORKLOADS[name]
        n = max(1, int(base * a.scale))
        sizes = (0, n)
        times = {c: {v: {k: [] for k in sizes} for v, _ in VMMS} for c in CLOCKS}
        results = {}
        icount = {}
        for _ in range(a.reps):
            for vmm, mk in VMMS:
                for k in sizes:
                    wall, cpu, res, ins = run(mk(a, f"bench={name} n={k}"))
                    times["wall"][vmm][k].append(wall)
                    times["cpu"][vmm][k].append(cpu)
                    results.setdefault(k, {})[vmm] = res
                    if ins is not None:
                        icount[k] = ins
        # Instructions of the N iterations.
        measured = icount[n] - icount[0] if n in icount and 0 in icount else None
        static = per_iter * n if per_iter else None
        note = ""
        if measured is not None and static is not None and abs(measured - static) > 0.001 * static:
            note = f"emu counted {measured / n:.3f} insns/iter, expected {per_iter}"
        insns = measured if measured is not None else static
        mips = {}
        for c in CLOCKS:
            for vmm, _ in VMMS:
                pick = statistics.median if a.stat == "median" else min
                dt = pick(times[c][vmm][n]) - pick(times[c][vmm][0])
                mips[c, vmm] = insns / dt / 1e6 if insns and dt > 0 else float("nan")
        ok = all(len(set(r.values())) == 1 for r in results.values())
        if not ok:
            note = (note + "; " if note else "") + "RESULT MISMATCH " + " ".join(
                f"{v}={r}" for r in results.values() for v, r in r.items())
        rows.append((name, what, n, insns / n if insns else float("nan"), mips, ok, note))
        spread = {v: (max(t) - min(t)) / statistics.median(t) * 100 for v, _ in VMMS for t in [times["wall"][v][n]]}
        print(f"  {name:<6} done: v3-emu {mips['wall', 'v3-emu']:.1f} MIPS, qemu-tcg {mips['wall', 'qemu-tcg']:.1f} MIPS "
              f"(by CPU time {mips['cpu', 'v3-emu']:.1f} / {mips['cpu', 'qemu-tcg']:.1f}; spread of the N runs "
              f"{spread['v3-emu']:.0f}% / {spread['qemu-tcg']:.0f}%)", file=sys.stderr, flush=True)

    for c in CLOCKS:
        table(rows, c)
    print("ratio = v3-emu MIPS / qemu-tcg MIPS; result: the guest's checksum agrees between the two VMMs")


def table(rows, clock):
    print(f"by {'wall time (start line to exit)' if clock == 'wall' else 'CPU time of the VMM process (start line to exit)'}:")
    print(f"{'workload':<7} {'N':>6} {'insn/it':>9} {'v3-emu MIPS':>12} {'qemu-tcg MIPS':>14} {'ratio':>6}  "
          f"{'target':<15} {'met':<4} {'result':<6} what")
    for name, what, n, ipi, mips, ok, note in rows:
        ours, ref = mips[clock, "v3-emu"], mips[clock, "qemu-tcg"]
        ratio = ours / ref
        if name in LOOPS:
            target, met = f">= {LOOP_MIPS_TARGET:g} MIPS", ours >= LOOP_MIPS_TARGET
        else:
            target, met = f">= {MIXED_RATIO_TARGET}x TCG", ratio >= MIXED_RATIO_TARGET
        print(f"{name:<7} {fmt_n(n):>6} {ipi:>9.4g} {ours:>12.1f} {ref:>14.1f} {ratio:>6.3f}  "
              f"{target:<15} {'yes' if met else 'NO':<4} {'same' if ok else 'DIFF':<6} {what}")
        if note and clock == CLOCKS[0]:
            print(f"        note: {note}")


if __name__ == "__main__":
    main()
