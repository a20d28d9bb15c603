#!/usr/bin/env python3
"""guard-wrap.py: the build step of a GEARS guarded Linux module (guests/gears/README.md).

A guarded module is entered only through wrappers that tell the VMM about each crossing:

  gm_wrapped_F:  save RBX and the argument registers
                 RAX=0x3200 (GUARD_ENTER) RBX=ID RCX=&return-address-slot RDX=TAG
                 outb %al,$0xec                        <- the ENTER doorbell
                 restore the argument registers, call F
                 save RAX:RDX (F's return value)
                 RAX=0x3201 (GUARD_EXIT)  RBX=ID RCX=&return-address-slot RDX=TAG
                 outb %al,$0xec                        <- the EXIT doorbell
                 restore RAX:RDX and RBX, return

RCX points at the caller's return-address slot at both doorbells (the slot that RSP pointed
at on entry to the wrapper). ID is F's index in the --entries list, TAG the module's tag.

  guard-wrap.py gen --module NAME --tag 0xHEX --entries F1,F2,... --out-dir DIR
                    [--init F] [--exit F]
      writes DIR/gm_wrap.S (one wrapper gm_wrapped_F per entry, in .text) and DIR/gm_wrap.h.
      --init F / --exit F also make the wrapper of entry F the module's init_module /
      cleanup_module, so the kernel itself calls the module through the wrapper: the C source
      then has no module_init()/module_exit() (which alias a function of the same file).

  guard-wrap.py manifest --ko FILE.ko --module NAME --tag 0xHEX --entries F1,F2,...
      prints, as JSON, what the VMM needs to check crossings into the built module:
        {"module": NAME, "tag": TAG, "text_size": size of the .ko's .text,
         "entries": [{"name": F, "id": ID, "wrapper": offset of gm_wrapped_F in .text,
                      "enter": offset of the ENTER outb, "exit": offset of the EXIT outb,
                      "code": the wrapper's bytes in hex, "??" where a relocation goes}]}
      and fails (status 1, a message on stderr) when an entry or its wrapper is missing or
      not in .text, when a wrapper does not look as generated, or when any port I/O
      instruction of the module is outside .text. Needs objdump (binutils).

Writing the module (see guests/gears/guarded.c):
  - each entry F is an ordinary global function: not static, not __init/__exit, and built
    with -fno-reorder-blocks-and-partition so that no part of it lands in .text.unlikely;
  - include "gm_wrap.h" after the entries' prototypes and write GM_DECLARE_ALL(); which
    declares every gm_wrapped_F with F's own type (GM_DECLARE(F) does one); then use
    GM_WRAPPED(F) wherever the kernel is handed F (proc_ops, callbacks, ...);
  - list gm_wrap.o among the module's objects (Kbuild: NAME-y := main.o gm_wrap.o).
gm_wrap.S is preprocessed by kbuild and uses <linux/linkage.h> (SYM_FUNC_START, RET), so
it follows the kernel's configuration (return thunks, ENDBR) and objtool can check it.

Limits: an entry takes at most 6 arguments, all in registers (integers or pointers; no
struct passed by value on the stack), and is not variadic (the wrapper sets AL for the
hypercall). Any return type that comes back in RAX, RAX:RDX or memory works. Entries must
not be called with a stack that the callee expects to find arguments on.
"""
import argparse
import json
import os
import re
import struct
import subprocess
import sys

HC_ENTER = 0x3200
HC_EXIT = 0x3201
PROG = "guard-wrap"
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def fail(msg):
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.exit(1)


def parse_tag(text):
    try:
        tag = int(text, 0)
    except ValueError:
        fail(f"--tag must be a number (like 0x6d67), not {text!r}")
    if not 0 <= tag <= 0xFFFFFFFF:
        fail(f"--tag {text} does not fit in 32 bits")
    return tag


