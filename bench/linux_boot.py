"""Time to PALACIOS-LINUX-READY: v3 (emulator backend) beside QEMU TCG. See linux-boot.sh."""
import argparse
import os
import select
import statistics
import subprocess
import time

# The command line examples/linux.xml ships (see its comment for why).
DEFAULT_CMDLINE = "console=ttyS0 nokaslr cryptomgr.notests"
NEEDLE = b"PALACIOS-LINUX-READY"


def time_to_ready(cmd, limit):
    """Seconds from spawning `cmd` until it prints the needle (the process is then killed)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    seen = b""
    try:
        while True:
            left = limit - (time.monotonic() - t0)
            if left <= 0:
                raise RuntimeError(f"no {NEEDLE.decode()} within {limit} s: {' '.join(cmd)}\n"
                                   + seen[-2000:].decode(errors="replace"))
            r, _, _ = select.select([p.stdout], [], [], min(left, 0.5))
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"exited before {NEEDLE.decode()}: {' '.join(cmd)}\n"
                                       + seen[-2000:].decode(errors="replace"))
                seen += chunk
                if NEEDLE in seen:
                    return time.monotonic() - t0, seen
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v3", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--cmdline", default=DEFAULT_CMDLINE)
    ap.add_argument("--limit", type=float, default=300)
    a = ap.parse_args()
    kernel = os.path.join(a.dir, "bzImage")
    initrd = os.path.join(a.dir, "initramfs.cpio.gz")
    ours = [a.v3, "run", "--backend", "emu", "--kernel", kernel, "--initrd", initrd,
            "--mem", str(a.mem), "--cmdline", a.cmdline]
    qemu = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(a.mem), "-nographic",
            "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", a.cmdline]
    print(f"kernel {open(os.path.join(a.dir, 'release')).read().strip()}, "
          f"{a.mem} MiB, cmdline: {a.cmdline}")
    res = {"v3 emu": [], "qemu tcg": []}
    for rep in range(a.reps):
        for name, cmd in (("v3 emu", ours), ("qemu tcg", qemu)):
            t, _ = time_to_ready(cmd, a.limit)
            res[name].append(t)
            print(f"  rep {rep + 1}: {name:9} {t:7.2f} s")
    m = {k: statistics.median(v) for k, v in res.items()}
    print(f"median time to {NEEDLE.decode()}: v3 emu {m['v3 emu']:.2f} s, "
          f"qemu tcg {m['qemu tcg']:.2f} s")
    print(f"ratio v3/qemu: {m['v3 emu'] / m['qemu tcg']:.2f}x (issue 6 target <= 5x, goal 2x)")


if __name__ == "__main__":
    main()
