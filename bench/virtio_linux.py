#!/usr/bin/env python3
"""Linux guest virtio-blk and virtio-net throughput: v3 (emulator backend) beside QEMU TCG.

Both VMMs boot the same bzImage + initramfs with the same command line and 256 MiB of RAM,
with a virtio-blk disk on a fresh 300 MiB sparse raw image in /dev/shm and a virtio-net NIC
on a TAP in a network namespace of its own (made and removed per boot). In one boot each:

* blk write: `dd if=/dev/zero of=/dev/vda bs=1M count=256 oflag=direct`
* blk read:  `dd if=/dev/vda of=/dev/null bs=1M count=256 iflag=direct`
  timed in the guest by its monotonic clock in ns (/proc/timer_list's "now at", read by
  the shell's builtin `read`; the guest's busybox dd prints no rate line, its `date` has
  no %N and `time` only 10 ms resolution).
* net guest->host: busybox `httpd` in the guest serves a 64 MiB file from its RAM-backed
  root file system; a python3 client in the namespace GETs it, timed on the host from
  sending the request to the last byte of the body.
* net host->guest: busybox `wget -O /dev/null` in the guest GETs 64 MiB from a minimal python3
  HTTP server in the namespace, timed on the host from the request's arrival to the guest's
  close after the last byte.
(busybox `nc` is not used: it copies through a small buffer with a select() per chunk, and
`wc -c` reads a byte at a time, so both VMMs measured the guest's busybox, not virtio-net.)

The guest clock's time of a step and the host's time between its console markers are shown
beside it in the per-run lines where there is one (not for guest->host, which the host
drives), to catch a guest clock that does not keep real time.

Disk cache mode: v3's FILEDISK does pread/pwrite on the image (the host page cache) and
fdatasync on a flush, so QEMU gets cache=writeback (page cache, flush -> fdatasync), the
same; the image sits in /dev/shm for both. QEMU's TAP has vhost=off (v3 has no vhost).
Figures are medians of --reps boots each, v3 and QEMU interleaved; ratios are v3 / QEMU
throughput (higher is better, >= 1.0 meets the target).
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MIB = 1 << 20
HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
MAC = "52:54:00:12:34:56"
TAP = "v3bt0"

V3_CONFIG = """<vm class="PC">
  <memory>{mem}</memory>
  <cores count="1"><core/></cores>
  <backend>emu</backend>
  <files>
    <file id="kernel" filename="{kernel}"/>
    <file id="initrd" filename="{initrd}"/>
  </files>
  <devices>
    <device class="8259A" id="pic"/>
    <device class="8254_PIT" id="pit"/>
    <device class="LAPIC" id="lapic"/>
    <device class="IOAPIC" id="ioapic"/>
    <device class="NVRAM" id="nvram"><start_time>now</start_time></device>
    <device class="KEYBOARD" id="keyboard" on_reset="stop"/>
    <device class="PM_TIMER" id="pm_timer"/>
    <device class="ACPI" id="acpi"/>
    <device class="SERIAL" id="serial"/>
    <device class="PCI" id="pci0"/>
    <device class="i440FX" id="northbridge"><bus>pci0</bus></device>
    <device class="PIIX3" id="southbridge"><bus>pci0</bus></device>
    <device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus></device>
    <device class="FILEDISK" id="d0" writable="1"><path>{disk}</path><frontend tag="blk0"/></device>
    <device class="LNX_VIRTIO_NIC" id="net0"><bus>pci0</bus><mac>{mac}</mac></device>
    <device class="TAP" id="t0" ifname="{tap}"><frontend tag="net0"/></device>
  </devices>
  <boot format="linux" kernel="kernel" initrd="initrd" cmdline="{cmdline}"/>
