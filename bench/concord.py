#!/usr/bin/env python3
"""ConCORD (memory-content tracking) benchmarks, emulator backend, every ratio against a
reference measured in the same run. See bench/concord.sh.

1. update monitor throughput: a 1 GiB VM running guests/concord (512 MiB region: 32768
   shared, 16384 private and 1024 duplicate pages) with the concord extension; after
   "concord ready" and a sync, the monitor's own counters: pages hashed per second on one
   core (1e9 / hash_ns_per_page; a page is read out of guest memory and hashed with xxh3),
   the same in GiB/s, and directory updates published per second (updates_published over
   the time spent publishing). These cover the first full pass over all 1 GiB (mostly
   never-touched pages) and the rehashing during the fill. There is no reference for them in
   v3 (no raw hashing figure), so they carry no ratio. Then the steady state: the same VM
   with the guest rewriting all its private pages (churn), the same rates from the counters'
   differences over at least --churn-secs (whole passes of the guest), each against the
   first figure.
2. cost to a running guest: emubench (guests/emubench) workloads `mem` (loads and stores over
   a 256 KiB buffer) and `sieve` (a byte sieve over 1 MiB: a compute loop that writes) with and
   without the concord extension (interval --interval-ms, default 100). Each workload runs
   with 0 and N iterations; the time from the guest's "emubench: start" line to the process
   exit, N - 0, is the workload's (boot, the monitor's first full pass overlapping it, and
   the exit are left out). Median of --reps runs of each; each variant's run comes right
   after the other's, the order alternating rep by rep. slowdown = with / without (of the
   medians), target <= 1.10; the median of the reps' own ratios and the ratio of the fastest
   runs are printed beside it (a host's speed may drift between runs). CPU time of the
   whole process (every thread, the monitor's included) is printed too.
3. query latency: 4 small concord.elf VMs (32 MiB, 4 MiB region) on one embedded directory
   (unix socket, served by the first VM): `v3 concord copies HASH --repeat R` (the page at
   gpa 0x1000000, shared by all four) and `v3 concord sharing vm0..vm3 --repeat R`, the
   median latency v3 reports. Then the same against a 3-node Redis Cluster in network
   namespaces (scripts/redis-cluster-ns.sh; one VM per namespace and a fourth in the first),
   queried from the root namespace; ratio redis / embedded. Skipped (SKIP and the reason)
   when the cluster cannot be set up, or with --no-redis. The servers (VM processes, with
   the embedded directory's thread; the redis-servers) are pinned to one core, and the
   query client runs on that core and then on another: unpinned, whether a message wakes a
   thread on the same core or on the other changes a query's time several-fold (a cross-core
   wake-up costs some 30 µs on a virtual machine), and the median flips between the two from
   run to run.
4. collective checkpoint (--no-linux skips it): 4 Linux guests (the same kernel and
   initramfs, 128 MiB each) with ConCORD, booted at once; at their prompts, a sync and the
   `sharing` query (shared fraction = (nonzero_total - nonzero_distinct) / nonzero_total);
   then 4 individual checkpoints (PUT /snapshot/create, the VMs go on; time of each request
   and allocated bytes of each file), then `v3 concord checkpoint --store DIR --stop` on all
   four. Collective time and size against the sums of the individual ones; target: the
   collective store saves at least 0.9 x the shared fraction (page maps and metadata cost a
   little), as crates/v3/tests/concord.rs asks.

The run fails (status 1) on errors, not on a missed target.
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

from console import BenchError, Console, die_with_parent
from vmm_control import api

SLOWDOWN_TARGET = 1.10
SAVED_SHARE_TARGET = 0.9
# emubench workloads: (N, what). About 2 s of guest work each on the emulator: some 20
# tracking rounds at 100 ms (emu.py's N run for only 0.3-1 s here).
EMU_WORKLOADS = {
    "mem": (150_000_000, "loads/stores over a 256 KiB buffer"),
    "sieve": (100, "byte sieve over 1 MiB (C)"),
}
REGION = 0x1000000
DEVICES_SMALL = ('<device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/>'
                 '<device class="SERIAL" id="serial"/>')
# The standard PC of `v3 run --kernel` (crates/v3/src/platform.rs): emubench exits through
# the debug-exit port.
DEVICES_PC = "".join(f'<device class="{c}" id="{i}"/>' for c, i in (
    ("8259A", "pic"), ("8254_PIT", "pit"), ("LAPIC", "lapic"), ("IOAPIC", "ioapic"),
    ("MPTABLE", "mptable"), ("NVRAM", "nvram"), ("KEYBOARD", "keyboard"), ("FW_CFG", "fw_cfg"),
    ("PC_TESTDEV", "pc_testdev"), ("PM_TIMER", "pm_timer"), ("ACPI", "acpi"), ("SERIAL", "serial"),
    ("BOCHS_DEBUG", "bochs_debug"), ("OS_DEBUG", "os_debug"), ("DEBUG_EXIT", "debug_exit")))
DEVICES_LINUX = "".join(f'<device class="{c}" id="{i}"/>' for c, i in (
    ("8259A", "pic"), ("8254_PIT", "pit"), ("LAPIC", "lapic"), ("IOAPIC", "ioapic"),
    ("NVRAM", "nvram"), ("KEYBOARD", "keyboard"), ("PM_TIMER", "pm_timer"), ("ACPI", "acpi"),
    ("SERIAL", "serial")))
LINUX_CMDLINE = "console=ttyS0 nokaslr cryptomgr.notests"
NOTES = []  # v3 behaviour worth a word, printed after the summary


def vm_config(mem, devices, boot, directory=None, host="h1", interval_ms=100):
    ext = ""
    if directory:
        ext = (f'<extensions><extension name="concord" directory="{directory}" host="{host}" '
               f'interval_ms="{interval_ms}"/></extensions>')
    return (f'<vm class="PC"><memory>{mem}</memory><backend>emu</backend>{ext}'
            f'<devices>{devices}</devices>{boot}</vm>\n')


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


class Vm:
    """A `v3 run CONFIG --api-sock WORK/NAME.sock` (the ConCORD entity is NAME)."""

    def __init__(self, a, name, config_text, prefix=()):
        self.name = name
        self.sock = os.path.join(a.workdir, f"{name}.sock")
        cfg = write(os.path.join(a.workdir, f"{name}.xml"), config_text)
        self.con = Console([*prefix, a.v3, "--log-level", "error", "run", cfg, "--api-sock", self.sock],
                           os.path.join(a.workdir, f"console-{name}.log"))

    def wait_socket(self, timeout=60):
        t = time.monotonic()
        while not os.path.exists(self.sock):
            if self.con.p.poll() is not None:
                raise BenchError(f"{self.name}: v3 exited ({self.con.p.returncode}) before its API socket "
                                 f"appeared:\n{self.con.tail()}")
            if time.monotonic() - t > timeout:
                raise BenchError(f"{self.name}: {self.sock} did not appear within {timeout} s")
            time.sleep(0.01)

    def call(self, method, path, body=None):
        st, v = api(self.sock, method, path, body)
        if st != 200:
            raise BenchError(f"{self.name}: {method} {path} {json.dumps(body) if body is not None else ''}: {st} {v}")
        return v

    def settle(self, idle=True, timeout=30):
        """Sync until the monitor is connected to its directory (and, with `idle`, has nothing
        left to publish): the status. A sync can return while the monitor is in its back-off
        after a failed publish (VMs that start together race to serve an embedded directory,
        and a loser may find no socket yet); that is noted."""
        t = time.monotonic()
        n = 0
        first = None
        while True:
            st = self.call("PUT", "/vm/concord/sync")
            n += 1
            first = first or st
            if st.get("connected") and (not idle or st.get("pending_updates") == 0):
                if n > 1:
                    NOTES.append(f"{self.name}: PUT /vm/concord/sync returned connected={first.get('connected')}, "
                                 f"pending_updates {first.get('pending_updates')}, last_error "
                                 f"{first.get('last_error')!r}; settled after {n} syncs in "
                                 f"{time.monotonic() - t:.2f} s")
                return st
            if time.monotonic() - t > timeout:
                raise BenchError(f"{self.name}: not settled (connected, nothing pending) after {n} syncs in "
                                 f"{timeout} s: {st}")
            time.sleep(0.1)

    def stop(self):
        """Stop the VM (the API, else a kill) and reap it."""
        if self.con.p.poll() is None and os.path.exists(self.sock):
            try:
                api(self.sock, "PUT", "/vm/stop")
            except OSError:
                pass
            self.con.wait_exit(30)
        self.con.close()


def stop_all(vms):
    for vm in vms:
        try:
            vm.stop()
        except Exception as e:  # cleanup: keep stopping the others
            print(f"concord: stopping {vm.name}: {e}", file=sys.stderr)


def concord_cli(a, directory, *args, timeout=600, cpus=None):
    """`v3 concord --directory D ARGS..` (on `cpus` if given): (its JSON answer, wall seconds)."""
    cmd = [a.v3, "--log-level", "error", "concord", "--directory", directory, *args]

    def pre():
        die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)
    t = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, preexec_fn=pre)
    secs = time.monotonic() - t
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode(errors='replace')[-800:]}")
    try:
        return json.loads(p.stdout), secs
    except json.JSONDecodeError:
        raise BenchError(f"{' '.join(cmd)}: not JSON: {p.stdout[-400:]!r}")


def allocated(path):
    if os.path.isdir(path):
        return sum(allocated(os.path.join(path, f)) for f in os.listdir(path))
    return os.stat(path).st_blocks * 512


def fmt_ratio(r):
    return f"{r:.3f}" if r is not None else "n/a"


def figure(name, value, ref=None, ratio=None, note=""):
    """Print one figure as "name: value (reference: value, ratio X)"."""
    if ref is None:
        print(f"  {name}: {value}" + (f" ({note})" if note else ""), flush=True)
    else:
        print(f"  {name}: {value} (reference: {ref}, ratio {fmt_ratio(ratio)})" + (f" {note}" if note else ""),
              flush=True)


# ---------------------------------------------------------------------------------------- 1


def bench_monitor(a, summary):
    print(f"\n== 1. update monitor throughput: 1024 MiB VM, concord.elf {a.big_cmdline}, interval "
          f"{a.interval_ms} ms", flush=True)
    d = f"unix:{os.path.join(a.dirdir, 'monitor.sock')}"
    boot = f'<boot kernel="{a.concord_elf}" cmdline="id=0 {a.big_cmdline}"/>'
    vm = Vm(a, "big", vm_config(1024, DEVICES_SMALL, boot, d, interval_ms=a.interval_ms))
    try:
        t0 = time.monotonic()
        vm.wait_socket()
        ready = vm.con.wait_for(re.compile(rb"concord ready \d+ \d+ \d+"), 0, a.step_timeout, "concord ready")
        t_ready = time.monotonic() - t0
        if b"FAIL" in vm.con.buf[:ready]:
            raise BenchError(f"concord.elf: {vm.con.tail()}")
        t1 = time.monotonic()
        st = vm.settle()
        t_sync = time.monotonic() - t1
        # A second sync on the idle guest: two rounds with nothing dirty.
        t1 = time.monotonic()
        vm.call("PUT", "/vm/concord/sync")
        t_idle_sync = time.monotonic() - t1
        st = vm.call("GET", "/vm/concord")
    finally:
        vm.stop()
    if not st.get("connected"):
        raise BenchError(f"the monitor is not connected to its directory: {st}")
    want_pages = 1024 * 256
    if st["pages"] != want_pages:
        raise BenchError(f"the monitor tracks {st['pages']} pages, not {want_pages}: {st}")
    ns = st["hash_ns_per_page"]
    pps = 1e9 / ns if ns else None
    gibs = pps * 4096 / 2**30 if pps else None
    ups = st["updates_published"] / (st["publish_ms"] / 1000) if st["publish_ms"] else None
    print(f"  guest ready {t_ready:.1f} s after start; status after the sync: rounds {st['rounds']}, pages "
          f"{st['pages']}, distinct {st['distinct']}, pages_hashed {st['pages_hashed']} "
          f"({st['pages_hashed'] / st['pages']:.2f} x the VM), hash_ns_per_page {ns}, updates_published "
          f"{st['updates_published']}, publish_ms {st['publish_ms']}, publish_errors {st['publish_errors']}")
    figure("pages hashed per second, one core", f"{pps:,.0f} pages/s" if pps else "n/a",
           note="no reference: v3 has no raw hashing figure to compare with")
    figure("hashing bandwidth, one core", f"{gibs:.2f} GiB/s" if gibs else "n/a", note="no reference")
    figure("directory updates published per second", f"{ups:,.0f} updates/s" if ups else "n/a (publish_ms 0)",
           note="no reference; publish_ms is whole milliseconds")
    figure("sync after the fill (2 rounds)", f"{t_sync * 1000:.0f} ms", note="no reference")
    figure("sync on the idle guest (2 rounds, nothing dirty)", f"{t_idle_sync * 1000:.0f} ms", note="no reference")
    summary.append(("monitor: pages hashed / s / core", f"{pps:,.0f}" if pps else "n/a", "-", None, "no reference"))
    summary.append(("monitor: hashing GiB/s / core", f"{gibs:.2f}" if gibs else "n/a", "-", None, "no reference"))
    summary.append(("monitor: updates published / s", f"{ups:,.0f}" if ups else "n/a", "-", None, "no reference"))
    bench_monitor_churn(a, summary, pps, ups)


def bench_monitor_churn(a, summary, pps_full, ups_full):
    """The same VM with the guest rewriting all its private pages (churn): the monitor's rates
    over at least --churn-secs of whole passes, from the differences of its counters (its status gives the
    mean ns per page, so the window's hashing time is rebuilt from mean x pages, within 1 ns a
    page of all pages hashed so far)."""
    m = re.search(r"private=(\d+)", a.big_cmdline)
    churn = int(m[1]) if m else 0
    if not churn:
        print("  (no private pages in --big-cmdline: no steady-state figures)")
        return
    print(f"  steady state: the same VM with churn={churn} (the guest keeps rewriting {churn * 4 // 1024} MiB), "
          f"counters over at least {a.churn_secs:.0f} s (whole churn passes)", flush=True)
    d = f"unix:{os.path.join(a.dirdir, 'churn.sock')}"
    boot = f'<boot kernel="{a.concord_elf}" cmdline="id=0 {a.big_cmdline} churn={churn}"/>'
    vm = Vm(a, "churn", vm_config(1024, DEVICES_SMALL, boot, d, interval_ms=a.interval_ms))
    passes = re.compile(rb"churn (\d+)\n")
    try:
        vm.wait_socket()
        vm.con.wait_for(passes, 0, a.step_timeout, "churn 1")
        vm.settle(idle=False)
        # The window runs from the end of one pass to the end of a later one, so that the
        # pages the guest wrote in it are whole passes.
        at = vm.con.wait_for(passes, len(vm.con.buf), a.step_timeout, "the next churn pass")
        s0 = vm.call("GET", "/vm/concord")
        t0 = time.monotonic()
        n0 = len(passes.findall(vm.con.buf, 0, at))
        time.sleep(a.churn_secs)
        at = vm.con.wait_for(passes, len(vm.con.buf), a.step_timeout, "the next churn pass")
        s1 = vm.call("GET", "/vm/concord")
        t1 = time.monotonic()
        n1 = len(passes.findall(vm.con.buf, 0, at))
        bad = re.search(rb"verify FAIL[^\n]*", vm.con.buf)
    finally:
        vm.stop()
    if bad:
        raise BenchError(f"concord.elf with churn: {bad[0].decode()}")
    if not s1.get("connected") or s1["publish_errors"] != s0["publish_errors"]:
        raise BenchError(f"the monitor lost its directory: {s1}")
    dp = s1["pages_hashed"] - s0["pages_hashed"]
    dns = s1["pages_hashed"] * s1["hash_ns_per_page"] - s0["pages_hashed"] * s0["hash_ns_per_page"]
    du = s1["updates_published"] - s0["updates_published"]
    dms = s1["publish_ms"] - s0["publish_ms"]
    secs = t1 - t0
    written = (n1 - n0) * churn / secs
    print(f"  window {secs:.1f} s: {s1['rounds'] - s0['rounds']} rounds, {dp} pages hashed ({dp / secs:,.0f}/s; the "
          f"guest rewrote {written:,.0f} pages/s by its churn passes), {du} updates published in {dms} ms",
          flush=True)
    if dp <= 0 or dns <= 0:
        raise BenchError(f"no hashing in the churn window: {s0} -> {s1}")
    pps = 1e9 * dp / dns
    figure("pages hashed per second, one core, guest churning", f"{pps:,.0f} pages/s ({pps * 4096 / 2**30:.2f} GiB/s)",
           f"{pps_full:,.0f} pages/s over the whole run above", pps / pps_full if pps_full else None)
    ups = du / (dms / 1000) if dms > 0 else None
    figure("directory updates published per second, guest churning",
           f"{ups:,.0f} updates/s" if ups else f"n/a ({du} updates in {dms} ms)",
           f"{ups_full:,.0f} updates/s above" if ups_full else None,
           ups / ups_full if ups and ups_full else None)
    summary.append(("monitor: pages hashed / s / core, churn", f"{pps:,.0f}", f"{pps_full:,.0f}",
                    pps / pps_full if pps_full else None, "ref: the run above"))
    summary.append(("monitor: updates published / s, churn", f"{ups:,.0f}" if ups else "n/a",
                    f"{ups_full:,.0f}" if ups_full else "n/a", ups / ups_full if ups and ups_full else None,
                    "ref: the run above"))


# ---------------------------------------------------------------------------------------- 2


def cpu_seconds(pid):
    """Run time so far of all the live threads of a process."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def emu_run(a, workload, n, with_concord, run_id):
    """(wall and CPU seconds from "emubench: start" to the exit, the guest's result)."""
    d = f"unix:{os.path.join(a.dirdir, f'emu-{run_id}.sock')}" if with_concord else None
    boot = f'<boot kernel="{a.emubench}" cmdline="bench={workload} n={n}"/>'
    cfg = write(os.path.join(a.workdir, "emu.xml"), vm_config(128, DEVICES_PC, boot, d, interval_ms=a.interval_ms))
    cmd = [a.v3, "--log-level", "error", "run", cfg]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         preexec_fn=die_with_parent)
    watchdog = threading.Timer(a.step_timeout, p.kill)
    watchdog.start()
    try:
        head = []
        t0 = c0 = None
        for line in p.stdout:
            head.append(line)
            if b"emubench: start" in line:
                t0 = time.perf_counter()
                c0 = cpu_seconds(p.pid)
                break
        rest = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        t = time.perf_counter() - (t0 or 0)
    finally:
        watchdog.cancel()
    out = (b"".join(head) + rest).decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if t0 is None or code != 1:
        raise BenchError(f"{' '.join(cmd)} ({workload} n={n}, concord {'on' if with_concord else 'off'}) exited "
                         f"{code}, expected 1:\n{out[-1500:]}")
    m = re.search(r"emubench: result (\S+)", out)
    return t, ru.ru_utime + ru.ru_stime - c0, (m.group(1) if m else "?")


