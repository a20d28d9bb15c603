"""Control sockets the benchmarks talk to: v3's API (HTTP/JSON on a Unix socket) and QEMU's QMP."""
import json
import os
import socket
import sys
import time


def wait_path(p, timeout=30):
    t = time.time()
    while not os.path.exists(p):
        if time.time() - t > timeout:
            sys.exit(f"bench: {p} did not appear")
        time.sleep(0.005)


def api(sock, method, path, body=None):
    """One request to a v3 API socket: (status, JSON answer)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    data = json.dumps(body).encode() if body is not None else b""
    s.sendall(f"{method} {path} HTTP/1.1\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    out = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        out += c
    s.close()
    head, _, b = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(b) if b else None


class Qmp:
    """A QMP connection (retries until QEMU listens)."""

    def __init__(self, path):
        for _ in range(2000):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.0005)
        self.f = self.s.makefile("rwb")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                return r
