#!/usr/bin/env python3
"""GEARS system-call interception and guarded-module border crossings on the Linux guest
(Debian's stock kernel, busybox initramfs plus the GEARS overlay), emulator backend.

One boot per rep, with syscall_intercept and guard_mods (port 0x5100, budget 60 s); the
console is v3's stdin/stdout, the rules and settings go through its control API. After
`insmod gears.ko` (the task layout, which pid and name rules need), the guarded module's
manifest is registered and guarded.ko loaded. Then --rounds rounds, each variant once per
round and the order reversed every other round (so drift within a boot hits all alike):

* syscalls: `gears-sysloop N` (N getppid(), ns per call by the guest's CLOCK_MONOTONIC)
  - no rule: the baseline;
  - a pid rule on getppid for pid 1 (another process): the emulator compares the address
    space, so these calls should not stop at all; target: slowdown <= 1.02 of the baseline;
  - a name rule on getppid for gears-sysloop: every call stops in the VMM; the rule must
    have counted exactly the calls made. Cost of one interception = this - baseline.
* guarded module: `echo bench N > /proc/guarded; cat /proc/guarded_bench` -> guest TSC
  cycles per wrapped no-op call (two border crossings: ENTER and EXIT, with the VMM's
  checks), per plain TEST hypercall through the same doorbell and per granted port read;
  with check_stack on and off (PUT /vm/gears/guard_mods). Cycles become ns by the kernel's
  TSC calibration (dmesg "tsc: Refined TSC clocksource calibration", else "Detected").
  The guest divides its loops' totals by N whatever they ran, so the VMM's counters
  (crossings, granted port reads) are read around each bench: crossings and port reads are
  per operation counted, and the guest's hypercall figure is used only when every loop ran
  exactly N times. Otherwise the plain-hypercall reference is the doorbell TEST hypercall of
  guests/symtest's bench (a bare guest on the same v3 and backend, also run every rep), and
  the table marks it with '*'.

A boot's figure is the mean of its rounds (its slowdown: the median over its rounds of the
pid-1-rule time over the no-rule time measured next to it); every figure printed is the median over --reps boots, every ratio is to a
reference measured in the same run. The run fails (status 1) on errors, not on a missed target.
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
import time

from console import BenchError, Console, die_with_parent
from vmm_control import api, wait_path

CONFIG = """<vm class="PC"><memory>256</memory><backend>emu</backend>
  <extensions><extension name="syscall_intercept"/><extension name="guard_mods" port="0x5100" budget_ms="60000"/></extensions>
  <devices><device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/><device class="LAPIC" id="lapic"/>
  <device class="IOAPIC" id="ioapic"/><device class="NVRAM" id="nvram"/><device class="KEYBOARD" id="keyboard"/>
  <device class="PM_TIMER" id="pm_timer"/><device class="ACPI" id="acpi"/><device class="SERIAL" id="serial"/></devices>
  <boot format="linux" kernel="{kernel}" initrd="{initrd}" cmdline="console=ttyS0 nokaslr cryptomgr.notests"/></vm>