def parse_entries(text):
    names = [e.strip() for e in text.split(",")]
    if not text.strip() or any(not n for n in names):
        fail(f"--entries must be a comma-separated list of function names, not {text!r}")
    for n in names:
        if not IDENT.match(n):
            fail(f"entry {n!r} is not a C identifier")
        if len("gm_wrapped_" + n) > 127:
            fail(f"entry {n!r} is too long")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        fail(f"entries listed twice: {', '.join(dups)}")
    return names


def parse_module(text):
    if not IDENT.match(text):
        fail(f"--module must be a module name (a C identifier), not {text!r}")
    return text


# ------------------------------------------------------------------------------------ gen --

def gen(args):
    module = parse_module(args.module)
    tag = parse_tag(args.tag)
    entries = parse_entries(args.entries)
    for opt, name in (("--init", args.init), ("--exit", args.exit)):
        if name is not None and name not in entries:
            fail(f"{opt} {name}: not one of the entries")
    if args.init is not None and args.init == args.exit:
        fail("--init and --exit name the same entry")
    aliases = {}
    if args.init:
        aliases[args.init] = "init_module"
    if args.exit:
        aliases[args.exit] = "cleanup_module"
    cmd = f"guard-wrap.py gen --module {module} --tag {tag:#x} --entries {','.join(entries)}"
    if args.init:
        cmd += f" --init {args.init}"
    if args.exit:
        cmd += f" --exit {args.exit}"

    s = []
    s.append(f"/* Generated by {cmd}: do not edit. */")
    s.append(f"/* GEARS crossing wrappers of module {module}, tag {tag:#x}. */")
    s.append("#include <linux/linkage.h>")
    s.append("")
    s.append("\t.text")
    for ident, f in enumerate(entries):
        w = "gm_wrapped_" + f
        s.append("")
        s.append(f"/* entry {ident}: {f} */")
        s.append(f"SYM_FUNC_START({w})")
        s.append("\tpushq\t%rbx")
        for r in ("rdi", "rsi", "rdx", "rcx", "r8", "r9"):
            s.append(f"\tpushq\t%{r}")
        s.append(f"\tmovl\t${HC_ENTER:#x}, %eax\t/* GUARD_ENTER */")
        s.append(f"\tmovl\t${ident}, %ebx\t\t/* entry id */")
        s.append("\tleaq\t56(%rsp), %rcx\t/* the caller's return-address slot */")
        s.append(f"\tmovl\t${tag:#x}, %edx\t/* module tag */")
        s.append("\toutb\t%al, $0xec\t\t/* ENTER doorbell */")
        for r in ("r9", "r8", "rcx", "rdx", "rsi", "rdi"):
            s.append(f"\tpopq\t%{r}")
        s.append(f"\tcall\t{f}")
        s.append("\tpushq\t%rax")
        s.append("\tpushq\t%rdx")
        s.append(f"\tmovl\t${HC_EXIT:#x}, %eax\t/* GUARD_EXIT */")
        s.append(f"\tmovl\t${ident}, %ebx\t\t/* entry id */")
        s.append("\tleaq\t24(%rsp), %rcx\t/* the same return-address slot */")
        s.append(f"\tmovl\t${tag:#x}, %edx\t/* module tag */")
        s.append("\toutb\t%al, $0xec\t\t/* EXIT doorbell */")
        s.append("\tpopq\t%rdx")
        s.append("\tpopq\t%rax")
        s.append("\tpopq\t%rbx")
        s.append("\tRET")
        s.append(f"SYM_FUNC_END({w})")
        if f in aliases:
            a = aliases[f]
            s.append(f"/* the kernel calls {a}: make it the wrapper itself */")
            s.append(f"\t.globl\t{a}")
            s.append(f"\t.type\t{a}, @function")
            s.append(f"\t.set\t{a}, {w}")
            s.append(f"\t.size\t{a}, . - {w}")
    asm = "\n".join(s) + "\n"

    h = []
    guard = f"GM_WRAP_{module.upper()}_H"
    h.append(f"/* Generated by {cmd}: do not edit. */")
    h.append(f"#ifndef {guard}")
    h.append(f"#define {guard}")
    h.append("")
    h.append(f'#define GM_MODULE "{module}"')
    h.append(f"#define GM_TAG {tag:#x}")
    h.append(f"#define GM_HC_ENTER {HC_ENTER:#x}")
    h.append(f"#define GM_HC_EXIT {HC_EXIT:#x}")
    h.append(f"#define GM_NR_ENTRIES {len(entries)}")
    for ident, f in enumerate(entries):
        h.append(f"#define GM_ID_{f} {ident}")
    h.append("")
    h.append("/* The wrapper of entry f: what the kernel must be handed instead of f. */")
    h.append("#define GM_WRAPPED(f) gm_wrapped_##f")
    h.append("/* Declares the wrapper of entry f with f's own type (f must be declared first). */")
    h.append("#define GM_DECLARE(f) extern __typeof__(f) gm_wrapped_##f")
    h.append("/* All of them; use as GM_DECLARE_ALL(); after the entries' prototypes. */")
    h.append("#define GM_DECLARE_ALL() \\")
    h.append("\t" + "; \\\n\t".join(f"GM_DECLARE({f})" for f in entries))
    h.append("")
    h.append(f"#endif /* {guard} */")
    hdr = "\n".join(h) + "\n"

    os.makedirs(args.out_dir, exist_ok=True)
    for name, text in (("gm_wrap.S", asm), ("gm_wrap.h", hdr)):
        path = os.path.join(args.out_dir, name)
        # Leave an identical file alone, so that make does not rebuild for nothing.
        try:
            with open(path) as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------- manifest --

