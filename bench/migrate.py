#!/usr/bin/env python3
"""Live-migration benchmarks, v3 (emulator backend) beside QEMU (TCG), same guest, same run.

Guest: dirtier.elf in a 1 GiB VM, printing a line every ~3 ms (its TSC-paced step).
* idle: it rewrites one word of one page per line (practically idle);
* dirtying: it rewrites a 16 MiB region every 50 ms (one word per page, 1 MiB per line).
Both migrate over loopback between two processes. Figures:
* total: wall time from the migrate request to the destination running (v3: `v3 send`
  returning; QEMU: QMP `migrate` until query-migrate says completed);
* downtime as the guest's output shows it: the gap between the last line the source printed
  and the first the destination printed, less one line period (the same for both VMMs);
* each VMM's own downtime counter beside it.
QEMU runs with its downtime limit set to v3's (50 ms) and at its default (300 ms).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from vmm_control import Qmp

STEP_MS = 3.125


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Lines:
    """Timestamps of the lines a process prints."""

    def __init__(self, p):
        self.t = []
        self.p = p
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        for line in self.p.stdout:
            if line.startswith(b"seq "):
                self.t.append(time.perf_counter())

    def wait(self, n, timeout=60):
        t0 = time.time()
        while len(self.t) < n:
            if time.time() - t0 > timeout:
                sys.exit("bench: no output")
            time.sleep(0.005)


def guest_gap(src, dst):
    """Downtime from the guest's output: the gap across the move, less one line period."""
    period = statistics.median(b - a for a, b in zip(src.t[-20:-1], src.t[-19:]))
    return (dst.t[0] - src.t[-1]) - period


def cmdline(kind, ticks_per_ms):
    step = int(STEP_MS * ticks_per_ms)
    if kind == "idle":
        return f"mib=1 pages=1 step={step} light=1"
    return f"mib=16 pages=256 step={step} light=1"


def v3_run(a, kind, tmp):
    sock = os.path.join(tmp, f"v3-{kind}.sock")
    port = free_port()
    src = subprocess.Popen(
        [a.v3, "--log-level", "error", "run", "--backend", "emu", "--mem", "1024", "--api-sock", sock,
         "--kernel", "guest:dirtier.elf", "--cmdline", cmdline(kind, 2_000_000)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    dst = subprocess.Popen([a.v3, "--log-level", "error", "receive", "--listen", f"127.0.0.1:{port}"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    sl, dl = Lines(src), Lines(dst)
    sl.wait(40)
    time.sleep(0.3)
    t0 = time.perf_counter()
    r = subprocess.run([a.v3, "send", sock, f"127.0.0.1:{port}", "--downtime", "50"],
                       capture_output=True, timeout=300)
    total = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench: v3 send failed: {r.stderr.decode()}")
    own = json.loads(r.stdout)["downtime_ms"]
    dl.wait(5)
    gap = guest_gap(sl, dl)
    src.wait(timeout=30)
    dst.kill()
    dst.wait()
    return total, gap, own / 1000.0


def qemu_run(a, kind, tmp, limit_ms):
    q1, q2 = os.path.join(tmp, f"q1-{kind}"), os.path.join(tmp, f"q2-{kind}")
    for q in (q1, q2):
        if os.path.exists(q):
            os.unlink(q)
    port = free_port()
    base = ["qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config",
            "-serial", "stdio", "-m", "1024", "-kernel", a.guest, "-append", cmdline(kind, a.host_ticks)]
    src = subprocess.Popen(base + ["-qmp", f"unix:{q1},server=on,wait=off"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    dst = subprocess.Popen(base + ["-qmp", f"unix:{q2},server=on,wait=off", "-incoming", f"tcp:127.0.0.1:{port}"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    sl, dl = Lines(src), Lines(dst)
    sl.wait(40)
    time.sleep(0.3)
    q = Qmp(q1)
    if limit_ms is not None:
        q.cmd("migrate-set-parameters", **{"downtime-limit": limit_ms})
    t0 = time.perf_counter()
    q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    while True:
        st = q.cmd("query-migrate")["return"]
        if st.get("status") in ("completed", "failed"):
            break
        if time.perf_counter() - t0 > a.limit:
            # Never converged: report it as such.
            q.cmd("migrate_cancel")
            src.kill()
            dst.kill()
            src.wait()
            dst.wait()
            return float("inf"), float("inf"), float("inf")
        time.sleep(0.001)
    if st["status"] != "completed":
        sys.exit(f"bench: QEMU migration failed: {st}")
    dl.wait(5)
    total = time.perf_counter() - t0
    gap = guest_gap(sl, dl)
    src.kill()
    dst.kill()
    src.wait()
    dst.wait()
    return total, gap, st.get("downtime", 0) / 1000.0


def ms(x):
    return "   (none)" if x == float("inf") else f"{x * 1000:7.1f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", required=True)
    ap.add_argument("--guest", required=True, help="dirtier.elf for QEMU")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=float, default=30.0, help="seconds before a migration counts as not converging")
    a = ap.parse_args()
    mhz = 2300.0
    for l in open("/proc/cpuinfo"):
        if l.startswith("cpu MHz"):
            mhz = float(l.split(":")[1])
            break
    a.host_ticks = int(mhz * 1000)
    tmp = tempfile.mkdtemp(prefix="mig-bench-")
    for kind in ("idle", "dirtying"):
        print(f"== 1 GiB guest, {kind}: total time, downtime seen by the guest (and the VMM's own counter)")
        rows = [("v3 (50 ms limit)", lambda: v3_run(a, kind, tmp)),
                ("QEMU (50 ms limit)", lambda: qemu_run(a, kind, tmp, 50)),
                ("QEMU (default 300 ms)", lambda: qemu_run(a, kind, tmp, None))]
        res = {}
        for name, f in rows:
            runs = [f() for _ in range(a.reps)]
            tot = statistics.median(r[0] for r in runs)
            gap = statistics.median(r[1] for r in runs)
            own = statistics.median(r[2] for r in runs)
            res[name] = (tot, gap)
            print(f"  {name:22} total {ms(tot)}   guest-seen downtime {ms(gap)}   (own counter {ms(own)})")
        ours, ref = res["v3 (50 ms limit)"], res["QEMU (50 ms limit)"]
        if ref[0] == float("inf"):
            print(f"  QEMU with a 50 ms limit did not converge within {a.limit:.0f} s")
        else:
            print(f"  v3 / QEMU (50 ms): total {ours[0] / ref[0]:.2f}, downtime {ours[1] / max(ref[1], 1e-4):.2f}"
                  f"  (targets <= 1)")
        print(f"  v3 downtime never above 50 ms: {'met' if ours[1] <= 0.050 else 'NOT met'}")


if __name__ == "__main__":
    main()
