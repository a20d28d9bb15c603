#!/usr/bin/env python3
"""The cost of dirty-page tracking on the emulator: every emubench workload run with tracking
off, and with tracking on and a round taken every 50 ms through the API (what a migration
does: each round makes every core drop its write translations, so the next write to each page
goes through a TLB fill that marks it). Time: the guest's "emubench: start" line to the
process exit; median of --reps runs; ratio on / off (target <= 1.10).
With tracking off, the emulator's store path is the same as without tracking: an inline TLB
hit does not look at the dirty log; only a TLB fill loads one pointer to check it.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from vmm_control import api

WORKLOADS = {"dec": 100_000_000, "mem": 25_000_000, "call": 50_000_000, "alu": 12_500_000,
             "crc32": 125_000_000, "sieve": 50}


def run(a, name, n, tracking, tmp, binary=None):
    sock = os.path.join(tmp, f"{name}-{tracking}.sock")
    p = subprocess.Popen(
        [binary or a.v3, "--log-level", "error", "run", "--backend", "emu", "--mem", "128", "--api-sock", sock,
         "--kernel", a.guest, "--cmdline", f"bench={name} n={n}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    t0 = None
    rounds = [0, 0]
    stop = threading.Event()
    for line in p.stdout:
        if b"emubench: start" in line:
            t0 = time.perf_counter()
            break
    if tracking:
        api(sock, "PUT", "/vm/dirty", {"on": True})

        def rounds_loop():
            while not stop.is_set():
                time.sleep(0.05)
                try:
                    st, v = api(sock, "GET", "/vm/dirty")
                    if st == 200:
                        rounds[0] += 1
                        rounds[1] += v["pages"]
                except OSError:
                    return
        threading.Thread(target=rounds_loop, daemon=True).start()
    p.stdout.read()
    code = p.wait()
    t = time.perf_counter() - t0
    stop.set()
    if code != 1:
        sys.exit(f"bench: {name} exited {code}")
    return t, rounds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", required=True)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scale", type=float, default=3.0, help="multiply every N by this")
    ap.add_argument("--baseline", help="a v3 built without dirty tracking: its times beside 'off'")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="dirty-cost-")
    print("== dirty tracking on the emulator: emubench with tracking off, and on with a round every 50 ms")
    worst = 0.0
    for name, n in WORKLOADS.items():
        n = max(1, int(n * a.scale))
        # Interleaved, so slow phases of the host hit both alike.
        offs, ons, bases = [], [], []
        for _ in range(a.reps):
            if a.baseline:
                bases.append(run(a, name, n, False, tmp, a.baseline)[0])
            offs.append(run(a, name, n, False, tmp)[0])
            ons.append(run(a, name, n, True, tmp))
        off = statistics.median(offs)
        if bases:
            base = statistics.median(bases)
            print(f"  {name:6} without tracking code {base * 1000:8.1f} ms   tracking off {off * 1000:8.1f} ms"
                  f"   ratio {off / base:5.3f}")
        on = statistics.median(r[0] for r in ons)
        rounds, pages = ons[-1][1]
        worst = max(worst, on / off)
        print(f"  {name:6} off {off * 1000:8.1f} ms   on {on * 1000:8.1f} ms   ratio {on / off:5.3f}"
              f"   ({rounds} rounds, {pages / max(rounds, 1):.0f} pages dirtied per round)")
    print(f"  worst ratio {worst:.3f} (target <= 1.10: {'met' if worst <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
