"""The guest's serial console as the benchmarks drive it: v3 with the console on its
stdin/stdout, a thread that collects the output, and waits for text in it."""
import ctypes
import os
import signal
import subprocess
import threading
import time

_libc = ctypes.CDLL(None, use_errno=True)


class BenchError(Exception):
    pass


def die_with_parent():
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no VM outlives this script


class Console:
    """v3 with the guest's serial console on its stdin/stdout; a thread collects the output."""

    def __init__(self, cmd, log_path):
        self.log = open(log_path, "wb")
        self.buf = bytearray()
        self.cv = threading.Condition()
        self.eof = False
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.t = threading.Thread(target=self._reader, daemon=True)
        self.t.start()

    def _reader(self):
        fd = self.p.stdout.fileno()
        while True:
            try:
                c = os.read(fd, 65536)
            except OSError:
                c = b""
            with self.cv:
                if not c:
                    self.eof = True
                    self.cv.notify_all()
                    return
                self.buf += c
                self.log.write(c)
                self.log.flush()
                self.cv.notify_all()

    def tail(self, n=1500):
        with self.cv:
            return self.buf[-n:].decode(errors="replace")

    def wait_for(self, needle, start, timeout, what=None):
        """Offset just past the first `needle` (bytes or compiled regex) at or after `start`."""
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
                    return end
                if self.eof:
                    raise BenchError(f"v3 exited while waiting for {what or needle!r}; console tail:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"no {what or needle!r} within {timeout:.0f} s; console tail:\n{self.tail()}")
                self.cv.wait(min(left, 1.0))

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def wait_exit(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.t.join(timeout=5)
        self.log.close()