</vm>
"""


class BenchError(Exception):
    pass


def run(cmd, timeout=30, check=True):
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout} s: {' '.join(cmd)}")
    if check and r.returncode != 0:
        raise BenchError(f"failed ({r.returncode}): {' '.join(cmd)}: {r.stderr.strip()}")
    return r


class Netns:
    """A network namespace with lo up; deleted by close()."""

    def __init__(self, name):
        self.name = name
        run(["ip", "netns", "add", name])
        try:
            self.ip("link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    def exec_prefix(self):
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args):
        return run(self.exec_prefix() + ["ip", *args])

    def close(self):
        run(["ip", "netns", "del", self.name], check=False)


class Console:
    """A VMM whose stdin/stdout is the guest's serial console. Output is collected by a thread
    with the host's arrival time of every chunk."""

    def __init__(self, cmd, log_path):
        self.cmd = cmd
        self.log = open(log_path, "wb")
        self.buf = bytearray()
        self.stamps = []  # (end offset in buf, monotonic time the chunk arrived)
        self.cv = threading.Condition()
        self.eof = False
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.t = threading.Thread(target=self._reader, daemon=True)
        self.t.start()

    def _reader(self):
        fd = self.p.stdout.fileno()
        while True:
            try:
                c = os.read(fd, 65536)
            except OSError:
                c = b""
            now = time.monotonic()
            with self.cv:
                if not c:
                    self.eof = True
                    self.cv.notify_all()
                    return
                self.buf += c
                self.stamps.append((len(self.buf), now))
                self.log.write(c)
                self.log.flush()
                self.cv.notify_all()

    def tail(self, n=3000):
        with self.cv:
            return self.buf[-n:].decode(errors="replace")

    def wait_for(self, needle, start, timeout, what=None):
        """Offset just past the first `needle` (bytes or regex pattern) at or after `start`,
        and the host time the chunk holding its end arrived."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                if isinstance(needle, bytes):
                    i = self.buf.find(needle, start)
                    end = i + len(needle) if i >= 0 else -1
                else:
                    m = needle.search(self.buf, start)
                    end = m.end() if m else -1
                if end >= 0:
                    t = next(ts for off, ts in self.stamps if off >= end)
                    return end, t
                if self.eof:
                    raise BenchError(f"{self.cmd[0 if self.cmd[0] != 'ip' else 4]} exited while waiting for "
                                     f"{what or needle!r}; console tail:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"no {what or needle!r} within {timeout:.0f} s; console tail:\n{self.tail()}")
                self.cv.wait(min(left, 1.0))

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def kill(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.t.join(timeout=5)
        self.log.close()


class Guest:
    """Runs shell commands on the guest's console between markers."""

    def __init__(self, con):
        self.con = con
        self.at = 0
        self.n = 0

    def cmd(self, line, timeout):
        """Run `line`; its output, and the host's seconds between the start and end markers."""
        self.n += 1
        tag = f"{self.n:03d}"
        # The markers are split by quotes so that the console's echo of the typed line
        # does not match them.
        self.con.send(f'echo "@@B""{tag}"; {line}; echo "@@E""{tag}" rc=$?')
        b, tb = self.con.wait_for(f"@@B{tag}".encode(), self.at, 30, f"start of `{line}`")
        e, te = self.con.wait_for(re.compile(rb"@@E" + tag.encode() + rb" rc=\d+"), b, timeout, f"end of `{line}`")
        out = self.con.buf[b:e].decode(errors="replace")
        self.at = e
        rc = int(out.rsplit("rc=", 1)[1])
        body = out[:out.rfind("@@E")]
        return body, te - tb, rc


# A shell function in the guest: _l = the kernel's monotonic clock in ns, read from
# /proc/timer_list ("now at N nsecs") by the shell's own `read` (no fork, unlike date or
# sed: busybox date has no %N, busybox dd prints no rate and `time` has 10 ms resolution).
GUEST_CLOCK = ("tn() { { read _l; read _l; read _l; } </proc/timer_list; "
               "_l=${_l#now at }; _l=${_l% nsecs}; }")


