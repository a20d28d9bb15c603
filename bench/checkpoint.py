#!/usr/bin/env python3
"""Checkpoint benchmarks (the managed-VM issue), each beside a reference measured in the same run.

* restore: process start to the guest's first output after `v3 load`, for 256 MiB and 2 GiB
  guests (the countdown guest with echo=1 answers a byte that is waiting on its console, so its
  first output comes as soon as it runs). Reference: QEMU (TCG) restoring the same guest from
  its own migration stream (`-incoming`): process start to QMP reporting the incoming
  migration completed (a lower bound for QEMU: its guest has not printed yet).
* save: an idle 256 MiB guest saved to a file: wall time of `v3 save` and the file's size on
  disk, beside QEMU (TCG) `stop` + `migrate` to a file through QMP (time to "completed").
* pause latency: request to acknowledgement (every core out of guest mode, guest time stopped),
  as the VMM measures it and as a client sees it (the API round trip), on the emulator and on
  KVM; beside QEMU's QMP `stop` round trip.
Every figure is the median of several runs; ratios are ours / QEMU's (lower is better).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from vmm_control import Qmp, api, wait_path

MIB = 1 << 20


def disk_bytes(path):
    if os.path.isdir(path):
        return sum(disk_bytes(os.path.join(path, f)) for f in os.listdir(path))
    return os.stat(path).st_blocks * 512


def qemu_base(a, mem, qmp, extra=()):
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config",
        "-serial", "stdio", "-m", str(mem), "-kernel", a.guest,
        "-append", "from=1000000000 step=4000000000 echo=1",
        "-qmp", f"unix:{qmp},server=on,wait=off", *extra,
    ]


def first_line_after_start(cmd, stdin=b"x", needle=b"got x"):
    """Seconds from process start to the line containing `needle` on stdout."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdin.write(stdin)
    p.stdin.flush()
    t = None
    buf = b""
    while True:
        c = p.stdout.read1(4096)
        if not c:
            break
        buf += c
        if needle in buf:
            t = time.perf_counter() - t0
            break
    p.kill()
    p.wait()
    if t is None:
        sys.exit(f"bench: {' '.join(cmd)} never printed {needle!r}: {buf[-300:]!r}")
    return t