def bench_guest_cost(a, summary):
    print(f"\n== 2. cost to a running guest: emubench with and without the concord extension (interval "
          f"{a.interval_ms} ms), 0 and N iterations, median of {a.reps}", flush=True)
    run_id = 0
    for w, (n, what) in EMU_WORKLOADS.items():
        times = {(v, k): [] for v in (False, True) for k in (0, n)}
        cpus = {(v, k): [] for v in (False, True) for k in (0, n)}
        results = set()
        for rep in range(a.reps):
            # Each variant's run right after the other's (the host's speed drifts), first one,
            # then the other, rep by rep.
            order = (False, True) if rep % 2 == 0 else (True, False)
            for k in (0, n):
                for v in order:
                    run_id += 1
                    t, c, res = emu_run(a, w, k, v, run_id)
                    times[v, k].append(t)
                    cpus[v, k].append(c)
                    if k == n:
                        results.add(res)
        if len(results) != 1:
            raise BenchError(f"emubench {w}: the guest's result differs with and without ConCORD: {results}")
        med = {key: statistics.median(v) for key, v in times.items()}
        cmed = {key: statistics.median(v) for key, v in cpus.items()}
        off = med[False, n] - med[False, 0]
        on = med[True, n] - med[True, 0]
        coff = cmed[False, n] - cmed[False, 0]
        con = cmed[True, n] - cmed[True, 0]
        if off <= 0:
            raise BenchError(f"emubench {w}: N run not slower than the 0 run ({med})")
        slow = on / off
        met = slow <= SLOWDOWN_TARGET
        # The fastest runs beside it: the host's noise only adds time.
        fast = (min(times[True, n]) - min(times[True, 0])) / (min(times[False, n]) - min(times[False, 0]))
        paired = statistics.median((tn - t0) / (fn - f0) for tn, t0, fn, f0 in
                                   zip(times[True, n], times[True, 0], times[False, n], times[False, 0]))
        spread = {v: (max(times[v, n]) - min(times[v, n])) / statistics.median(times[v, n]) * 100
                  for v in (False, True)}
        print(f"  {w} (N={n}, {what}): 0-iteration runs {med[False, 0]:.3f} s without, {med[True, 0]:.3f} s "
              f"with; spread of the N runs {spread[False]:.0f}% without / {spread[True]:.0f}% with; median of the "
              f"reps' own ratios {paired:.3f}, fastest runs' ratio {fast:.3f}")
        figure(f"emubench {w}, with ConCORD", f"{on:.3f} s", f"{off:.3f} s without", slow,
               f"target <= {SLOWDOWN_TARGET}: target {'met' if met else 'MISSED'}")
        figure(f"emubench {w}, CPU time of the VMM process with ConCORD", f"{con:.3f} s",
               f"{coff:.3f} s without", con / coff if coff > 0 else None, "(every thread, the monitor's too)")
        summary.append((f"guest slowdown, emubench {w}", f"{on:.3f} s", f"{off:.3f} s", slow,
                        f"<= {SLOWDOWN_TARGET}: {'target met' if met else 'target MISSED'}"))
        summary.append((f"VMM CPU time, emubench {w}", f"{con:.3f} s", f"{coff:.3f} s",
                        con / coff if coff > 0 else None, ""))