"""
OTHER_TARGET = 1.02


class Guest:
    """Shell commands on the console between start and end markers."""

    def __init__(self, con, at):
        self.con, self.at, self.n = con, at, 0

    def cmd(self, line, timeout=60, check=True):
        """Run `line`: (its output, host seconds between the markers, exit status)."""
        self.n += 1
        tag = f"{self.n:03d}"
        # Quotes split the markers, so the console's echo of the typed line does not match.
        self.con.send(f'echo "@@B""{tag}"; {line}; echo "@@E""{tag}" rc=$?')
        b = self.con.wait_for(f"@@B{tag}".encode(), self.at, 60, f"start of `{line}`")
        tb = time.monotonic()
        e = self.con.wait_for(re.compile(rb"@@E" + tag.encode() + rb" rc=\d+"), b, timeout, f"end of `{line}`")
        secs = time.monotonic() - tb
        out = self.con.buf[b:e].decode(errors="replace")
        self.at = e
        rc = int(out.rsplit("rc=", 1)[1])
        body = out[:out.rfind("@@E")]
        if check and rc != 0:
            raise BenchError(f"`{line}` failed in the guest (status {rc}):\n{body[-800:]}")
        return body, secs, rc


def call(sock, method, path, body=None):
    st, v = api(sock, method, path, body)
    if st != 200:
        raise BenchError(f"{method} {path} {json.dumps(body) if body is not None else ''}: {st} {v}")
    return v


def sysloop(g, n, timeout):
    out, secs, _ = g.cmd(f"gears-sysloop {n}", timeout)
    m = re.search(r"sysloop: n=(\d+) ns_per_call=(\d+)", out)
    if not m or int(m[1]) != n:
        raise BenchError(f"gears-sysloop {n}: no result line: {out[-400:]!r}")
    return int(m[2]), secs


def intercept_state(sock, rid):
    v = call(sock, "GET", "/vm/gears/syscall_intercept")
    r = next((r for r in v["rules"] if r["id"] == rid), None) if rid is not None else None
    return (r["calls"] if r else None), v["unmatched"]


def syscall_variant(g, sock, kind, a):
    """ns per getppid() under rule `kind` (none / other / hit); VMM stops counted for other."""
    body = {"none": None,
            "other": {"syscalls": ["getppid"], "pid": 1},
            "hit": {"syscalls": ["getppid"], "name": "gears-sysloop"}}[kind]
    n = a.n_hit if kind == "hit" else a.n_loop
    rid = call(sock, "POST", "/vm/gears/syscall_intercept", body)["id"] if body else None
    try:
        _, unmatched0 = intercept_state(sock, rid)
        ns, secs = sysloop(g, n, a.step_timeout)
        calls, unmatched1 = intercept_state(sock, rid)
    finally:
        if rid is not None:
            call(sock, "DELETE", f"/vm/gears/syscall_intercept/{rid}")
    if kind == "hit" and calls != n:
        raise BenchError(f"the name rule on gears-sysloop counted {calls} calls, not the {n} made")
    stops = (calls or 0) + (unmatched1 - unmatched0)
    return ns, secs, stops


def guard_counters(sock):
    return call(sock, "GET", "/vm/gears/guard_mods")["counters"]


def guard_variant(g, sock, check_stack, a):
    """One `bench N` with check_stack set: the guest's cycles per op, and how many crossings
    and granted port reads the VMM counted while it ran (the guest divides by N whatever its
    loops did, so the totals are rebuilt from its figures and divided by what was counted)."""
    call(sock, "PUT", "/vm/gears/guard_mods", {"check_stack": check_stack})
    c0 = guard_counters(sock)
    g.cmd(f"echo 'bench {a.n_bench}' > /proc/guarded", a.step_timeout)
    c1 = guard_counters(sock)
    out, _, _ = g.cmd("cat /proc/guarded_bench", 60)
    m = re.search(r"^crossing=(\d+) hcall=(\d+) port=(\d+)", out, re.M)
    if not m or int(m[1]) == 0:
        raise BenchError(f"bench {a.n_bench}: no figures from /proc/guarded_bench: {out[-400:]!r}")
    d = {k: c1[k] - c0[k] for k in c1}
    if d["entries"] != d["exits"] or d["refused_crossings"] or d["refused_accesses"] or d["revoked"]:
        raise BenchError(f"bench {a.n_bench} (check_stack {check_stack}): the VMM counted {d}")
    crossings = d["entries"] - 1  # the write to /proc/guarded crosses too
    if crossings < 1:
        raise BenchError(f"bench {a.n_bench}: the VMM counted no crossings of gm_nop: {d}")
    return {"pair_total": int(m[1]) * a.n_bench, "hcall": int(m[2]), "port_total": int(m[3]) * a.n_bench,
            "crossings": crossings, "ports": d["granted_accesses"]}


def symtest_hcall(a):
    """ns per doorbell TEST hypercall of guests/symtest's bench (a bare guest, same v3 and
    backend): the reference when the Linux guest's own hypercall figure cannot be used."""
    cmd = [a.v3, "--log-level", "error", "run", "--backend", "emu", "--kernel", a.symtest,
           "--cmdline", f"test=bench bench={a.n_symtest}"]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=a.step_timeout, preexec_fn=die_with_parent)
    out = p.stdout.decode(errors="replace")
    m = re.search(r"^bench: hcall-doorbell \d+ cycles (\d+) ns", out, re.M)
    if p.returncode != 3 or not m:
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode} without a hcall-doorbell line:\n{out[-600:]}")
    return int(m[1])