def v3_checkpoint(a, mem, path, tmp):
    sock = os.path.join(tmp, f"save{mem}.sock")
    p = subprocess.Popen(
        [a.v3, "--log-level", "error", "run", "--backend", "emu", "--mem", str(mem), "--api-sock", sock,
         "--kernel", "guest:countdown.elf", "--cmdline", "from=1000000000 step=4000000000 echo=1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_path(sock)
    p.stdout.readline()  # "countdown start"
    p.stdout.readline()  # the first step: the guest is in its wait loop
    t0 = time.perf_counter()
    st, v = api(sock, "PUT", "/snapshot/create", {"path": path, "stop": True})
    t = time.perf_counter() - t0
    if st != 200:
        sys.exit(f"bench: save failed: {v}")
    p.wait(timeout=60)
    return t, v


def qemu_checkpoint(a, mem, path, tmp):
    qmp_path = os.path.join(tmp, f"qmp{mem}")
    p = subprocess.Popen(qemu_base(a, mem, qmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    p.stdout.readline()
    p.stdout.readline()
    q = Qmp(qmp_path)
    t0 = time.perf_counter()
    q.cmd("stop")
    q.cmd("migrate", uri=f"exec:cat > {path}")
    while q.cmd("query-migrate")["return"].get("status") not in ("completed", "failed"):
        time.sleep(0.001)
    t = time.perf_counter() - t0
    q.cmd("quit")
    p.wait(timeout=60)
    return t


def pause_latency(a, backend, tmp, n):
    sock = os.path.join(tmp, f"pause-{backend}.sock")
    p = subprocess.Popen(
        [a.v3, "--log-level", "error", "run", "--backend", backend, "--api-sock", sock,
         "--kernel", "guest:countdown.elf", "--cmdline", "from=1000000000 step=400000000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_path(sock)
    time.sleep(0.3)
    vmm, client = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        st, v = api(sock, "PUT", "/vm/pause")
        client.append(time.perf_counter() - t0)
        vmm.append(v["pause_latency_us"] / 1e6)
        api(sock, "PUT", "/vm/resume")
        time.sleep(0.02)
    api(sock, "PUT", "/vm/stop")
    p.wait(timeout=30)
    return statistics.median(vmm), statistics.median(client)


def qemu_pause(a, tmp, n):
    qmp_path = os.path.join(tmp, "qmp-pause")
    p = subprocess.Popen(qemu_base(a, 128, qmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    p.stdout.readline()
    q = Qmp(qmp_path)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        q.cmd("stop")
        ts.append(time.perf_counter() - t0)
        q.cmd("cont")
        time.sleep(0.02)
    q.cmd("quit")
    p.wait(timeout=30)
    return statistics.median(ts)


def ms(x):
    return f"{x * 1000:8.2f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", required=True)
    ap.add_argument("--guest", required=True, help="countdown.elf for QEMU")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kvm", action="store_true", help="also measure pause latency on KVM")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-")

    print("== restore: process start to the guest's first output after the restore")
    results = {}
    for mem in (256, 2048):
        ours_ck = os.path.join(tmp, f"v3-{mem}.ckpt")
        v3_checkpoint(a, mem, ours_ck, tmp)
        qemu_ck = os.path.join(tmp, f"qemu-{mem}.mig")
        qemu_checkpoint(a, mem, qemu_ck, tmp)
        cmd = [a.v3, "--log-level", "error", "load", ours_ck]
        first_line_after_start(cmd)  # warm the page cache
        ours = statistics.median(first_line_after_start(cmd) for _ in range(a.reps))
        qcmd = qemu_base(a, mem, os.path.join(tmp, f"qmp-in{mem}"), ("-incoming", f"exec:cat {qemu_ck}"))
        qcmd[qcmd.index("-qmp") + 1] = f"unix:{os.path.join(tmp, f'qmp-in{mem}')},server=on,wait=off"
        # QEMU: process start to its incoming migration "completed" (the guest then runs).
        def qemu_restore():
            t0 = time.perf_counter()
            p = subprocess.Popen(qcmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            qp = os.path.join(tmp, f"qmp-in{mem}")
            wait_path(qp)
            q = None
            while q is None:
                try:
                    q = Qmp(qp)
                except OSError:
                    time.sleep(0.0005)
            while q.cmd("query-migrate")["return"].get("status") != "completed":
                if time.perf_counter() - t0 > 60:
                    sys.exit("bench: QEMU's incoming migration did not complete")
                time.sleep(0.0005)
            t = time.perf_counter() - t0
            p.kill()
            p.wait()
            os.unlink(qp)
            return t
        qemu_restore()
        qemu = statistics.median(qemu_restore() for _ in range(a.reps))
        results[mem] = ours
        print(f"  {mem:5} MiB   v3 {ms(ours)}   QEMU {ms(qemu)}   ratio {ours / qemu:5.2f}")
    r = results[2048] / results[256]
    print(f"  2 GiB / 256 MiB restore time: {r:.2f} (target within 1.20); "
          f"target <= 10 ms: {'met' if max(results.values()) <= 0.010 else 'NOT met'}")

    print("== save of an idle 256 MiB guest (time, size on disk)")
    ts, qs, sizes = [], [], []
    for i in range(a.reps):
        p = os.path.join(tmp, f"save-{i}.ckpt")
        t, v = v3_checkpoint(a, 256, p, tmp)
        ts.append(t)
        sizes.append(disk_bytes(p))
        q = os.path.join(tmp, f"save-{i}.mig")
        qs.append(qemu_checkpoint(a, 256, q, tmp))
        qsize = disk_bytes(q)
        os.unlink(p)
        os.unlink(q)
    ours, qemu = statistics.median(ts), statistics.median(qs)
    osz = statistics.median(sizes)
    print(f"  time  v3 {ms(ours)}   QEMU {ms(qemu)}   ratio {ours / qemu:5.2f} (target <= 0.5)")
    print(f"  size  v3 {osz / 1024:8.0f} KiB  QEMU {qsize / 1024:8.0f} KiB  ratio {osz / qsize:5.2f} (target <= 0.5)")

    print("== pause latency (request to acknowledged)")
    qemu = qemu_pause(a, tmp, 20)
    backends = ["emu"] + (["kvm"] if a.kvm else [])
    for b in backends:
        vmm, client = pause_latency(a, b, tmp, 20)
        print(f"  {b:4}  in the VMM {ms(vmm)}   API round trip {ms(client)}   QEMU QMP stop {ms(qemu)}"
              + ("   (target <= 1 ms: " + ("met)" if vmm <= 0.001 else "NOT met)") if b == "emu" else ""))


if __name__ == "__main__":
    main()