# ---------------------------------------------------------------------------------------- 3


def small_vms(a, names, directory, prefixes=None, hosts=None):
    vms = []
    try:
        for i, name in enumerate(names):
            boot = (f'<boot kernel="{a.concord_elf}" cmdline="id={i} mib=4 shared=256 private=128 '
                    f'dups=32"/>')
            host = hosts[i] if hosts else "h1"
            pre = prefixes[i] if prefixes else ()
            vms.append(Vm(a, name, vm_config(32, DEVICES_SMALL, boot, directory, host, a.interval_ms), pre))
        for vm in vms:
            vm.wait_socket()
            vm.con.wait_for(b"concord ready", 0, a.step_timeout, f"{vm.name}: concord ready")
        for vm in vms:
            vm.settle()
    except BaseException:
        stop_all(vms)
        raise
    return vms


def pin(pid, cpus):
    """Every thread of process `pid` and of its children onto `cpus` (threads started later
    inherit it)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = f.read().split()
        except OSError:
            kids = []
        for k in kids:
            pin(int(k), cpus)


def placements(a):
    """Where the servers (the VMs, the directory) and the query client run: (name, servers'
    CPUs, client's CPUs). All on one core, and the client on a core of its own (every message
    then wakes a thread on the other core). Unpinned, the run-to-run spread on a virtual
    machine is as large as the difference between the two."""
    cpus = sorted(os.sched_getaffinity(0))
    out = [("one core", {cpus[0]}, {cpus[0]})]
    if len(cpus) > 1:
        out.append(("client on another core", {cpus[0]}, {cpus[1]}))
    return out


def query_latency(a, vms, directory, servers):
    """{placement: (copies latency, sharing latency)} and the sharing answer; `servers`: the
    pids of the processes serving the directory (besides the VMs)."""
    h = vms[0].call("GET", f"/vm/concord/page?gpa={REGION:#x}")["hash"]
    names = [vm.name for vm in vms]
    res = {}
    s = None
    for where, scpu, ccpu in placements(a):
        for pid in [vm.con.p.pid for vm in vms] + servers:
            pin(pid, scpu)
        c, _ = concord_cli(a, directory, "copies", h, "--repeat", str(a.copies_repeat), cpus=ccpu)
        if c.get("copies") != len(vms):
            raise BenchError(f"copies of the page at {REGION:#x}: {c.get('copies')}, expected {len(vms)}: {c}")
        s, _ = concord_cli(a, directory, "sharing", *names, "--repeat", str(a.sharing_repeat), cpus=ccpu)
        want_total = len(vms) * 32 * 256
        if s.get("total") != want_total or s.get("missing") or s.get("unreachable"):
            raise BenchError(f"sharing over {names}: total {s.get('total')} (expected {want_total}), missing "
                             f"{s.get('missing')}, unreachable {s.get('unreachable')}")
        # The regions: 256 shared contents, 4 x 128 private, 4 duplicated (the guests' own
        # kernel image, stack and tables add a few more).
        want_nz = 256 + len(vms) * 129
        if s.get("nonzero_distinct", 0) < want_nz or s.get("shared_contents", 0) < 256:
            raise BenchError(f"sharing: nonzero_distinct {s.get('nonzero_distinct')} (expected at least {want_nz}), "
                             f"shared_contents {s.get('shared_contents')} (expected at least 256)")
        res[where] = (c["latency_us"], s["latency_us"])
    return res, s


def lat(x):
    return f"{x['median']:.0f} µs (min {x['min']:.0f}, max {x['max']:.0f}, {x['runs']} runs)"


def bench_queries(a, summary):
    print(f"\n== 3. query latency: 4 concord.elf VMs (32 MiB, mib=4 shared=256 private=128 dups=32); copies x "
          f"{a.copies_repeat}, sharing over 4 VMs x {a.sharing_repeat}, median; VMs and directory pinned to one "
          f"core, the query client on the same core and on another", flush=True)
    d = f"unix:{os.path.join(a.dirdir, 'queries.sock')}"
    vms = small_vms(a, [f"vm{i}" for i in range(4)], d)
    try:
        emb, _ = query_latency(a, vms, d, [])
    finally:
        stop_all(vms)
    for where, (c, s) in emb.items():
        figure(f"copies, embedded directory, {where}", lat(c), note="the reference for Redis below")
        figure(f"sharing (4 VMs), embedded directory, {where}", lat(s), note="the reference for Redis below")
        summary.append((f"copies µs, embedded, {where}", f"{c['median']:.0f}", "-", None, ""))
        summary.append((f"sharing µs, embedded, {where}", f"{s['median']:.0f}", "-", None, ""))
    if a.no_redis:
        print("  Redis Cluster: SKIP (--no-redis)")
        summary.append(("copies / sharing latency, Redis", "SKIP", "", None, "--no-redis"))
        return
    rw = os.path.join(a.workdir, "redis")
    prefix = f"ccb{os.getpid() % 100000}"
    script = os.path.join(a.root, "scripts", "redis-cluster-ns.sh")
    env = dict(os.environ)
    env.setdefault("CONCORD_SUBNET", a.redis_subnet)
    # The wrapper tears the cluster down from this file if this script dies.
    write(os.path.join(a.workdir, "redis-prefix"), f"{prefix} {rw} {env['CONCORD_SUBNET']}\n")
    up = subprocess.run(["bash", script, "up", prefix, rw], capture_output=True, env=env, timeout=300)
    try:
        if up.returncode != 0:
            why = up.stderr.decode(errors="replace").strip().splitlines()
            why = why[-1] if why else f"exit status {up.returncode}"
            print(f"  Redis Cluster: SKIP (redis-cluster-ns.sh up exited {up.returncode}: {why})")
            summary.append(("copies / sharing latency, Redis", "SKIP", "", None, why))
            return
        nodes = up.stdout.decode().strip().splitlines()[-1].split()
        if len(nodes) != 3:
            raise BenchError(f"redis-cluster-ns.sh up: expected 3 nodes, got {nodes}")
        redis_pids = []
        for i in (1, 2, 3):
            with open(os.path.join(rw, f"n{i}", "redis.pid")) as f:
                redis_pids.append(int(f.read().strip()))
        d = "redis://" + ",".join(nodes)
        print(f"  Redis Cluster {d}, namespaces {prefix}1..3 (VMs r0, r3 in {prefix}1, r1 in {prefix}2, r2 in "
              f"{prefix}3; the queries from the root namespace)", flush=True)
        ns = [1, 2, 3, 1]
        vms = small_vms(a, [f"r{i}" for i in range(4)], d,
                        prefixes=[("ip", "netns", "exec", f"{prefix}{k}") for k in ns],
                        hosts=[f"host{k}" for k in ns])
        try:
            red, s = query_latency(a, vms, d, redis_pids)
        finally:
            stop_all(vms)
        if s.get("intra_host", 0) <= 0 or s.get("inter_host", 0) <= 0:
            raise BenchError(f"sharing across the namespaces: intra_host {s.get('intra_host')}, inter_host "
                             f"{s.get('inter_host')}")
        for where, (c, s) in red.items():
            ce, se = emb[where]
            rc, rs = c["median"] / ce["median"], s["median"] / se["median"]
            figure(f"copies, Redis Cluster, {where}", lat(c), f"{ce['median']:.0f} µs embedded", rc)
            figure(f"sharing (4 VMs), Redis Cluster, {where}", lat(s), f"{se['median']:.0f} µs embedded", rs)
            summary.append((f"copies µs, Redis, {where}", f"{c['median']:.0f}", f"{ce['median']:.0f}", rc,
                            "ref: embedded"))
            summary.append((f"sharing µs, Redis, {where}", f"{s['median']:.0f}", f"{se['median']:.0f}", rs,
                            "ref: embedded"))
    finally:
        subprocess.run(["bash", script, "down", prefix, rw], capture_output=True, env=env, timeout=120)
        os.unlink(os.path.join(a.workdir, "redis-prefix"))


# ---------------------------------------------------------------------------------------- 4


def bench_linux(a, summary):
    print(f"\n== 4. collective checkpoint: 4 Linux guests (128 MiB each, one kernel and initramfs) with "
          f"ConCORD (interval {a.interval_ms} ms)", flush=True)
    d = f"unix:{os.path.join(a.dirdir, 'linux.sock')}"
    boot = f'<boot format="linux" kernel="{a.kernel}" initrd="{a.initrd}" cmdline="{LINUX_CMDLINE}"/>'
    names = [f"l{i}" for i in range(4)]
    t0 = time.monotonic()
    vms = []
    try:
        for n in names:
            vms.append(Vm(a, n, vm_config(128, DEVICES_LINUX, boot, d, interval_ms=a.interval_ms)))
        for vm in vms:
            r = vm.con.wait_for(b"PALACIOS-LINUX-READY", 0, a.boot_timeout, f"{vm.name}: PALACIOS-LINUX-READY")
            vm.con.wait_for(b"# ", r, 120, f"{vm.name}: the shell prompt")
        t_boot = time.monotonic() - t0
        for vm in vms:
            vm.wait_socket()
            vm.settle(idle=False)  # a running kernel keeps changing a few pages
        q, _ = concord_cli(a, d, "sharing", *names)
        if q.get("missing") or q.get("unreachable") or not q.get("nonzero_total"):
            raise BenchError(f"sharing over {names}: {q}")
        shared = (q["nonzero_total"] - q["nonzero_distinct"]) / q["nonzero_total"]
        print(f"  booted all four in {t_boot:.0f} s; sharing: total {q['total']} pages, zero {q['zero_pages']}, "
              f"nonzero {q['nonzero_total']}, nonzero distinct {q['nonzero_distinct']}, shared fraction "
              f"{shared:.3f}", flush=True)
        ind_t, ind_b = [], []
        for vm in vms:
            p = os.path.join(a.workdir, f"{vm.name}.ckpt")
            t1 = time.monotonic()
            vm.call("PUT", "/snapshot/create", {"path": p, "stop": False})
            ind_t.append(time.monotonic() - t1)
            ind_b.append(allocated(p))
        print("  individual checkpoints: " + ", ".join(
            f"{vm.name} {t * 1000:.0f} ms {b / 2**20:.1f} MiB" for vm, t, b in zip(vms, ind_t, ind_b)), flush=True)
        store = os.path.join(a.workdir, "store")
        rep, wall = concord_cli(a, d, "checkpoint", "--store", store, "--stop", *names)
        for vm in vms:
            if vm.con.wait_exit(60) is None:
                raise BenchError(f"{vm.name} still runs 60 s after the collective checkpoint with --stop")
    finally:
        stop_all(vms)
    coll_b = rep["store_bytes"]
    if allocated(store) < coll_b * 0.99:
        raise BenchError(f"the store holds {allocated(store)} B, the report says {coll_b}")
    missed = sum((v.get("collective") or {}).get("missed", 0) for v in rep["vms"])
    print(f"  collective checkpoint: total_ms {rep['total_ms']} (collective phase {rep['collective_ms']}, local "
          f"phase {rep['local_ms']}), CLI wall {wall * 1000:.0f} ms; stored_pages {rep['stored_pages']}, "
          f"directory_distinct {rep['directory_distinct']}, nonzero_guest_pages {rep['nonzero_guest_pages']}, "
          f"missed by the collective phase {missed}", flush=True)
    sum_t, sum_b = sum(ind_t), sum(ind_b)
    coll_t = rep["total_ms"] / 1000
    saved = 1 - coll_b / sum_b
    met = saved >= SAVED_SHARE_TARGET * shared
    figure("collective checkpoint time (4 VMs)", f"{coll_t * 1000:.0f} ms",
           f"{sum_t * 1000:.0f} ms for 4 individual checkpoints", coll_t / sum_t)
    figure("collective checkpoint size (4 VMs)", f"{coll_b / 2**20:.1f} MiB",
           f"{sum_b / 2**20:.1f} MiB for 4 individual checkpoints", coll_b / sum_b)
    figure("space saved by the collective checkpoint", f"{saved:.3f}", f"shared fraction {shared:.3f}",
           saved / shared if shared else None,
           f"target >= {SAVED_SHARE_TARGET}: target {'met' if met else 'MISSED'}")
    summary.append(("collective checkpoint time (ms)", f"{coll_t * 1000:.0f}", f"{sum_t * 1000:.0f}",
                    coll_t / sum_t, "4 individual"))
    summary.append(("collective checkpoint size (MiB)", f"{coll_b / 2**20:.1f}", f"{sum_b / 2**20:.1f}",
                    coll_b / sum_b, "4 individual"))
    summary.append(("space saved / shared fraction", f"{saved:.3f}", f"{shared:.3f}",
                    saved / shared if shared else None,
                    f">= {SAVED_SHARE_TARGET}: {'target met' if met else 'target MISSED'}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v3", required=True)
    ap.add_argument("--concord-elf", required=True, help="guests/build/concord.elf")
    ap.add_argument("--emubench", required=True, help="guests/build/emubench.elf")
    ap.add_argument("--kernel", help="the Linux guest's bzImage")
    ap.add_argument("--initrd", help="the Linux guest's initramfs.cpio.gz")
    ap.add_argument("--workdir", required=True, help="configs, sockets, console logs, checkpoints")
    ap.add_argument("--reps", type=int, default=3, help="runs of each emubench variant (median)")
    ap.add_argument("--no-linux", action="store_true", help="skip the collective checkpoint of Linux guests")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis Cluster queries")
    ap.add_argument("--only", default="1,2,3,4", help="comma-separated benchmark numbers (default: all)")
    ap.add_argument("--interval-ms", type=int, default=100, help="ConCORD tracking interval")
    ap.add_argument("--big-cmdline", default="mib=512 shared=32768 private=16384 dups=1024",
                    help="concord.elf layout of the 1 GiB VM (benchmark 1)")
    ap.add_argument("--churn-secs", type=float, default=4.0, help="least counter window of the churning guest (whole passes)")
    ap.add_argument("--copies-repeat", type=int, default=200)
    ap.add_argument("--sharing-repeat", type=int, default=50)
    ap.add_argument("--redis-subnet", default="10.233.0",
                    help="CONCORD_SUBNET for the Redis namespaces when the environment sets none")
    ap.add_argument("--boot-timeout", type=float, default=900, help="seconds for 4 Linux guests to boot")
    ap.add_argument("--step-timeout", type=float, default=600)
    a = ap.parse_args()
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    if a.no_linux:
        only.discard("4")
    if a.reps < 1 or min(a.copies_repeat, a.sharing_repeat) < 2 or not only <= {"1", "2", "3", "4"}:
        sys.exit("concord: --reps must be at least 1, the repeats at least 2, --only from 1,2,3,4")
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, lambda sig, _: sys.exit(128 + sig))
    socket.setdefaulttimeout(120)
    a.root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    need = [a.v3, a.concord_elf, a.emubench] + ([a.kernel, a.initrd] if "4" in only else [])
    for f in need:
        if not f or not os.path.exists(f):
            sys.exit(f"concord: {f or 'the Linux guest (--kernel/--initrd)'} is missing")
    a.v3 = os.path.abspath(a.v3)
    a.concord_elf, a.emubench = os.path.abspath(a.concord_elf), os.path.abspath(a.emubench)
    if "4" in only:
        a.kernel, a.initrd = os.path.abspath(a.kernel), os.path.abspath(a.initrd)
    a.workdir = os.path.abspath(a.workdir)
    a.dirdir = os.path.join(a.workdir, "dir")  # directory sockets (not VM API sockets)
    os.makedirs(a.dirdir, exist_ok=True)
    print(f"ConCORD benchmarks, emulator backend ({a.v3}); benchmarks {','.join(sorted(only))}", flush=True)
    summary = []
    t_all = time.monotonic()
    try:
        if "1" in only:
            bench_monitor(a, summary)
        if "2" in only:
            bench_guest_cost(a, summary)
        if "3" in only:
            bench_queries(a, summary)
        if "4" in only:
            bench_linux(a, summary)
    except (BenchError, subprocess.TimeoutExpired, OSError, KeyError) as e:
        kind = "" if isinstance(e, BenchError) else f"{type(e).__name__}: "
        print(f"concord: {kind}{e}\n(console logs in {a.workdir})", file=sys.stderr)
        sys.exit(1)
    print(f"\nsummary ({time.monotonic() - t_all:.0f} s in all; ratio = figure / reference, same run)")
    print(f"  {'figure':46}{'value':>12}{'reference':>12}{'ratio':>8}  note")
    for name, v, ref, ratio, note in summary:
        print(f"  {name:46}{v:>12}{ref:>12}{fmt_ratio(ratio) if ratio is not None else '':>8}  {note}")
    if a.no_linux:
        print("  (collective checkpoint of Linux guests: skipped, --no-linux)")
    for n in NOTES:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