def one_boot(a, rep):
    cfg = os.path.join(a.workdir, f"gears-{rep}.xml")
    sock = os.path.join(a.workdir, f"vm-{rep}.sock")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(kernel=a.kernel, initrd=a.initrd_all))
    t0 = time.monotonic()
    con = Console([a.v3, "--log-level", "error", "run", cfg, "--api-sock", sock],
                  os.path.join(a.workdir, f"console-{rep}.log"))
    try:
        ready = con.wait_for(b"PALACIOS-LINUX-READY", 0, a.boot_timeout, "PALACIOS-LINUX-READY")
        g = Guest(con, con.wait_for(b"# ", ready, 60, "the shell prompt"))
        boot = time.monotonic() - t0
        wait_path(sock)
        out, _, _ = g.cmd("insmod /lib/gears/gears.ko", 60)
        if "registered with the VMM (ret=0)" not in out:
            # The message may reach the console after the prompt: look in the kernel log.
            out, _, _ = g.cmd("dmesg | grep 'registered with the VMM'", 30, check=False)
            if "(ret=0)" not in out:
                raise BenchError(f"gears.ko did not register with the VMM: {out[-400:]!r}")
        call(sock, "POST", "/vm/gears/guard_mods", {"manifest": a.manifest})
        g.cmd("insmod /lib/gears/guarded.ko", 60)
        g.cmd("dmesg -n 1", 30, check=False)  # keep kernel messages off the console from here
        sysloop(g, 1000, a.step_timeout)  # warm-up, not counted
        sc = {k: [] for k in ("none", "other", "hit")}
        stops_other = 0
        host = [0.0, 0.0]
        gd = {True: [], False: []}
        for rnd in range(a.rounds):
            # The two unselected variants in alternating order, next to each other; the
            # intercepted one (every call exits) after them, so that whatever it leaves behind
            # falls on both equally.
            pair = ["none", "other"] if rnd % 2 == 0 else ["other", "none"]
            for kind in pair + ["hit"]:
                ns, secs, stops = syscall_variant(g, sock, kind, a)
                sc[kind].append(ns)
                if kind == "other":
                    stops_other += stops
                if kind == "none":
                    host[0] += ns * a.n_loop / 1e9
                    host[1] += secs
            for cs in ((True, False) if rnd % 2 == 0 else (False, True)):
                gd[cs].append(guard_variant(g, sock, cs, a))
        call(sock, "PUT", "/vm/gears/guard_mods", {"check_stack": True})
        out, _, _ = g.cmd("dmesg | grep 'tsc:'; cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
                          30, check=False)
        mhz = [float(x) for x in re.findall(r"Refined TSC clocksource calibration: ([\d.]+) MHz", out)] or \
              [float(x) for x in re.findall(r"Detected ([\d.]+) MHz processor", out)]
        if not mhz:
            raise BenchError(f"no TSC frequency in the guest's kernel log: {out[-400:]!r}")
        clocksource = out.strip().splitlines()[-1].strip() if out.strip() else "?"
        con.send("poweroff -f")
        try:
            con.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    finally:
        con.close()
    ns_per_cyc = 1000.0 / mhz[-1]
    res = {"boot": boot, "mhz": mhz[-1], "clocksource": clocksource, "stops_other": stops_other,
           "clock_ratio": host[0] / host[1]}
    for k, v in sc.items():
        res[f"sc_{k}"] = statistics.fmean(v)
    res["slow_rounds"] = [o / n for o, n in zip(sc["other"], sc["none"])]
    # The median of the rounds' paired ratios: one slow round (a host hiccup) does not move it.
    res["slow"] = statistics.median(res["slow_rounds"])
    for cs, name in ((True, "on"), (False, "off")):
        res[f"pair_{name}"] = statistics.fmean(r["pair_total"] / r["crossings"] for r in gd[cs]) * ns_per_cyc
    every = gd[True] + gd[False]
    res["counts"] = [(r["crossings"], r["ports"]) for r in every]
    res["loops_ok"] = all(c == a.n_bench and p == a.n_bench for c, p in res["counts"])
    # The guest's per-op figures are whole cycles of its total over N: the total is known to
    # within N cycles, so a port figure rebuilt from few counted reads is kept only when that
    # is under 2 % of it.
    ports = sum(r["ports"] for r in every)
    port_total = sum(r["port_total"] for r in every)
    ok = ports and port_total and len(every) * a.n_bench / port_total < 0.02
    res["port"] = port_total / ports * ns_per_cyc if ok else None
    res["hcall"] = statistics.fmean(r["hcall"] for r in every) * ns_per_cyc if res["loops_ok"] else None
    res["hcall_sym"] = symtest_hcall(a)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v3", required=True)
    ap.add_argument("--kernel", required=True, help="the guest's bzImage")
    ap.add_argument("--initrd", required=True, help="the guest's initramfs.cpio.gz")
    ap.add_argument("--overlay", required=True, help="gears.cpio.gz (scripts/build-gears-guest.sh)")
    ap.add_argument("--manifest", required=True, help="guarded.manifest.json")
    ap.add_argument("--symtest", required=True, help="guests/build/symtest.elf (the bare-guest hypercall)")
    ap.add_argument("--workdir", required=True, help="configs, sockets, console logs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="rounds of all variants per boot")
    ap.add_argument("--n-loop", type=int, default=100000, help="getppid() calls per unselected run")
    ap.add_argument("--n-hit", type=int, default=20000, help="getppid() calls per intercepted run")
    ap.add_argument("--n-bench", type=int, default=20000, help="operations per guarded-module bench")
    ap.add_argument("--n-symtest", type=int, default=200000, help="hypercalls of the symtest bench")
    ap.add_argument("--boot-timeout", type=float, default=240)
    ap.add_argument("--step-timeout", type=float, default=300)
    a = ap.parse_args()
    if min(a.reps, a.rounds, a.n_loop, a.n_hit, a.n_bench, a.n_symtest) < 1:
        sys.exit("gears: --reps, --rounds and the counts must be at least 1")
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, lambda sig, _: sys.exit(128 + sig))
    socket.setdefaulttimeout(60)
    for f in (a.v3, a.kernel, a.initrd, a.overlay, a.manifest, a.symtest):
        if not os.path.exists(f):
            sys.exit(f"gears: {f} is missing")
    with open(a.manifest) as f:
        a.manifest = json.load(f)
    a.kernel = os.path.abspath(a.kernel)
    a.initrd_all = os.path.abspath(os.path.join(a.workdir, "initrd"))
    with open(a.initrd_all, "wb") as out:
        for part in (a.initrd, a.overlay):
            with open(part, "rb") as f:
                out.write(f.read())
    print(f"GEARS on the Linux guest, emulator backend: median of {a.reps} boot(s), {a.rounds} interleaved "
          f"round(s) per boot")
    print(f"  system calls: gears-sysloop {a.n_loop} with no rule and with a pid rule on getppid for pid 1; "
          f"gears-sysloop {a.n_hit} with a name rule on its own getppid (each call stops in the VMM)")
    print(f"  guarded module: bench {a.n_bench} with check_stack on and off; plain doorbell hypercall also "
          f"from guests/symtest (bench={a.n_symtest})", flush=True)
    runs = []
    t_all = time.monotonic()
    try:
        for rep in range(1, a.reps + 1):
            t = time.monotonic()
            r = one_boot(a, rep)
            runs.append(r)
            port = f"{r['port']:.0f}" if r["port"] is not None else "n/a"
            hcall = f"{r['hcall']:.0f}" if r["hcall"] is not None else "n/a"
            sr = r["slow_rounds"]
            print(f"  rep {rep}: {time.monotonic() - t:.0f} s (boot {r['boot']:.0f} s); TSC {r['mhz']:.3f} MHz, "
                  f"clocksource {r['clocksource']}, guest/host time {r['clock_ratio']:.3f}\n"
                  f"    getppid ns: {r['sc_none']:.0f} no rule, {r['sc_other']:.0f} pid-1 rule (slowdown "
                  f"{r['slow']:.3f}, rounds {min(sr):.3f}..{max(sr):.3f}), {r['sc_hit']:.0f} intercepted\n"
                  f"    crossing pair ns: {r['pair_on']:.0f} stack check on, {r['pair_off']:.0f} off; "
                  f"port read {port}; hypercall {hcall} (symtest {r['hcall_sym']})", flush=True)
            if r["stops_other"]:
                print(f"    note: the VMM stopped {r['stops_other']} getppid call(s) during the pid-1 runs")
            if not r["loops_ok"]:
                print(f"    note: (crossings, granted port reads) the VMM counted per bench {a.n_bench}: "
                      f"{', '.join(f'({c}, {p})' for c, p in r['counts'])}")
    except BenchError as e:
        print(f"gears: {e}\n(console logs in {a.workdir})", file=sys.stderr)
        sys.exit(1)
    med = lambda k: statistics.median(r[k] for r in runs)
    base, other, hit, slow = med("sc_none"), med("sc_other"), med("sc_hit"), med("slow")
    cost = hit - base
    pair_on, pair_off = med("pair_on"), med("pair_off")
    linux_hc = all(r["hcall"] is not None for r in runs)
    ports = [r["port"] for r in runs if r["port"] is not None]
    port = statistics.median(ports) if ports else None
    sym = med("hcall_sym")
    hc = med("hcall") if linux_hc else sym
    ref = "hypercall" if linux_hc else "hypercall*"
    rows = [
        ("getppid, no rule", base, "", None),
        ("getppid, pid rule on pid 1", other, "no rule", slow),
        ("getppid, intercepted (name rule)", hit, "no rule", hit / base),
        ("  one interception (extra)", cost, ref, cost / hc),
        ("crossing pair, stack check on", pair_on, ref, pair_on / hc),
        ("  one crossing, stack check on", pair_on / 2, ref, pair_on / 2 / hc),
        ("crossing pair, stack check off", pair_off, ref, pair_off / hc),
        ("  one crossing, stack check off", pair_off / 2, ref, pair_off / 2 / hc),
        ("crossing pair, check on / off", pair_on, "check off", pair_on / pair_off),
        ("granted port read (guarded.ko)", port, ref, port / hc if port is not None else None),
        ("plain hypercall (guarded.ko)", med("hcall") if linux_hc else None, "", None),
        ("plain hypercall (symtest, bare)", sym, "", None),
    ]
    print(f"\n{'figure':36}{'ns':>10}  {'reference':12}{'ratio':>9}")
    for name, v, rname, ratio in rows:
        val = f"{v:10.0f}" if v is not None else f"{'n/a':>10}"
        print(f"{name:36}{val}  {rname if v is not None else '':12}"
              f"{f'{ratio:9.3f}' if ratio is not None else ''}")
    print(f"\nother-process interception slowdown: {slow:.3f} (target <= {OTHER_TARGET}): "
          f"{'met' if slow <= OTHER_TARGET else 'NOT met'}")
    print(f"one intercepted syscall: {cost / 1000:.2f} µs = {cost / hc:.1f} plain hypercalls ({hc:.0f} ns each"
          f"{', symtest' if not linux_hc else ''})")
    print(f"one border crossing: {pair_on / 2:.0f} ns = {pair_on / 2 / hc:.1f} plain hypercalls with the stack "
          f"check, {pair_off / 2:.0f} ns = {pair_off / 2 / hc:.1f} without")
    if not linux_hc:
        bad = [c for r in runs if not r["loops_ok"] for c in r["counts"]]
        print(f"* guarded.ko's bench loops did not run {a.n_bench} times each (the VMM counted "
              f"{min(c for c, _ in bad)}..{max(c for c, _ in bad)} crossings and "
              f"{min(p for _, p in bad)}..{max(p for _, p in bad)} port reads per bench), so its hypercall "
              f"figure is unusable: the reference hypercall is symtest's doorbell TEST on the same v3 and backend; "
              f"crossings and port reads are per operation the VMM counted")
    print(f"(guest TSC {med('mhz'):.3f} MHz by the kernel's calibration; {time.monotonic() - t_all:.0f} s in all)")


if __name__ == "__main__":
    main()