SHT_SYMTAB = 2
SHT_RELA = 4
SHF_EXECINSTR = 0x4
STT_FUNC = 2
# Relocation types of x86-64 and how many bytes each one patches.
RELOC_SIZE = {1: 8, 2: 4, 3: 4, 4: 4, 9: 4, 10: 4, 11: 4, 12: 2, 13: 2, 14: 1, 15: 1,
              24: 8, 26: 4, 41: 4, 42: 4}


class Elf:
    def __init__(self, path):
        try:
            with open(path, "rb") as f:
                self.data = data = f.read()
        except OSError as e:
            fail(f"cannot read {path}: {e.strerror}")
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            fail(f"{path} is not a 64-bit little-endian ELF file")
        if struct.unpack_from("<HH", data, 16) != (1, 62):
            fail(f"{path} is not an x86-64 relocatable object (a .ko)")
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        self.sections = []
        for i in range(shnum):
            (name, typ, flags, _addr, off, size, link, info, _align,
             entsize) = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
            self.sections.append({"name": name, "type": typ, "flags": flags, "offset": off,
                                  "size": size, "link": link, "info": info,
                                  "entsize": entsize, "index": i})
        strtab = self.sections[shstrndx]
        for s in self.sections:
            s["name"] = self.cstr(strtab["offset"] + s["name"])
        self.symbols = []
        if sum(1 for s in self.sections if s["type"] == SHT_SYMTAB) != 1:
            fail(f"{path} does not have exactly one symbol table")
        for s in self.sections:
            if s["type"] != SHT_SYMTAB:
                continue
            names = self.sections[s["link"]]["offset"]
            for off in range(s["offset"], s["offset"] + s["size"], 24):
                name, info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ",
                                                                            data, off)
                self.symbols.append({"name": self.cstr(names + name), "type": info & 0xF,
                                     "bind": info >> 4, "shndx": shndx, "value": value,
                                     "size": size})

    def cstr(self, off):
        end = self.data.index(b"\0", off)
        return self.data[off:end].decode("utf-8", "replace")

    def section(self, name):
        for s in self.sections:
            if s["name"] == name:
                return s
        return None

    def relocations(self, target):
        """(offset, size, symbol name) of each relocation applied to section `target`."""
        out = []
        for s in self.sections:
            if s["type"] != SHT_RELA or s["info"] != target["index"]:
                continue
            for off in range(s["offset"], s["offset"] + s["size"], 24):
                r_off, r_info, _addend = struct.unpack_from("<QQq", self.data, off)
                typ = r_info & 0xFFFFFFFF
                if typ not in RELOC_SIZE:
                    fail(f"relocation type {typ} at {target['name']}+{r_off:#x} is unknown")
                out.append((r_off, RELOC_SIZE[typ], self.symbols[r_info >> 32]["name"]))
        return out

    def modinfo(self):
        s = self.section(".modinfo")
        if s is None:
            return {}
        out = {}
        for item in self.data[s["offset"]:s["offset"] + s["size"]].split(b"\0"):
            if b"=" in item:
                k, v = item.split(b"=", 1)
                out.setdefault(k.decode(), v.decode("utf-8", "replace"))
        return out