def timed(line):
    """`line` timed by the guest's clock: prints `@@NS <ns> rc=<status>`."""
    return f'tn; _a=$_l; {line}; _r=$?; tn; echo "@@NS $((_l-_a)) rc=$_r"'


def guest_secs(out, what):
    m = re.search(r"@@NS (\d+) rc=(\d+)", out)
    if not m:
        raise BenchError(f"{what}: no @@NS timing in the guest's output: {out[-800:]!r}")
    if m.group(2) != "0":
        raise BenchError(f"{what}: failed in the guest (status {m.group(2)}): {out[-800:]!r}")
    return int(m.group(1)) / 1e9


class Server(threading.Thread):
    """One HTTP/1.0 GET in the namespace (the caller opened the listening socket there): answers
    with `nbytes` of zeros, shuts its side down and waits for the client (the guest's wget) to
    close. `secs`: the request's arrival to the client's close, on the host's clock."""

    def __init__(self, sock, nbytes, timeout):
        super().__init__(daemon=True)
        self.sock, self.nbytes, self.timeout = sock, nbytes, timeout
        self.secs = None
        self.err = None

    def run(self):
        try:
            self.sock.settimeout(self.timeout)
            c, _ = self.sock.accept()
            c.settimeout(self.timeout)
            with c:
                req = b""
                while b"\r\n\r\n" not in req:
                    d = c.recv(4096)
                    if not d:
                        raise BenchError(f"the client closed before a whole request: {req!r}")
                    req += d
                t0 = time.monotonic()
                c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n" % self.nbytes)
                chunk = bytes(MIB)
                left = self.nbytes
                while left:
                    n = min(left, len(chunk))
                    c.sendall(chunk[:n])
                    left -= n
                c.shutdown(socket.SHUT_WR)
                while c.recv(65536):
                    pass
                self.secs = time.monotonic() - t0
        except Exception as e:  # reported by the caller
            self.err = e
        finally:
            self.sock.close()


def fetch_in_netns(ns, url_host, port, path, timeout):
    """GET http://url_host:port/path from inside the namespace (busybox httpd in the guest):
    (body bytes, seconds from sending the request to the end of the body)."""
    s = in_netns(ns, lambda: socket.create_connection((url_host, port), timeout=timeout))
    with s:
        s.settimeout(timeout)
        t0 = time.monotonic()
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {url_host}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            d = s.recv(65536)
            if not d:
                raise BenchError(f"the guest's httpd closed before a whole response header: {head[:500]!r}")
            head += d
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status + b" ":
            raise BenchError(f"the guest's httpd answered {status!r}")
        body = len(head) - (head.index(b"\r\n\r\n") + 4)
        buf = bytearray(MIB)
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            body += n
        return body, time.monotonic() - t0


