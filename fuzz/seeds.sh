#!/usr/bin/env bash
# Seed corpora from the examples and the built guests.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/config_xml corpus/load_multiboot corpus/load_elf64 corpus/load_flat \
	corpus/checkpoint_reader corpus/api_request corpus/migration_stream
cp ../examples/*.xml corpus/config_xml/ 2>/dev/null || true
G=../guests/build
[ -f "$G/mbtest.elf" ] || bash ../guests/build.sh "$G" >/dev/null
cp "$G/mbtest.elf" "$G/mbaout.bin" corpus/load_multiboot/
cp "$G/elf64test.elf" corpus/load_elf64/
cp "$G/flat16.bin" corpus/load_flat/
# API requests, and the state file of a real checkpoint (dir store: header and metadata; the
# target reads it with an empty memory image).
printf 'GET /vm HTTP/1.1\r\nHost: x\r\n\r\n' > corpus/api_request/get
printf 'PUT /snapshot/create HTTP/1.1\r\nContent-Length: 17\r\n\r\n{"path":"/tmp/x"}' > corpus/api_request/put
printf 'GET /vm/memory?addr=0x1000&len=16 HTTP/1.1\r\n\r\n' > corpus/api_request/query
if [ ! -f corpus/checkpoint_reader/state ]; then
	(cd .. && cargo build -q --release -p v3)
	V=../target/release/v3
	tmp=$(mktemp -d)
	$V run --backend emu --mem 2 --api-sock "$tmp/s.sock" --kernel guest:countdown.elf \
		--cmdline "from=1000000" </dev/null >/dev/null 2>&1 &
	for _ in $(seq 100); do [ -S "$tmp/s.sock" ] && break; sleep 0.1; done
	$V save "$tmp/s.sock" "$tmp/ck" --store dir --stop >/dev/null
	wait || true
	cp "$tmp/ck/state" corpus/checkpoint_reader/state
	rm -rf "$tmp"
fi
# A small migration stream: Hello, a page batch (one data page, one zero page), State, Done.
python3 - corpus/migration_stream/stream <<'PY'
import json, struct, sys
def crc64(data):
    c = 0xFFFFFFFFFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0xC96C5795D7870F42 if c & 1 else 0)
    return c ^ 0xFFFFFFFFFFFFFFFF
def frame(kind, payload):
    body = bytes([kind, 0]) + struct.pack("<I", len(payload)) + payload
    return b"PM" + body + struct.pack("<Q", crc64(body))
hello = json.dumps({"version": "1.0.0", "config": {}, "cpuid": [], "backend": "emu", "regions": [[0, 1048576]]}).encode()
pages = struct.pack("<I", 2) + struct.pack("<Q", 0x1000) + bytes(range(256)) * 16 + struct.pack("<Q", 0x2001)
out = frame(1, hello) + frame(4, pages) + frame(5, b"{}") + frame(6, b"")
open(sys.argv[1], "wb").write(out)
PY