# objdump -d -w: "  1f:\t0f 1f 00             \tnopl   (%rax)"
INSN = re.compile(r"^\s*([0-9a-f]+):\t([0-9a-f ]+)\t(.*)$")
SECTION = re.compile(r"^Disassembly of section (\S+):$")
PREFIXES = {"rep", "repz", "repe", "repnz", "repne", "lock", "data16", "addr32", "cs", "ds",
            "es", "ss", "fs", "gs", "notrack", "bnd"}
PORT_IO = re.compile(r"^(in|ins|out|outs)[bwld]?$")


def disassemble(path):
    """{section: [(offset, mnemonic, operands)]} for every executable section."""
    try:
        res = subprocess.run(["objdump", "-d", "-w", path], capture_output=True, text=True)
    except FileNotFoundError:
        fail("needs objdump (Debian: binutils)")
    if res.returncode != 0:
        fail(f"objdump -d {path} failed: {res.stderr.strip()}")
    out = {}
    cur = None
    for line in res.stdout.splitlines():
        m = SECTION.match(line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = INSN.match(line)
        if not m or cur is None:
            continue
        words = m.group(3).split()
        while words and words[0] in PREFIXES:
            words = words[1:]
        if not words:
            continue
        cur.append((int(m.group(1), 16), words[0], " ".join(words[1:])))
    return out


def function_at(elf, shndx, off):
    for s in elf.symbols:
        if (s["type"] == STT_FUNC and s["shndx"] == shndx
                and s["value"] <= off < s["value"] + max(s["size"], 1)):
            return s["name"]
    return "?"


def manifest(args):
    module = parse_module(args.module)
    tag = parse_tag(args.tag)
    entries = parse_entries(args.entries)
    ko = args.ko
    elf = Elf(ko)
    info = elf.modinfo()
    if info.get("name") != module:
        fail(f"{ko} is module {info.get('name')!r}, not {module!r}")
    text = elf.section(".text")
    if text is None:
        fail(f"{ko} has no .text section")
    tidx = text["index"]
    relocs = elf.relocations(text)
    dis = disassemble(ko)
    insns = dis.get(".text", [])

    # All of the module's port I/O must be in .text, where the VMM can see it.
    stray = []
    for sec, lst in sorted(dis.items()):
        for off, mnem, ops in lst:
            if PORT_IO.match(mnem) and sec != ".text":
                s = elf.section(sec)
                fn = function_at(elf, s["index"], off) if s else "?"
                stray.append(f"{mnem} {ops} at {sec}+{off:#x} (in {fn})")
    if stray:
        fail(f"{ko}: port I/O outside .text: " + "; ".join(stray) +
             " (are the module's functions __init/__exit or split into cold parts? build "
             "it with -fno-reorder-blocks-and-partition)")

    syms = {}
    for s in elf.symbols:
        if s["name"] and s["shndx"] != 0:
            syms.setdefault(s["name"], s)
    out = []
    for ident, f in enumerate(entries):
        w = "gm_wrapped_" + f
        ws = syms.get(w)
        if ws is None:
            fail(f"{ko} has no wrapper {w} for entry {f} (is gm_wrap.o, generated with this "
                 "--entries list, linked in?)")
        fs = syms.get(f)
        if fs is None:
            fail(f"{ko} has no function {f}, the entry that {w} calls")
        for s, what in ((ws, f"wrapper {w}"), (fs, f"entry {f}")):
            if s["shndx"] != tidx:
                sec = elf.sections[s["shndx"]]["name"] if s["shndx"] < len(elf.sections) \
                    else f"section #{s['shndx']}"
                fail(f"{ko}: the {what} is in {sec}, not .text (entries must not be "
                     "__init/__exit or static inline)")
        if ws["type"] != STT_FUNC or ws["bind"] != 1 or ws["size"] == 0:
            fail(f"{ko}: {w} is not a global function with a size")
        start, size = ws["value"], ws["size"]
        if start + size > text["size"]:
            fail(f"{ko}: {w} runs past the end of .text")
        code = bytearray(elf.data[text["offset"] + start:text["offset"] + start + size])
        hole = [False] * size
        calls = False
        for r_off, r_size, r_sym in relocs:
            if r_off + r_size <= start or r_off >= start + size:
                continue
            if r_off < start or r_off + r_size > start + size:
                fail(f"{ko}: a relocation straddles the edge of {w}")
            for i in range(r_off - start, r_off - start + r_size):
                hole[i] = True
            # The kernel rewrites `jmp __x86_return_thunk` (opcode included) into `ret; int3...`
            # at load when the CPU needs no return thunk: the opcode byte is not fixed either.
            if r_sym == "__x86_return_thunk" and r_off > start:
                hole[r_off - start - 1] = True
            if r_sym == f:
                calls = True
        if not calls:
            fail(f"{ko}: {w} does not call {f}")
        mine = [(o, m, ops) for o, m, ops in insns if start <= o < start + size]
        doors = [i for i, (o, m, ops) in enumerate(mine) if m == "out" and ops == "%al,$0xec"]
        if len(doors) != 2:
            fail(f"{ko}: {w} has {len(doors)} doorbells (out %al,$0xec), not 2")
        want = [(HC_ENTER, "0x38(%rsp),%rcx"), (HC_EXIT, "0x18(%rsp),%rcx")]
        lo = 0
        for door, (hc, slot) in zip(doors, want):
            before = {(m, ops) for o, m, ops in mine[lo:door]}
            for need in (("mov", f"${hc:#x},%eax"), ("mov", f"${ident:#x},%ebx"),
                         ("lea", slot), ("mov", f"${tag:#x},%edx")):
                if need not in before:
                    fail(f"{ko}: {w}: no `{need[0]} {need[1]}` before its doorbell at "
                         f".text+{mine[door][0]:#x} (built from another gm_wrap.S?)")
            lo = door + 1
        out.append({
            "name": f,
            "id": ident,
            "wrapper": start,
            "enter": mine[doors[0]][0],
            "exit": mine[doors[1]][0],
            "code": " ".join("??" if hole[i] else f"{b:02x}" for i, b in enumerate(code)),
        })
    json.dump({"module": module, "tag": tag, "text_size": text["size"], "entries": out},
              sys.stdout, indent=2)
    sys.stdout.write("\n")


def main():
    ap = argparse.ArgumentParser(prog="guard-wrap.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen", help="write gm_wrap.S and gm_wrap.h")
    g.add_argument("--module", required=True)
    g.add_argument("--tag", required=True)
    g.add_argument("--entries", required=True)
    g.add_argument("--out-dir", required=True)
    g.add_argument("--init", help="entry whose wrapper is the module's init_module")
    g.add_argument("--exit", help="entry whose wrapper is the module's cleanup_module")
    m = sub.add_parser("manifest", help="print the JSON manifest of a built .ko")
    m.add_argument("--ko", required=True)
    m.add_argument("--module", required=True)
    m.add_argument("--tag", required=True)
    m.add_argument("--entries", required=True)
    args = ap.parse_args()
    if args.cmd == "gen":
        gen(args)
    else:
        manifest(args)


if __name__ == "__main__":
    main()