def in_netns(ns, fn):
    """fn() run with this thread in the namespace (sockets made there stay there), then back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            setns = lambda fd: os.setns(fd, os.CLONE_NEWNET)
        else:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)

            def setns(fd):
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns")
        setns(target)
        try:
            return fn()
        finally:
            setns(own)
    finally:
        os.close(own)
        os.close(target)


def listen_in_netns(ns, port):
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST_IP, port))
        s.listen(1)
        return s
    return in_netns(ns, make)


def one_boot(a, vmm, rep, tmp):
    """Boot `vmm` ("v3" or "qemu") once; returns {measure: (primary, guest-timed, host-timed
    between console markers or None)} with throughputs in MiB/s."""
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:  # fresh and sparse every boot
        f.truncate(a.disk_mib * MIB)
    ns = Netns(f"v3bench{os.getpid() % 100000}")
    con = None
    try:
        if vmm == "v3":
            cfg = os.path.join(tmp, "linux-virtio-bench.xml")
            with open(cfg, "w") as f:
                f.write(V3_CONFIG.format(mem=a.mem, kernel=a.kernel, initrd=a.initrd, disk=disk, mac=MAC,
                                         tap=TAP, cmdline=a.cmdline))
            cmd = [a.v3, "--log-level", "warn", "run", cfg]
        else:
            cmd = ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", str(a.mem), "-nographic",
                   "-no-reboot", "-kernel", a.kernel, "-initrd", a.initrd, "-append", a.cmdline,
                   "-drive", f"file={disk},if=none,id=d0,format=raw,cache=writeback",
                   "-device", "virtio-blk-pci,drive=d0",
                   "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]
        con = Console(ns.exec_prefix() + cmd, os.path.join(a.logdir, f"{vmm}-{rep}.log"))
        ready, _ = con.wait_for(b"PALACIOS-LINUX-READY", 0, a.boot_timeout, "PALACIOS-LINUX-READY")
        g = Guest(con)
        g.at, _ = con.wait_for(b"# ", ready, 60, "the shell prompt")
        # The TAP exists once the VMM has built the VM: the host side's address.
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ns.ip("link", "set", TAP, "up")
        _, _, rc = g.cmd(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0", 30)
        if rc:
            raise BenchError(f"{vmm}: configuring the guest's eth0 failed")
        out, _, rc = g.cmd(f"ping -c 1 -W 2 {HOST_IP} >/dev/null || ping -c 3 -W 5 {HOST_IP}", 60)
        if rc:
            raise BenchError(f"{vmm}: the guest cannot ping the host over the TAP: {out}")
        out, _, rc = g.cmd(GUEST_CLOCK + "; tn; echo \"@@CLOCK $_l\"", 30)
        if rc or not re.search(r"@@CLOCK \d+", out):
            raise BenchError(f"{vmm}: the guest's /proc/timer_list clock does not read: {out!r}")
        res = {}
        count = a.blk_mib
        for name, line in (
                ("blk write", f"dd if=/dev/zero of=/dev/vda bs=1M count={count} oflag=direct"),
                ("blk read", f"dd if=/dev/vda of=/dev/null bs=1M count={count} iflag=direct")):
            out, host_s, _ = g.cmd(timed(line), a.step_timeout)
            gs = guest_secs(out, f"{vmm}: {name}")
            if f"{count}+0 records out" not in out:
                raise BenchError(f"{vmm}: {name}: dd did not copy {count} blocks: {out}")
            res[name] = (count / gs, count / gs, count / host_s)
        nbytes = a.net_mib * MIB
        mb = nbytes / MIB
        # guest -> host: busybox httpd in the guest serves a file in its RAM-backed root file
        # system (made outside the timing); a python3 client in the namespace fetches it.
        _, _, rc = g.cmd(f"mkdir -p /srv && dd if=/dev/zero of=/srv/f bs=1M count={a.net_mib} 2>/dev/null"
                         f" && httpd -p 8080 -h /srv", a.step_timeout)
        if rc:
            raise BenchError(f"{vmm}: making the guest's file or starting its httpd failed")
        got, secs = fetch_in_netns(ns, GUEST_IP, 8080, "/f", a.step_timeout)
        if got != nbytes:
            raise BenchError(f"{vmm}: net guest->host moved {got} bytes, not {nbytes}")
        res["net guest->host"] = (mb / secs, None, None)
        g.cmd("killall httpd; rm -f /srv/f", 60)
        # host -> guest: busybox wget in the guest from a minimal HTTP server in the namespace.
        srv = Server(listen_in_netns(ns, 8081), nbytes, a.step_timeout)
        srv.start()
        out, host_s, _ = g.cmd(timed(f"wget -q -O /dev/null http://{HOST_IP}:8081/f"), a.step_timeout)
        srv.join(a.step_timeout)
        if srv.err or srv.secs is None:
            raise BenchError(f"{vmm}: net host->guest: host server: {srv.err or 'did not finish'}; guest: {out}")
        res["net host->guest"] = (mb / srv.secs, mb / guest_secs(out, f"{vmm}: net host->guest wget"), mb / host_s)
        con.send("poweroff -f")
        try:
            con.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        return res
    finally:
        if con:
            con.kill()
        ns.close()
        os.unlink(disk)


NAMES = ["blk write", "blk read", "net guest->host", "net host->guest"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v3", required=True)
    ap.add_argument("--dir", required=True, help="the Linux guest: bzImage, initramfs.cpio.gz")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--cmdline", default="console=ttyS0 nokaslr cryptomgr.notests")
    ap.add_argument("--disk-mib", type=int, default=300)
    ap.add_argument("--blk-mib", type=int, default=256)
    ap.add_argument("--net-mib", type=int, default=64)
    ap.add_argument("--boot-timeout", type=float, default=300)
    ap.add_argument("--step-timeout", type=float, default=600)
    a = ap.parse_args()
    # SIGTERM/SIGHUP (an outer `timeout`, a closed terminal) unwind like an error, so every VM
    # is killed and its namespace and TAP removed.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _: sys.exit(128 + n))
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces and TAP devices): run as root, e.g. sudo bench/virtio-linux.sh")
    if not os.path.exists("/dev/net/tun"):
        sys.exit("bench: no /dev/net/tun here (TAP devices are needed for virtio-net)")
    for tool in ("ip", "qemu-system-x86_64"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found")
    if a.blk_mib > a.disk_mib:
        sys.exit("bench: --blk-mib must not exceed --disk-mib")
    a.v3 = os.path.abspath(a.v3)
    a.kernel = os.path.abspath(os.path.join(a.dir, "bzImage"))
    a.initrd = os.path.abspath(os.path.join(a.dir, "initramfs.cpio.gz"))
    for f in (a.v3, a.kernel, a.initrd):
        if not os.path.exists(f):
            sys.exit(f"bench: {f} is missing")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="v3-virtio-linux-", dir=base)
    a.logdir = tmp
    rel = open(os.path.join(a.dir, "release")).read().strip() if os.path.exists(os.path.join(a.dir, "release")) else "?"
    print(f"Linux {rel}, {a.mem} MiB, cmdline: {a.cmdline}; disk: {a.disk_mib} MiB sparse raw image in "
          f"{base or tempfile.gettempdir()} (QEMU cache=writeback, like v3's FILEDISK); TAP in a netns, QEMU vhost=off")
    print(f"blk: dd bs=1M count={a.blk_mib} oflag/iflag=direct on /dev/vda, timed in the guest; "
          f"net: {a.net_mib} MiB by HTTP (guest httpd / wget), timed on the host; median of {a.reps}")
    res = {"v3": [], "qemu": []}
    keep = False  # the console logs are kept when a boot fails
    try:
        for rep in range(1, a.reps + 1):
            for vmm in ("v3", "qemu"):  # interleaved, so drift hits both alike
                r = one_boot(a, vmm, rep, tmp)
                res[vmm].append(r)
                print(f"  rep {rep} {'v3 emu' if vmm == 'v3' else 'QEMU TCG':8s} " + " | ".join(
                    f"{n} {r[n][0]:.1f}" + (f" (guest clock {r[n][1]:.1f}, console markers {r[n][2]:.1f})"
                                            if r[n][1] is not None else "") for n in NAMES), flush=True)
    except BenchError as e:
        keep = True
        print(f"bench: {e}\n(console logs kept in {tmp})", file=sys.stderr)
        sys.exit(1)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("MiB/s, median (ratio = v3 / QEMU throughput, higher is better)")
    for n in NAMES:
        o = statistics.median(r[n][0] for r in res["v3"])
        q = statistics.median(r[n][0] for r in res["qemu"])
        print(f"  {n:16s} v3 {o:7.1f} MiB/s | QEMU TCG {q:7.1f} MiB/s | ratio {o / q:.2f} "
              f"({'>= 1.0 meets the target' if o >= q else '< 1.0: below the target'})")


if __name__ == "__main__":
    main()
