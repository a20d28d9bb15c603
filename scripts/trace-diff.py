#!/usr/bin/env python3
"""Find the first divergence between an emulator trace and a QEMU trace of the same guest.

  PALACIOS_EMU_TRACE=ours.log v3 run --backend emu --kernel guest.elf ...
  qemu-system-x86_64 -accel tcg -d cpu,nochain -singlestep -D qemu.log -kernel guest.elf ...
  scripts/trace-diff.py [--rip-only] [--ignore RBX,RCX,...] ours.log qemu.log

Both logs hold one register dump per instruction (RAX=... lines, or EAX=... lines for QEMU
outside long mode). QEMU runs firmware before the guest: its dumps are skipped until the
guest's first RIP appears. The script then walks both sequences and reports the first
instruction where RIP, a general register or the arithmetic flags differ. Loaders leave
different scratch values in registers at the entry (QEMU's multiboot info sits elsewhere, for
one): --ignore names registers to leave out, --rip-only compares the control flow alone.
"""
import re
import sys

REG = re.compile(r"\b(R[A-Z0-9]{1,2}|E[A-Z]{2}) ?=([0-9a-fA-F]+)")
NAMES = {"EAX": "RAX", "EBX": "RBX", "ECX": "RCX", "EDX": "RDX", "ESI": "RSI", "EDI": "RDI",
         "EBP": "RBP", "ESP": "RSP", "EIP": "RIP", "EFL": "RFL"}
ARITH = 0x8D5  # CF PF AF ZF SF OF


def states(path):
    """Yield (registers, text of the instruction if known) per dump."""
    cur, insn = {}, ""
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("IN: "):
                insn = line[4:].strip()
                if cur:
                    yield cur, insn
                    cur, insn = {}, ""
                continue
            found = REG.findall(line)
            if not found:
                continue
            if ("RAX" in [NAMES.get(n, n) for n, _ in found]) and cur:
                if "RIP" in cur:
                    yield cur, insn
                cur, insn = {}, ""
            for name, val in found:
                cur[NAMES.get(name, name).replace(" ", "")] = int(val, 16)
    if cur and "RIP" in cur:
        yield cur, insn


def main():
    args = sys.argv[1:]
    rip_only = "--rip-only" in args
    args = [a for a in args if a != "--rip-only"]
    ignore = set()
    if "--ignore" in args:
        k = args.index("--ignore")
        ignore = {r.strip().upper() for r in args[k + 1].split(",")}
        del args[k:k + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    ours = list(states(args[0]))
    if not ours:
        sys.exit(f"no register dumps in {args[0]}")
    start = ours[0][0]["RIP"]
    theirs = states(args[1])
    for s, _ in theirs:
        if s.get("RIP") == start:
            first = s
            break
    else:
        sys.exit(f"RIP {start:#x} never appears in {args[1]}")
    compared = 0
    prev = None
    for (a, text), b in zip(ours, _chain(first, theirs)):
        diffs = []
        regs = ["RIP"] if rip_only else [
            "RIP", "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP",
            "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"]
        for r in regs:
            if r in a and r in b and r not in ignore:
                wide = "R8" in b  # QEMU printed 64-bit registers
                mask = (1 << 64) - 1 if wide else (1 << 32) - 1
                if a[r] & mask != b[r] & mask:
                    diffs.append(f"{r}: ours {a[r] & mask:#x}, qemu {b[r] & mask:#x}")
        if not rip_only and "RFL" not in ignore and "RFL" in a and "RFL" in b \
                and (a["RFL"] ^ b["RFL"]) & ARITH:
            diffs.append(f"flags: ours {a['RFL']:#x}, qemu {b['RFL']:#x}")
        if diffs:
            print(f"first divergence after {compared} matching instructions")
            if prev:
                print(f"  previous instruction: {prev}")
            print(f"  at: {text or hex(a['RIP'])}")
            for d in diffs:
                print(f"  {d}")
            sys.exit(1)
        compared += 1
        prev = text
    print(f"no divergence in {compared} instructions")


def _chain(first, rest):
    yield first
    for s, _ in rest:
        yield s


if __name__ == "__main__":
    main()
