//! Targeted guests for the emulator's system architecture: every mode switch (real, unreal,
//! 16/32-bit protected, long 64-bit and compatibility), the paging modes with their faults and
//! A/D bits, exceptions with their priority and error codes (#DF, triple fault), privilege
//! transitions (gates, TSS stack switches, conforming segments, SYSCALL/SYSENTER), the I/O
//! permission bitmap, interrupt shadows, self-modifying code and a REP MOVS that page-faults
//! midway and resumes.
//!
//! Each guest is assembled here with iced-x86's code assembler and starts in real mode at
//! 0x8000. Descriptor tables, TSS and page tables are built from Rust and written into guest
//! memory; the guest reports through port writes, which the harness collects:
//!
//! * port 0xE9: a value ([`Ev::Val`]);
//! * ports 0xE0-0xE3: an exception seen by a handler: vector, error code (only for vectors
//!   that push one), CR2 (only for #PF; 64-bit handlers write its low then high half) and the
//!   CS of the interrupted context ([`Ev::Exc`]);
//! * any other port: [`Ev::Out`].
//!
//! The common exception handlers then return to the code after the current "probe" (a
//! subroutine call whose stack pointer was saved), so one guest can try many faulting
//! instructions in a row.
//!
//! A guest ends with HLT (IF=0) or a triple fault; every run has a time limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;
use palacios_emu::EmuBackend;
use palacios_vmm::backend::{Backend, Exit, Vcpu};
use palacios_vmm::{GuestMem, MemoryMap};
use palacios_x86::CpuState;
use vm_memory::{Bytes, GuestAddress};

type AsmResult = Result<(), IcedError>;

// ---- guest-physical layout ----------------------------------------------------------------

const GDTR: u64 = 0x500;
const IDTR: u64 = 0x510;
const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const TSS: u64 = 0x3000;
/// The stack pointer a probe saved (the handlers return to the probe's caller with it).
const SAVED: u64 = 0x4000;
/// Scratch variables.
const VARS: u64 = 0x4100;
/// Stack of the kernel code (ring 0, no privilege change).
const KSTACK: u64 = 0x6000;
/// Ring-0 stack the TSS hands out on a privilege change.
const STACK0: u64 = 0x7000;
/// Ring-3 stack.
const USTACK: u64 = 0x8000;
/// Real-mode entry.
const REAL: u64 = 0x8000;
/// 32-bit kernel code.
const PM32: u64 = 0x9000;
/// Exception handlers (32- or 64-bit).
const RT: u64 = 0xA000;
/// 64-bit kernel code.
const LM64: u64 = 0xB000;
/// Further code (user code, 16-bit code, compatibility-mode code).
const CODE2: u64 = 0xD000;
const CODE3: u64 = 0xE000;
/// Page tables live here and above.
const PT_AREA: u64 = 0x10000;
/// Data pages the tests play with.
const DATA: u64 = 0x20000;

// ---- selectors ------------------------------------------------------------------------------

const KCODE32: u16 = 0x08;
const KCODE64: u16 = 0x10;
const KDATA: u16 = 0x18;
const UCODE32: u16 = 0x20;
const UDATA: u16 = 0x28;
const UCODE64: u16 = 0x30;
const CODE16: u16 = 0x38;
const DATA16: u16 = 0x40;
const TSS_SEL: u16 = 0x48;
/// First selector free for a test's own descriptors.
const FREE: u16 = 0x58;

// ---- ports ----------------------------------------------------------------------------------

const P_VAL: u16 = 0xE9;
const P_VEC: u16 = 0xE0;
const P_ERR: u16 = 0xE1;
const P_CR2: u16 = 0xE2;
const P_CS: u16 = 0xE3;

// ---- descriptors ----------------------------------------------------------------------------

/// A code/data descriptor from its access byte (P, DPL, S, type) and flags nibble (G, D/B, L, AVL).
fn desc(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let (base, limit) = (u64::from(base), u64::from(limit));
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// A 32-bit (or 16-bit) gate: `type_` 0x4/0xC call gate, 0x6/0xE interrupt, 0x7/0xF trap.
fn gate(sel: u16, off: u32, type_: u8, dpl: u8, params: u8) -> u64 {
    let off = u64::from(off);
    (off & 0xffff)
        | (u64::from(sel) << 16)
        | (u64::from(params & 0x1f) << 32)
        | (u64::from(0x80 | (dpl << 5) | type_) << 40)
        | ((off >> 16) << 48)
}

/// A 64-bit IDT gate (low and high quadword).
fn gate64(sel: u16, off: u64, type_: u8, dpl: u8, ist: u8) -> [u64; 2] {
    [
        (off & 0xffff)
            | (u64::from(sel) << 16)
            | (u64::from(ist & 7) << 32)
            | (u64::from(0x80 | (dpl << 5) | type_) << 40)
            | (((off >> 16) & 0xffff) << 48),
        off >> 32,
    ]
}

const fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17)
}

// ---- the assembler with two-pass label addresses ---------------------------------------------

/// A code assembler whose code may use label addresses as immediates: the code is assembled
/// twice, the second time with the addresses the first pass found.
struct Asm {
    a: CodeAssembler,
    named: Vec<(String, CodeLabel)>,
    prev: HashMap<String, u64>,
    ip: u64,
}

impl std::ops::Deref for Asm {
    type Target = CodeAssembler;
    fn deref(&self) -> &CodeAssembler {
        &self.a
    }
}
impl std::ops::DerefMut for Asm {
    fn deref_mut(&mut self) -> &mut CodeAssembler {
        &mut self.a
    }
}

impl Asm {
    /// Set `l` at the next instruction and name it: its address can be looked up with
    /// [`Asm::addr`] and in the result.
    fn set_named(&mut self, l: &mut CodeLabel, name: &str) -> AsmResult {
        self.a.set_label(l)?;
        self.named.push((name.to_string(), *l));
        Ok(())
    }
    /// Define a named label at the next instruction.
    fn here(&mut self, name: &str) -> Result<CodeLabel, IcedError> {
        let mut l = self.a.create_label();
        self.set_named(&mut l, name)?;
        Ok(l)
    }
    /// The address of a named label (a placeholder of the same size class in the first pass).
    fn addr(&self, name: &str) -> u32 {
        *self.prev.get(name).unwrap_or(&(self.ip | 0x80)) as u32
    }
    /// Far JMP to a named label.
    fn jmp_far_to(&mut self, sel: u16, name: &str) -> AsmResult {
        let t = self.addr(name);
        self.a.jmp_far(sel, t)
    }
    /// `out` of a 32-bit value to the report port (clobbers EAX).
    fn val(&mut self, v: u32) -> AsmResult {
        self.a.mov(eax, v)?;
        self.a.out(u32::from(P_VAL), eax)
    }
    /// Report EAX.
    fn rep_eax(&mut self) -> AsmResult {
        self.a.out(u32::from(P_VAL), eax)
    }
    /// A probe: call the body as a subroutine after saving ESP, so that an exception handler
    /// can return to the code after the probe (`mov esp, [SAVED]; ret`).
    fn probe32(&mut self, body: impl FnOnce(&mut Asm) -> AsmResult) -> AsmResult {
        let mut p = self.a.create_label();
        let mut after = self.a.create_label();
        self.a.call(p)?;
        self.a.jmp(after)?;
        self.a.set_label(&mut p)?;
        self.a.mov(dword_ptr(SAVED as u32), esp)?;
        body(self)?;
        self.a.ret()?;
        self.a.set_label(&mut after)?;
        self.a.nop()
    }
    fn probe64(&mut self, body: impl FnOnce(&mut Asm) -> AsmResult) -> AsmResult {
        let mut p = self.a.create_label();
        let mut after = self.a.create_label();
        self.a.call(p)?;
        self.a.jmp(after)?;
        self.a.set_label(&mut p)?;
        self.a.mov(qword_ptr(SAVED), rsp)?;
        body(self)?;
        self.a.ret()?;
        self.a.set_label(&mut after)?;
        self.a.nop()
    }
    fn probe16(&mut self, body: impl FnOnce(&mut Asm) -> AsmResult) -> AsmResult {
        let mut p = self.a.create_label();
        let mut after = self.a.create_label();
        self.a.call(p)?;
        self.a.jmp(after)?;
        self.a.set_label(&mut p)?;
        self.a.mov(word_ptr(SAVED as u16), sp)?;
        body(self)?;
        self.a.ret()?;
        self.a.set_label(&mut after)?;
        self.a.nop()
    }
    /// From ring 0 (32-bit), IRET to ring 3 at `entry` with `eflags`, DS and ES loaded with
    /// the user data segment.
    fn enter_user32(&mut self, entry: u32, eflags: u32) -> AsmResult {
        self.a.mov(ax, u32::from(UDATA | 3))?;
        self.a.mov(ds, ax)?;
        self.a.mov(es, ax)?;
        self.iret_user32(entry, eflags)
    }
    /// IRET to ring 3 leaving DS and ES alone.
    fn iret_user32(&mut self, entry: u32, eflags: u32) -> AsmResult {
        self.a.push(u32::from(UDATA | 3))?;
        self.a.push(USTACK as u32)?;
        self.a.push(eflags)?;
        self.a.push(u32::from(UCODE32 | 3))?;
        self.a.push(entry)?;
        self.a.iretd()
    }
    /// From ring 0 (64-bit), IRETQ to 64-bit ring 3 at `entry` with `rflags`.
    fn enter_user64(&mut self, entry: u32, rflags: u32) -> AsmResult {
        self.a.push(i32::from(UDATA | 3))?;
        self.a.push(USTACK as i32)?;
        self.a.push(rflags as i32)?;
        self.a.push(i32::from(UCODE64 | 3))?;
        self.a.push(entry as i32)?;
        self.a.iretq()
    }
}

/// Assembled code: bytes at `ip` and the named labels' addresses.
struct Code {
    ip: u64,
    bytes: Vec<u8>,
    labels: HashMap<String, u64>,
}

impl std::ops::Index<&str> for Code {
    type Output = u64;
    fn index(&self, name: &str) -> &u64 {
        self.labels
            .get(name)
            .unwrap_or_else(|| panic!("no label {name}"))
    }
}

fn assemble(bits: u32, ip: u64, f: &dyn Fn(&mut Asm) -> AsmResult) -> Code {
    let pass = |prev: HashMap<String, u64>| -> Code {
        let mut a = Asm {
            a: CodeAssembler::new(bits).unwrap(),
            named: Vec::new(),
            prev,
            ip,
        };
        f(&mut a).unwrap_or_else(|e| panic!("assembling at {ip:#x}: {e}"));
        let named = std::mem::take(&mut a.named);
        let r =
            a.a.assemble_options(ip, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
                .unwrap_or_else(|e| panic!("assembling at {ip:#x}: {e}"));
        let labels = named
            .iter()
            .map(|(n, l)| {
                (
                    n.clone(),
                    r.label_ip(l).unwrap_or_else(|e| panic!("label {n}: {e}")),
                )
            })
            .collect();
        Code {
            ip,
            bytes: r.inner.code_buffer,
            labels,
        }
    };
    let first = pass(HashMap::new());
    let second = pass(first.labels.clone());
    assert_eq!(
        first.labels, second.labels,
        "label addresses moved between passes"
    );
    assert_eq!(first.bytes.len(), second.bytes.len());
    second
}

// ---- the guest ------------------------------------------------------------------------------

struct Guest {
    mem: GuestMem,
    state: CpuState,
}

impl Guest {
    /// 32 MiB of RAM, the standard GDT (no TSS yet), real mode at [`REAL`].
    fn new() -> Self {
        let mem = MemoryMap::pc(32 << 20).create_memory().unwrap();
        let g = Guest {
            mem,
            state: CpuState::real_mode_at(REAL as u32),
        };
        g.w16(GDTR, 0xff);
        g.w32(GDTR + 2, GDT as u32);
        g.set_desc(KCODE32, desc(0, 0xfffff, 0x9a, 0xc));
        g.set_desc(KCODE64, desc(0, 0xfffff, 0x9a, 0xa));
        g.set_desc(KDATA, desc(0, 0xfffff, 0x92, 0xc));
        g.set_desc(UCODE32, desc(0, 0xfffff, 0xfa, 0xc));
        g.set_desc(UDATA, desc(0, 0xfffff, 0xf2, 0xc));
        g.set_desc(UCODE64, desc(0, 0xfffff, 0xfa, 0xa));
        g.set_desc(CODE16, desc(0, 0xffff, 0x9a, 0));
        g.set_desc(DATA16, desc(0, 0xffff, 0x92, 0));
        g
    }
    fn write(&self, addr: u64, b: &[u8]) {
        self.mem.write_slice(b, GuestAddress(addr)).unwrap();
    }
    fn w16(&self, addr: u64, v: u16) {
        self.write(addr, &v.to_le_bytes());
    }
    fn w32(&self, addr: u64, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }
    fn w64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }
    fn r32(&self, addr: u64) -> u32 {
        let mut b = [0; 4];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        u32::from_le_bytes(b)
    }
    fn r64(&self, addr: u64) -> u64 {
        let mut b = [0; 8];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        u64::from_le_bytes(b)
    }
    fn set_desc(&self, sel: u16, raw: u64) {
        self.w64(GDT + u64::from(sel & !7), raw);
    }
    fn code(&self, bits: u32, ip: u64, f: &dyn Fn(&mut Asm) -> AsmResult) -> Code {
        let c = assemble(bits, ip, f);
        self.write(c.ip, &c.bytes);
        c
    }

    /// Real-mode entry that switches straight to 32-bit protected mode at [`PM32`].
    fn boot_pm32(&self) {
        self.code(16, REAL, &|a| {
            a.cli()?;
            a.lgdt(ptr(GDTR as u16))?;
            a.mov(eax, cr0)?;
            a.or(eax, 1)?;
            a.mov(cr0, eax)?;
            a.jmp_far(KCODE32, PM32 as u32)
        });
    }

    /// A 32-bit TSS: ESP0/SS0 = STACK0/KDATA, an I/O bitmap for ports 0-0x3ff (all allowed
    /// except `denied`), and its descriptor at [`TSS_SEL`].
    fn tss32(&self, denied: &[u16]) {
        self.write(TSS, &[0; 0x68 + 129]);
        self.w32(TSS + 4, STACK0 as u32);
        self.w32(TSS + 8, u32::from(KDATA));
        self.w16(TSS + 0x66, 0x68);
        for &p in denied {
            let a = TSS + 0x68 + u64::from(p / 8);
            let mut b = [0u8];
            self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            self.write(a, &[b[0] | 1 << (p % 8)]);
        }
        self.write(TSS + 0x68 + 128, &[0xff]);
        self.set_desc(TSS_SEL, desc(TSS as u32, 0x68 + 128, 0x89, 0));
    }

    /// A 64-bit TSS: RSP0 = STACK0, IST1 = `ist1`, the same I/O bitmap layout.
    fn tss64(&self, ist1: u64) {
        self.write(TSS, &[0; 0x68 + 129]);
        self.w64(TSS + 4, STACK0);
        self.w64(TSS + 0x24, ist1);
        self.w16(TSS + 0x66, 0x68);
        self.write(TSS + 0x68 + 128, &[0xff]);
        self.set_desc(TSS_SEL, desc(TSS as u32, 0x68 + 128, 0x89, 0));
        self.w64(GDT + u64::from(TSS_SEL) + 8, TSS >> 32);
    }

    /// Exception stubs for vectors 0-31 at [`RT`] (32-bit) and a 32-bit IDT whose interrupt
    /// gates point at them. The common handler reports and returns to the current probe.
    fn idt32(&self) -> Code {
        let rt = self.code(32, RT, &|a| {
            let mut common = a.create_label();
            for v in 0u8..32 {
                a.here(&format!("v{v}"))?;
                if !has_error_code(v) {
                    a.push(-1i32)?;
                }
                a.push(u32::from(v))?;
                a.jmp(common)?;
            }
            a.set_label(&mut common)?;
            a.mov(eax, dword_ptr(esp))?;
            a.out(u32::from(P_VEC), eax)?;
            a.mov(eax, dword_ptr(esp + 4))?;
            let mut no_err = a.create_label();
            a.cmp(eax, -1)?;
            a.je(no_err)?;
            a.out(u32::from(P_ERR), eax)?;
            a.set_label(&mut no_err)?;
            let mut no_cr2 = a.create_label();
            a.cmp(dword_ptr(esp), 14)?;
            a.jne(no_cr2)?;
            a.mov(eax, cr2)?;
            a.out(u32::from(P_CR2), eax)?;
            a.set_label(&mut no_cr2)?;
            a.mov(eax, dword_ptr(esp + 12))?;
            a.out(u32::from(P_CS), eax)?;
            a.here("recover")?;
            a.mov(ax, KDATA as u32)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(fs, ax)?;
            a.mov(gs, ax)?;
            a.mov(ss, ax)?;
            a.mov(esp, dword_ptr(SAVED as u32))?;
            a.ret()
        });
        self.w16(IDTR, 256 * 8 - 1);
        self.w32(IDTR + 2, IDT as u32);
        self.write(IDT, &[0; 256 * 8]);
        for v in 0..32u8 {
            self.set_gate32(v, gate(KCODE32, rt[&format!("v{v}")] as u32, 0xe, 0, 0));
        }
        rt
    }
    fn set_gate32(&self, v: u8, raw: u64) {
        self.w64(IDT + u64::from(v) * 8, raw);
    }

    /// 64-bit exception stubs at [`RT`] and a 64-bit IDT (interrupt gates, no IST).
    fn idt64(&self) -> Code {
        let rt = self.code(64, RT, &|a| {
            let mut common = a.create_label();
            for v in 0u8..32 {
                a.here(&format!("v{v}"))?;
                if !has_error_code(v) {
                    a.push(-1i32)?;
                }
                a.push(i32::from(v))?;
                a.jmp(common)?;
            }
            a.set_label(&mut common)?;
            a.mov(rax, qword_ptr(rsp))?;
            a.out(u32::from(P_VEC), eax)?;
            a.mov(rax, qword_ptr(rsp + 8))?;
            let mut no_err = a.create_label();
            a.cmp(eax, -1)?;
            a.je(no_err)?;
            a.out(u32::from(P_ERR), eax)?;
            a.set_label(&mut no_err)?;
            let mut no_cr2 = a.create_label();
            a.cmp(qword_ptr(rsp), 14)?;
            a.jne(no_cr2)?;
            a.mov(rax, cr2)?;
            a.out(u32::from(P_CR2), eax)?;
            a.shr(rax, 32)?;
            a.out(u32::from(P_CR2), eax)?;
            a.set_label(&mut no_cr2)?;
            a.mov(rax, qword_ptr(rsp + 24))?;
            a.out(u32::from(P_CS), eax)?;
            a.here("recover")?;
            a.mov(ax, KDATA as u32)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(ss, ax)?;
            a.mov(rsp, qword_ptr(SAVED))?;
            a.ret()
        });
        self.w16(IDTR, 256 * 16 - 1);
        self.w64(IDTR + 2, IDT);
        self.write(IDT, &[0; 256 * 16]);
        for v in 0..32u8 {
            self.set_gate64(v, gate64(KCODE64, rt[&format!("v{v}")], 0xe, 0, 0));
        }
        rt
    }
    fn set_gate64(&self, v: u8, g: [u64; 2]) {
        self.w64(IDT + u64::from(v) * 16, g[0]);
        self.w64(IDT + u64::from(v) * 16 + 8, g[1]);
    }

    /// Real-mode IVT handlers for vectors 0-31 (16-bit, at [`RT`]): report vector and CS,
    /// then return to the current 16-bit probe.
    fn ivt(&self) -> Code {
        let rt = self.code(16, RT, &|a| {
            let mut common = a.create_label();
            for v in 0u8..32 {
                a.here(&format!("v{v}"))?;
                a.push(u32::from(v))?;
                a.jmp(common)?;
            }
            a.set_label(&mut common)?;
            a.mov(bp, sp)?;
            a.mov(ax, word_ptr(bp))?;
            a.out(u32::from(P_VEC), ax)?;
            a.mov(ax, word_ptr(bp + 4))?;
            a.out(u32::from(P_CS), ax)?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(ss, ax)?;
            a.mov(sp, word_ptr(SAVED as u16))?;
            a.ret()
        });
        for v in 0..32u8 {
            let off = rt[&format!("v{v}")];
            self.w16(u64::from(v) * 4, off as u16);
            self.w16(u64::from(v) * 4 + 2, 0);
        }
        rt
    }
}

/// Kernel prologue at the start of 32-bit code: flat data segments, the kernel stack, the IDT
/// and (when `tss`) the task register.
fn pm32_init(a: &mut Asm, tss: bool) -> AsmResult {
    a.mov(ax, u32::from(KDATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(ss, ax)?;
    a.mov(esp, KSTACK as u32)?;
    a.lidt(ptr(IDTR as u32))?;
    if tss {
        a.mov(ax, u32::from(TSS_SEL))?;
        a.ltr(ax)?;
    }
    Ok(())
}

// ---- page tables ----------------------------------------------------------------------------

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 0x80;
const NX: u64 = 1 << 63;

/// 32-bit paging: a page directory and one page table.
const PD32: u64 = PT_AREA;
const PT32: u64 = PT_AREA + 0x1000;
/// Address of the 32-bit PTE mapping `page`.
fn pte32(page: u64) -> u64 {
    PT32 + (page >> 12) * 4
}

/// PAE / 4-level: PML4, PDPT, PD and one PT identity-mapping 0-2 MiB.
const PML4: u64 = PT_AREA + 0x2000;
const PDPT: u64 = PT_AREA + 0x3000;
const PD: u64 = PT_AREA + 0x4000;
const PT: u64 = PT_AREA + 0x5000;
/// Address of the PAE/4-level PTE mapping `page`.
fn pte64(page: u64) -> u64 {
    PT + (page >> 12) * 8
}

impl Guest {
    /// 32-bit tables identity-mapping 0-4 MiB with P|RW|US pages. Returns CR3.
    fn paging32(&self) -> u32 {
        self.write(PD32, &[0; 0x2000]);
        self.w32(PD32, (PT32 | P | RW | US) as u32);
        for i in 0..1024u64 {
            self.w32(PT32 + i * 4, ((i << 12) | P | RW | US) as u32);
        }
        PD32 as u32
    }
    /// 4-level tables (CR3 = PML4) identity-mapping 0-2 MiB with P|RW|US pages.
    fn paging64(&self) {
        self.write(PML4, &[0; 0x4000]);
        self.w64(PML4, PDPT | P | RW | US);
        self.w64(PDPT, PD | P | RW | US);
        self.w64(PD, PT | P | RW | US);
        for i in 0..512u64 {
            self.w64(PT + i * 8, (i << 12) | P | RW | US);
        }
    }
    /// Turn [`Guest::paging64`]'s tables into PAE ones (CR3 = PDPT): PDPTEs have no RW/US.
    fn pae_pdpt(&self) {
        self.w64(PDPT, PD | P);
    }
}

// ---- running --------------------------------------------------------------------------------

/// What the guest reported.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Val(u64),
    Exc {
        vec: u8,
        err: Option<u32>,
        cr2: Option<u64>,
        cs: u16,
    },
    /// A write to another port.
    Out(u16, u64),
    /// An IN the harness answered.
    In(u16),
    Shutdown,
}

fn exc(vec: u8, err: Option<u32>, sel: u16) -> Ev {
    Ev::Exc {
        vec,
        err,
        cr2: None,
        cs: sel,
    }
}
fn pf(err: u32, addr: u64, sel: u16) -> Ev {
    Ev::Exc {
        vec: 14,
        err: Some(err),
        cr2: Some(addr),
        cs: sel,
    }
}
fn vals(v: &[u64]) -> Vec<Ev> {
    v.iter().map(|&x| Ev::Val(x)).collect()
}

/// Called after each reported value with the vCPU.
type OnVal<'a> = &'a dyn Fn(u64, &mut dyn Vcpu);

/// Hooks the harness calls on exits the guest's protocol does not cover.
#[derive(Default)]
struct Hooks<'a> {
    /// Answer for IN from a port.
    input: Option<&'a dyn Fn(u16) -> u64>,
    /// Called after each reported value with the vCPU (to request windows, inject...).
    on_val: Option<OnVal<'a>>,
    /// Vector to inject when an interrupt window opens.
    on_window: Option<u8>,
}

struct Outcome {
    events: Vec<Ev>,
    vcpu: Box<dyn Vcpu>,
}

fn run(g: &Guest) -> Outcome {
    run_with(g, Hooks::default())
}

fn run_with(g: &Guest, hooks: Hooks) -> Outcome {
    let (out, error) = try_run(g, hooks);
    if let Some(e) = error {
        panic!("emulator error: {e}; events so far: {:?}", out.events);
    }
    out
}

/// Run until HLT, shutdown or an emulator error (returned with the events before it).
fn try_run(g: &Guest, hooks: Hooks) -> (Outcome, Option<String>) {
    let backend = EmuBackend::default();
    backend.map_memory(&g.mem).unwrap();
    let mut vcpu = backend.create_vcpu(0).unwrap();
    vcpu.set_state(&g.state).unwrap();
    let kick = vcpu.kick_flag().expect("the emulator has a kick flag");
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (kick, done) = (kick.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20));
                kick.store(true, Ordering::Release);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut events = Vec::new();
    let mut pending: Option<(u8, Option<u32>, Option<u64>)> = None;
    let mut exits = 0u64;
    let mut error = None;
    let finish = |done: &AtomicBool| done.store(true, Ordering::Release);
    loop {
        exits += 1;
        if Instant::now() > deadline || exits > 1_000_000 {
            finish(&done);
            let tail = &events[events.len().saturating_sub(40)..];
            panic!(
                "guest did not finish (RIP {:#x}); last events: {tail:?}",
                vcpu.rip()
            );
        }
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        };
        match exit {
            Exit::IoOut { port, data } => {
                let mut b = [0u8; 8];
                b[..data.as_slice().len()].copy_from_slice(data.as_slice());
                let v = u64::from_le_bytes(b);
                match port {
                    P_VAL => {
                        events.push(Ev::Val(v));
                        if let Some(f) = hooks.on_val {
                            f(v, vcpu.as_mut());
                        }
                    }
                    P_VEC => pending = Some((v as u8, None, None)),
                    P_ERR => {
                        pending.as_mut().expect("error code without vector").1 = Some(v as u32)
                    }
                    // The low half, then (64-bit handlers) the high half.
                    P_CR2 => {
                        let p = &mut pending.as_mut().expect("CR2 without vector").2;
                        *p = Some(p.map_or(v, |lo| lo | v << 32));
                    }
                    P_CS => {
                        let (vec, err, addr) = pending.take().expect("CS without vector");
                        events.push(Ev::Exc {
                            vec,
                            err,
                            cr2: addr,
                            cs: v as u16,
                        });
                    }
                    _ => events.push(Ev::Out(port, v)),
                }
            }
            Exit::IoIn { port, .. } => {
                events.push(Ev::In(port));
                let v = hooks.input.map(|f| f(port)).unwrap_or(0);
                vcpu.complete_read(&v.to_le_bytes());
            }
            Exit::Hlt => {
                let flags = vcpu.regs().unwrap().rflags;
                assert_eq!(
                    flags & 0x200,
                    0,
                    "HLT with interrupts enabled; events: {events:?}"
                );
                break;
            }
            Exit::Shutdown => {
                events.push(Ev::Shutdown);
                break;
            }
            Exit::Interrupted => {}
            Exit::IrqWindowOpen => {
                let v = hooks.on_window.expect("unexpected interrupt window");
                assert!(vcpu.can_inject());
                vcpu.inject_interrupt(v).unwrap();
            }
            other => {
                finish(&done);
                panic!("unexpected exit {other:?}; events so far: {events:?}");
            }
        }
    }
    finish(&done);
    watchdog.join().unwrap();
    (Outcome { events, vcpu }, error)
}

// ---- real mode and unreal mode ----------------------------------------------------------------

/// Real-mode setup: flat real segments at 0, the kernel stack.
fn real_init(a: &mut Asm) -> AsmResult {
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, KSTACK as u32)
}

/// Real mode: INT n through the IVT, exceptions through the IVT (no error codes), and the
/// 64 KiB segment limits real mode still checks (#GP for data, #SS for the stack segment).
#[test]
fn real_mode_ivt_and_segment_limits() {
    let g = Guest::new();
    g.ivt();
    // INT 0x21 handler: report the FLAGS image it got and return.
    let h = g.code(16, CODE2, &|a| {
        a.mov(bp, sp)?;
        a.mov(ax, word_ptr(bp + 4))?; // FLAGS
        a.and(ax, 0x0001)?; // CF as set by the caller
        a.or(ax, 0x2100)?;
        a.out(u32::from(P_VAL), ax)?;
        a.iret()
    });
    g.w16(0x21 * 4, h.ip as u16);
    g.w16(0x21 * 4 + 2, 0);
    g.code(16, REAL, &|a| {
        real_init(a)?;
        a.val(0x1111)?;
        a.stc()?;
        a.int(0x21)?;
        a.val(0x2222)?;
        // #DE
        a.probe16(|a| {
            a.xor(dx, dx)?;
            a.mov(ax, 1u32)?;
            a.xor(cx, cx)?;
            a.div(cx)
        })?;
        // A 32-bit address past DS's 64 KiB limit: #GP (vector 13, no error code in real mode).
        a.probe16(|a| {
            a.mov(ebx, 0xfffeu32)?;
            a.mov(eax, dword_ptr(ebx))
        })?;
        // A word at 0xffff straddles the limit.
        a.probe16(|a| a.mov(ax, word_ptr(0xffffu16)))?;
        // Through BP the default segment is SS: #SS.
        a.probe16(|a| {
            a.mov(bp, 0xffffu32)?;
            a.mov(ax, word_ptr(bp))
        })?;
        a.probe16(|a| a.ud2())?;
        a.val(0x3333)?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x1111),
            Ev::Val(0x2101),
            Ev::Val(0x2222),
            exc(0, None, 0),
            exc(13, None, 0),
            exc(13, None, 0),
            exc(12, None, 0),
            exc(6, None, 0),
            Ev::Val(0x3333),
        ]
    );
}

/// Real -> 16-bit protected mode (load a 4 GiB DS) -> real mode: DS keeps its 4 GiB limit
/// ("unreal mode") even after a real-mode reload of the selector; ES keeps its 64 KiB.
#[test]
fn unreal_mode() {
    let g = Guest::new();
    g.ivt();
    g.code(16, REAL, &|a| {
        real_init(a)?;
        a.probe16(|a| {
            a.mov(ebx, 0x10_0000u32)?;
            a.mov(eax, dword_ptr(ebx))
        })?;
        a.lgdt(ptr(GDTR as u16))?;
        a.mov(eax, cr0)?;
        a.or(al, 1)?;
        a.mov(cr0, eax)?;
        a.jmp_far_to(CODE16, "pm16")?;
        a.here("pm16")?;
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ds, ax)?;
        // Report CS of 16-bit protected mode.
        a.mov(ax, cs)?;
        a.out(u32::from(P_VAL), ax)?;
        a.mov(eax, cr0)?;
        a.and(al, 0xfe)?;
        a.mov(cr0, eax)?;
        a.jmp_far_to(0, "real2")?;
        a.here("real2")?;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(ebx, 0x10_0000u32)?;
        a.mov(dword_ptr(ebx), 0xcafe_babeu32)?;
        a.mov(eax, dword_ptr(ebx + 4))?;
        a.out(u32::from(P_VAL), eax)?;
        a.mov(eax, dword_ptr(ebx))?;
        a.out(u32::from(P_VAL), eax)?;
        a.mov(eax, cr0)?;
        a.and(eax, 1)?;
        a.out(u32::from(P_VAL), eax)?;
        a.probe16(|a| a.mov(eax, dword_ptr(ebx).es()))?;
        a.hlt()
    });
    g.w32(0x10_0004, 0x1234_5678);
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            exc(13, None, 0),
            Ev::Val(u64::from(CODE16)),
            Ev::Val(0x1234_5678),
            Ev::Val(0xcafe_babe),
            Ev::Val(0),
            exc(13, None, 0),
        ]
    );
    assert_eq!(g.r32(0x10_0000), 0xcafe_babe);
}

// ---- 32- and 16-bit protected mode ----------------------------------------------------------------

fn insn(a: &mut Asm, code: iced_x86::Code) -> AsmResult {
    a.add_instruction(iced_x86::Instruction::with(code))
}

/// Protected-mode segmentation: byte-granular limits, expand-down segments, type checks
/// (read-only data, execute-only code, writes to code), null selectors, not-present
/// descriptors, selectors past the GDT limit, SS loads and #SS, and the CS limit.
#[test]
fn protected_mode_segment_limits_and_types() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let small = FREE; // base DATA, limit 0xfff, byte granular
    let down = FREE + 8; // expand-down, limit 0x1fff, B=1
    let ro = FREE + 0x10; // read-only data
    let xo = FREE + 0x18; // execute-only code
    let absent = FREE + 0x20; // not present
    let stack = FREE + 0x28; // stack, base DATA, limit 0xfff
    let tiny_code = FREE + 0x30; // code at CODE3, limit 0xf
    let absent_stack = FREE + 0x38; // writable data, not present
    let down16 = FREE + 0x40; // expand-down, limit 0xfff, B=0: offsets 0x1000-0xffff
    g.set_desc(small, desc(DATA as u32, 0xfff, 0x92, 0x4));
    g.set_desc(down, desc(0, 0x1fff, 0x96, 0x4));
    g.set_desc(ro, desc(0, 0xfffff, 0x90, 0xc));
    g.set_desc(xo, desc(0, 0xfffff, 0x98, 0xc));
    g.set_desc(absent, desc(0, 0xfffff, 0x12, 0xc));
    g.set_desc(stack, desc(DATA as u32, 0xfff, 0x92, 0x4));
    g.set_desc(tiny_code, desc(CODE3 as u32, 0xf, 0x9a, 0x4));
    g.set_desc(absent_stack, desc(0, 0xfffff, 0x12, 0xc));
    g.set_desc(down16, desc(0, 0xfff, 0x96, 0));
    g.w32(DATA + 0xffc, 0xaabb_ccdd);
    g.w32(DATA + 0x1000, 0x600d);
    g.write(CODE3, &[0x90; 64]);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.val(1)?;
        a.mov(ax, u32::from(small))?;
        a.mov(ds, ax)?;
        a.mov(eax, dword_ptr(0xffcu32))?;
        a.rep_eax()?;
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ds, ax)?;
        // The last dword of a 4 KiB segment is fine; one byte further is not.
        a.probe32(|a| {
            a.mov(ax, u32::from(small))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr(0xffdu32))
        })?;
        // Expand-down: offsets at or below the limit fault, above it they are fine.
        a.probe32(|a| {
            a.mov(ax, u32::from(down))?;
            a.mov(es, ax)?;
            a.mov(eax, dword_ptr(0x1ffcu32).es())
        })?;
        a.mov(ax, u32::from(down))?;
        a.mov(es, ax)?;
        a.mov(eax, dword_ptr((DATA + 0x1000) as u32).es())?;
        a.rep_eax()?;
        // Read-only data: reads work, writes #GP(0).
        a.probe32(|a| {
            a.mov(ax, u32::from(ro))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr((DATA + 0xffc) as u32))?;
            a.rep_eax()?;
            a.mov(dword_ptr(DATA as u32), eax)
        })?;
        // Execute-only code into DS: #GP(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(xo))?;
            a.mov(ds, ax)
        })?;
        // Not present: #NP(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(absent))?;
            a.mov(ds, ax)
        })?;
        // Past the GDT limit: #GP(selector).
        a.probe32(|a| {
            a.mov(ax, 0x400u32)?;
            a.mov(ds, ax)
        })?;
        // SS with RPL != CPL: #GP(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(KDATA | 3))?;
            a.mov(ss, ax)
        })?;
        // A stack reference past SS's limit: #SS(0) (the frame still fits the stack).
        a.probe32(|a| {
            a.mov(ax, u32::from(stack))?;
            a.mov(ss, ax)?;
            a.mov(esp, 0x800u32)?;
            a.mov(ebp, 0x2000u32)?;
            a.mov(eax, dword_ptr(ebp))
        })?;
        // A null DS: loading it is fine, using it is #GP(0).
        a.probe32(|a| {
            a.xor(eax, eax)?;
            a.mov(ds, ax)?;
            a.val(2)?;
            a.mov(eax, dword_ptr(DATA as u32))
        })?;
        // A readable code segment in DS: reads work, writes #GP(0).
        a.probe32(|a| {
            a.mov(ax, u32::from(KCODE32))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr((DATA + 0xffc) as u32))?;
            a.rep_eax()?;
            a.mov(dword_ptr(DATA as u32), eax)
        })?;
        // A not-present stack segment: #SS(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(absent_stack))?;
            a.mov(ss, ax)
        })?;
        // A 16-bit expand-down segment ends at 0xffff.
        a.probe32(|a| {
            a.mov(ax, u32::from(down16))?;
            a.mov(es, ax)?;
            a.mov(eax, dword_ptr(0xfffcu32).es())?;
            a.val(4)?;
            a.mov(eax, dword_ptr(0xfffeu32).es())
        })?;
        // Running off the end of a 16-byte code segment: #GP(0) with CS = that segment.
        a.probe32(|a| a.jmp_far(tiny_code, 0))?;
        a.val(3)?;
        a.hlt()
    });
    let out = run(&g);
    let c = KCODE32;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(1),
            Ev::Val(0xaabb_ccdd),
            exc(13, Some(0), c),
            exc(13, Some(0), c),
            Ev::Val(0x600d),
            Ev::Val(0xaabb_ccdd),
            exc(13, Some(0), c),
            exc(13, Some(u32::from(xo)), c),
            exc(11, Some(u32::from(absent)), c),
            exc(13, Some(0x400), c),
            exc(13, Some(u32::from(KDATA)), c),
            exc(12, Some(0), c),
            Ev::Val(2),
            exc(13, Some(0), c),
            Ev::Val(0xaabb_ccdd),
            exc(13, Some(0), c),
            exc(12, Some(u32::from(absent_stack)), c),
            Ev::Val(4),
            exc(13, Some(0), c),
            exc(13, Some(0), tiny_code),
            Ev::Val(3),
        ]
    );
}

/// 16-bit protected mode: a 16-bit code segment called from 32-bit code (2-byte pushes),
/// a 286 interrupt gate (16-bit frame, 16-bit IRET), a 16-bit data segment's limit, and an
/// exception in 16-bit code delivered to a 32-bit handler.
#[test]
fn protected_mode_16bit_code() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.w16(0xfffe, 0xbeef);
    let c16 = g.code(16, CODE2, &|a| {
        a.here("entry")?;
        a.mov(ecx, esp)?;
        a.push(ax)?;
        a.sub(ecx, esp)?;
        a.mov(eax, ecx)?;
        a.rep_eax()?;
        a.pop(ax)?;
        a.int(0x40)?;
        a.here("after_int")?;
        a.mov(ax, u32::from(DATA16))?;
        a.mov(ds, ax)?;
        a.mov(ax, word_ptr(0xfffeu16))?;
        a.out(u32::from(P_VAL), ax)?;
        insn(a, iced_x86::Code::Retfd)?;
        // 16-bit interrupt handler: the frame is IP, CS, FLAGS as words.
        a.here("h16")?;
        a.mov(bp, sp)?;
        a.mov(ax, word_ptr(bp + 2))?;
        a.out(u32::from(P_VAL), ax)?;
        a.mov(ax, word_ptr(bp))?;
        a.out(u32::from(P_VAL), ax)?;
        a.iret()?;
        a.here("fault")?;
        a.mov(ax, u32::from(DATA16))?;
        a.mov(ds, ax)?;
        a.mov(ax, word_ptr(0xffffu16))
    });
    g.set_gate32(0x40, gate(CODE16, c16["h16"] as u32, 0x6, 0, 0));
    let (entry, fault) = (c16["entry"] as u32, c16["fault"] as u32);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.call_far(CODE16, entry)?;
        a.val(0x32)?;
        a.probe32(|a| a.call_far(CODE16, fault))?;
        a.hlt()
    });
    let out = run(&g);
    let int_ret = c16["after_int"];
    assert_eq!(
        out.events,
        vec![
            Ev::Val(2),
            Ev::Val(u64::from(CODE16)),
            Ev::Val(int_ret),
            Ev::Val(0xbeef),
            Ev::Val(0x32),
            exc(13, Some(0), CODE16),
        ]
    );
}

// ---- privilege transitions --------------------------------------------------------------------

const EFLAGS_IOPL3: u32 = 0x3002;
const EFLAGS_IOPL0: u32 = 0x0002;

/// CPL/DPL/RPL: data-segment loads at CPL 0 and 3, IRET to ring 3 (DS/ES with DPL 0 become
/// null), INT n through a DPL-3 interrupt gate with the stack switch to the TSS's SS0:ESP0
/// and back with IRET, INT n through a DPL-0 gate, and the instructions ring 3 may not use.
#[test]
fn privilege_levels_and_tss_stack_switch() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    g.w32(DATA, 0x5a5a);
    let user = g.code(32, CODE2, &|a| {
        a.here("u1")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.mov(eax, ds)?;
        a.rep_eax()?;
        a.mov(eax, dword_ptr(DATA as u32))?; // DS is null: #GP(0)
        a.here("u2")?;
        a.int(0x31)?;
        a.val(0x31)?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.int(0x30)?;
        a.here("u3")?;
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ds, ax)?;
        a.here("u4")?;
        a.mov(ax, u32::from(UDATA | 3))?;
        a.mov(ds, ax)?;
        a.mov(eax, dword_ptr(DATA as u32))?;
        a.rep_eax()?;
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ss, ax)?;
        a.here("u5")?;
        a.mov(eax, cr0)?;
        a.here("u6")?;
        a.hlt()?;
        a.here("u7")?;
        a.cli()?;
        a.here("u8")?;
        a.call_far(KCODE32, PM32 as u32)
    });
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        // LTR marked the TSS busy: loading it again is #GP(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(TSS_SEL))?;
            a.ltr(ax)
        })?;
        // Ring 0 may load a DPL-3 segment with RPL 3, but not a DPL-0 one with RPL 3.
        a.probe32(|a| {
            a.mov(ax, u32::from(UDATA | 3))?;
            a.mov(ds, ax)?;
            a.mov(eax, ds)?;
            a.rep_eax()?;
            a.mov(ax, u32::from(KDATA | 3))?;
            a.mov(ds, ax)
        })?;
        let u1 = user["u1"] as u32;
        a.probe32(|a| a.iret_user32(u1, EFLAGS_IOPL3))?;
        for u in ["u2", "u3", "u4", "u5", "u6"] {
            let entry = user[u] as u32;
            a.probe32(|a| a.enter_user32(entry, EFLAGS_IOPL3))?;
        }
        // With IOPL 0, CLI is privileged too.
        let (u7, u8_) = (user["u7"] as u32, user["u8"] as u32);
        a.probe32(|a| a.enter_user32(u7, EFLAGS_IOPL0))?;
        a.probe32(|a| a.enter_user32(u8_, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()?;
        // INT 0x31 handler (DPL 3 interrupt gate): report the frame and the new stack.
        a.here("h31")?;
        for off in [4, 12, 16] {
            a.mov(eax, dword_ptr(esp + off))?;
            a.rep_eax()?;
        }
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.and(eax, 0x200)?;
        a.rep_eax()?;
        a.iretd()
    });
    let h31 = k["h31"] as u32;
    g.set_gate32(0x31, gate(KCODE32, h31, 0xe, 3, 0));
    g.set_gate32(0x30, gate(KCODE32, h31, 0xe, 0, 0));
    let out = run(&g);
    let (uc, us) = (u64::from(UCODE32 | 3), u64::from(UDATA | 3));
    let ucs = UCODE32 | 3;
    assert_eq!(
        out.events,
        vec![
            exc(13, Some(u32::from(TSS_SEL)), KCODE32),
            Ev::Val(us),
            exc(13, Some(u32::from(KDATA)), KCODE32),
            // u1: ring 3 with the stack IRET gave it; DS (DPL 0) was nulled by the IRET.
            Ev::Val(uc),
            Ev::Val(us),
            Ev::Val(USTACK),
            Ev::Val(0),
            exc(13, Some(0), ucs),
            // u2: INT 0x31 switches to SS0:ESP0 and pushes SS, ESP, EFLAGS, CS, EIP.
            Ev::Val(uc),
            Ev::Val(USTACK),
            Ev::Val(us),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(STACK0 - 20),
            Ev::Val(0),
            Ev::Val(0x31),
            Ev::Val(USTACK),
            // INT 0x30's gate has DPL 0: #GP(vector * 8 + 2).
            exc(13, Some(0x30 * 8 + 2), ucs),
            // u3: ring 3 loading a DPL-0 data segment.
            exc(13, Some(u32::from(KDATA)), ucs),
            // u4: its own data segment is fine; a DPL-0 SS is not.
            Ev::Val(0x5a5a),
            exc(13, Some(u32::from(KDATA)), ucs),
            // u5-u8: MOV from CR0, HLT, CLI with IOPL 0, a far call to a DPL-0 segment.
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(u32::from(KCODE32)), ucs),
            Ev::Val(0xd0e),
        ]
    );
    assert_eq!(
        g.r64(GDT + u64::from(TSS_SEL)) >> 40 & 0xf,
        0xb,
        "the TSS is busy"
    );
    assert_eq!(
        g.r64(GDT + u64::from(UDATA)) >> 40 & 1,
        1,
        "DS loads set the accessed bit"
    );
    assert_eq!(
        g.r64(GDT + u64::from(UCODE32)) >> 40 & 1,
        1,
        "IRET sets CS's accessed bit"
    );
}

/// Conforming code segments: ring 3 calls into a DPL-0 conforming segment and keeps CPL 3
/// (CS.RPL = 3, no stack switch); a readable conforming segment may be loaded into DS at
/// any privilege; a DPL-3 conforming segment cannot be entered from ring 0; a
/// non-conforming DPL-0 segment cannot be jumped to from ring 3.
#[test]
fn conforming_code_segments() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let conf0 = FREE;
    let conf3 = FREE + 8;
    g.set_desc(conf0, desc(0, 0xfffff, 0x9e, 0xc));
    g.set_desc(conf3, desc(0, 0xfffff, 0xfe, 0xc));
    g.w32(DATA, 0x1234);
    let f = g.code(32, CODE3, &|a| {
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.retf()
    });
    let user = g.code(32, CODE2, &|a| {
        a.call_far(conf0, f.ip as u32)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(ax, u32::from(conf0))?;
        a.mov(ds, ax)?;
        a.mov(eax, dword_ptr(DATA as u32))?;
        a.rep_eax()?;
        a.jmp_far(KCODE32, PM32 as u32)
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        let u = user.ip as u32;
        a.probe32(|a| a.enter_user32(u, EFLAGS_IOPL3))?;
        let fip = f.ip as u32;
        a.probe32(|a| a.call_far(conf3, fip))?;
        // Ring 0 calling its own conforming segment: CPL stays 0.
        a.call_far(conf0, fip)?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let (uc, us) = (u64::from(UCODE32 | 3), u64::from(UDATA | 3));
    assert_eq!(
        out.events,
        vec![
            Ev::Val(u64::from(conf0 | 3)),
            Ev::Val(us),
            Ev::Val(USTACK - 8),
            Ev::Val(uc),
            Ev::Val(0x1234),
            exc(13, Some(u32::from(KCODE32)), UCODE32 | 3),
            exc(13, Some(u32::from(conf3)), KCODE32),
            Ev::Val(u64::from(conf0)),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(KSTACK - 8),
            Ev::Val(0xd0e),
        ]
    );
}

/// A call gate from ring 3 to ring 0: the stack switches to the TSS's SS0:ESP0, the old
/// SS:ESP and the gate's parameter count of dwords are copied, RETF n returns to ring 3 and
/// releases the parameters; a DPL-0 gate is #GP(gate selector) from ring 3.
#[test]
fn call_gate_with_parameters_and_stack_switch() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let gate3 = FREE;
    let gate0 = FREE + 8;
    let user = g.code(32, CODE2, &|a| {
        a.push(0x1111u32)?;
        a.push(0x2222u32)?;
        a.mov(ebx, esp)?;
        a.call_far(gate3 | 3, 0xdead)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.sub(eax, ebx)?;
        a.rep_eax()?;
        a.call_far(gate0 | 3, 0)
    });
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        let u = user.ip as u32;
        a.probe32(|a| a.enter_user32(u, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("gate_fn")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        for off in [8, 12, 16, 20] {
            a.mov(eax, dword_ptr(esp + off))?;
            a.rep_eax()?;
        }
        a.retf_1(8)
    });
    g.set_desc(gate3, gate(KCODE32, k["gate_fn"] as u32, 0xc, 3, 2));
    g.set_desc(gate0, gate(KCODE32, k["gate_fn"] as u32, 0xc, 0, 2));
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(u64::from(KCODE32)),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(STACK0 - 24),
            Ev::Val(0x2222),
            Ev::Val(0x1111),
            Ev::Val(USTACK - 8),
            Ev::Val(u64::from(UDATA | 3)),
            Ev::Val(u64::from(UCODE32 | 3)),
            Ev::Val(u64::from(UDATA | 3)),
            Ev::Val(8),
            exc(13, Some(u32::from(gate0)), UCODE32 | 3),
            Ev::Val(0xd0e),
        ]
    );
}

/// Interrupt gates clear IF, trap gates keep it; IRET restores it. INT n past the IDT limit
/// is #GP(vector * 8 + 2); a not-present gate is #NP(vector * 8 + 2); an exception whose
/// gate is not present reports EXT (bit 0) in the #NP error code.
#[test]
fn interrupt_and_trap_gates() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.sti()?;
        a.int(0x32)?;
        a.int(0x33)?;
        a.pushfd()?;
        a.pop(eax)?;
        a.and(eax, 0x200)?;
        a.rep_eax()?;
        a.cli()?;
        a.probe32(|a| a.int(0x34))?;
        // Shrink the IDT to 0x40 entries: INT 0x50 is past its limit.
        a.mov(word_ptr(VARS as u32), 0x40 * 8 - 1)?;
        a.mov(dword_ptr((VARS + 2) as u32), IDT as u32)?;
        a.lidt(ptr(VARS as u32))?;
        a.probe32(|a| a.int(0x50))?;
        // #UD's gate is not present: #NP(6 * 8 + 2 + EXT).
        a.mov(byte_ptr((IDT + 6 * 8 + 5) as u32), 0x0e)?;
        a.probe32(|a| a.ud2())?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("h")?;
        a.pushfd()?;
        a.pop(eax)?;
        a.and(eax, 0x200)?;
        a.rep_eax()?;
        a.iretd()
    });
    let h = k["h"] as u32;
    g.set_gate32(0x32, gate(KCODE32, h, 0xf, 0, 0));
    g.set_gate32(0x33, gate(KCODE32, h, 0xe, 0, 0));
    g.set_gate32(0x34, gate(KCODE32, h, 0xe, 0, 0) & !(1 << 47));
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x200),
            Ev::Val(0),
            Ev::Val(0x200),
            exc(11, Some(0x34 * 8 + 2), KCODE32),
            exc(13, Some(0x50 * 8 + 2), KCODE32),
            exc(11, Some(6 * 8 + 2 + 1), KCODE32),
            Ev::Val(0xd0e),
        ]
    );
}

// ---- paging ----------------------------------------------------------------------------------------

const CR0_PG: u32 = 0x8000_0000;
const CR0_WP: u32 = 0x1_0000;
const EFER: u32 = 0xc000_0080;

fn enable_paging32(a: &mut Asm, root: u32) -> AsmResult {
    a.mov(eax, root)?;
    a.mov(cr3, eax)?;
    a.mov(eax, cr0)?;
    a.or(eax, CR0_PG as i32)?;
    a.mov(cr0, eax)
}

/// Report the dword at `addr`, masked.
fn report_mem(a: &mut Asm, addr: u64, mask: u32) -> AsmResult {
    a.mov(eax, dword_ptr(addr as u32))?;
    a.and(eax, mask as i32)?;
    a.rep_eax()
}

/// 32-bit paging: accessed and dirty bits in the PDE/PTE, not-present/write/user faults with
/// their error codes and CR2, CR0.WP, a remapping made visible with INVLPG, a 4 MiB PSE page
/// (with its own A/D bits) and a reserved bit in a PSE PDE.
#[test]
fn paging_32bit() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let root = g.paging32();
    let pte = |page: u64, flags: u64| g.w32(pte32(page), (page | flags) as u32);
    pte(DATA, P | RW | US);
    pte(DATA + 0x1000, 0);
    pte(DATA + 0x2000, P | US);
    pte(DATA + 0x3000, P | RW);
    pte(DATA + 0x4000, P | US);
    pte(DATA + 0x7000, P | RW);
    g.w32(DATA, 0x1111);
    g.w32(DATA + 0x4000, 0x4444);
    g.w32(DATA + 0x5000, 0x5555);
    g.w32(DATA + 0x6000, 0x6666);
    g.write(DATA + 0x7000, &[0xc3]);
    let user = g.code(32, CODE2, &|a| {
        a.here("u1")?;
        a.mov(eax, dword_ptr((DATA + 0x3000) as u32))?;
        a.here("u2")?;
        a.mov(dword_ptr((DATA + 0x4000) as u32), 1)?;
        a.here("u3")?;
        a.mov(eax, dword_ptr((DATA + 0x1000) as u32))?;
        a.here("u4")?;
        a.mov(eax, dword_ptr((DATA + 0x4000) as u32))?;
        a.rep_eax()?;
        a.mov(eax, (DATA + 0x7000) as u32)?;
        a.jmp(eax)
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        enable_paging32(a, root)?;
        report_mem(a, pte32(DATA), 0xffff_ffff)?;
        report_mem(a, DATA, 0xffff_ffff)?;
        report_mem(a, pte32(DATA), 0xffff_ffff)?;
        report_mem(a, PD32, 0x60)?;
        a.mov(dword_ptr(DATA as u32), 0x2222)?;
        report_mem(a, pte32(DATA), 0xffff_ffff)?;
        // Not present: read, then write.
        a.probe32(|a| a.mov(eax, dword_ptr((DATA + 0x1004) as u32)))?;
        a.probe32(|a| a.mov(dword_ptr((DATA + 0x1008) as u32), 1))?;
        // A read-only page: supervisor writes pass with WP=0 and fault with WP=1.
        a.mov(dword_ptr((DATA + 0x2000) as u32), 5)?;
        report_mem(a, DATA + 0x2000, 0xffff_ffff)?;
        a.mov(eax, cr0)?;
        a.or(eax, CR0_WP as i32)?;
        a.mov(cr0, eax)?;
        a.probe32(|a| a.mov(dword_ptr((DATA + 0x2010) as u32), 6))?;
        // Ring 3: a supervisor page, a read-only page, a not-present page, a fetch from a
        // supervisor page.
        for u in ["u1", "u2", "u3", "u4"] {
            let entry = user[u] as u32;
            a.probe32(|a| a.enter_user32(entry, EFLAGS_IOPL3))?;
        }
        // Remap DATA+0x5000 to DATA+0x6000; INVLPG makes it visible.
        report_mem(a, DATA + 0x5000, 0xffff_ffff)?;
        a.mov(
            dword_ptr(pte32(DATA + 0x5000) as u32),
            ((DATA + 0x6000) | P | RW | US) as u32,
        )?;
        a.invlpg(ptr((DATA + 0x5000) as u32))?;
        report_mem(a, DATA + 0x5000, 0xffff_ffff)?;
        // PSE: PDE 1 maps 4-8 MiB onto 0-4 MiB; PDE 2 has reserved bit 21 set.
        a.mov(eax, cr4)?;
        a.or(eax, 0x10)?;
        a.mov(cr4, eax)?;
        a.mov(dword_ptr((PD32 + 4) as u32), (P | RW | US | PS) as u32)?;
        a.mov(
            dword_ptr((PD32 + 8) as u32),
            (0x80_0000 | (1 << 21) | P | RW | US | PS) as u32,
        )?;
        report_mem(a, 0x40_0000 + DATA, 0xffff_ffff)?;
        report_mem(a, PD32 + 4, 0xffff_ffff)?;
        a.mov(dword_ptr((0x40_0000 + DATA + 8) as u32), 8)?;
        report_mem(a, PD32 + 4, 0xffff_ffff)?;
        a.probe32(|a| a.mov(eax, dword_ptr(0x80_0010u32)))?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let ucs = UCODE32 | 3;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(DATA | 7),
            Ev::Val(0x1111),
            Ev::Val(DATA | 0x27),
            Ev::Val(0x20),
            Ev::Val(DATA | 0x67),
            pf(0, DATA + 0x1004, KCODE32),
            pf(2, DATA + 0x1008, KCODE32),
            Ev::Val(5),
            pf(3, DATA + 0x2010, KCODE32),
            pf(5, DATA + 0x3000, ucs),
            pf(7, DATA + 0x4000, ucs),
            pf(4, DATA + 0x1000, ucs),
            Ev::Val(0x4444),
            pf(5, DATA + 0x7000, ucs),
            Ev::Val(0x5555),
            Ev::Val(0x6666),
            Ev::Val(0x2222),
            Ev::Val(0xa7),
            Ev::Val(0xe7),
            pf(9, 0x80_0010, KCODE32),
            Ev::Val(0xd0e),
        ]
    );
    // The host sees the same bits.
    assert_eq!(g.r32(pte32(DATA + 0x2000)) & 0x60, 0x60);
    assert_eq!(
        g.r32(pte32(DATA + 0x1000)),
        (DATA + 0x1000) as u32,
        "a not-present PTE is left alone"
    );
}

/// PAE paging with EFER.NXE: an instruction fetch from an NX page (error code with I), a
/// reserved physical-address bit in a PTE (RSVD, for reads and writes), a 2 MiB page with its
/// A/D bits, and NX becoming a reserved bit once NXE is cleared.
#[test]
fn paging_pae_nx_and_reserved_bits() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.paging64();
    g.pae_pdpt();
    let pte = |page: u64, flags: u64| g.w64(pte64(page), page | flags);
    pte(DATA + 0x7000, P | RW | NX);
    pte(DATA + 0x8000, P | RW | (1 << 45));
    g.write(DATA + 0x7000, &[0xc3]);
    g.w32(DATA, 0x77);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(ecx, EFER)?;
        a.rdmsr()?;
        a.or(eax, 0x800)?;
        a.wrmsr()?;
        enable_paging32(a, PDPT as u32)?;
        report_mem(a, DATA + 0x7000, 0xff)?;
        a.probe32(|a| {
            a.mov(eax, (DATA + 0x7000) as u32)?;
            a.call(eax)
        })?;
        a.probe32(|a| a.mov(eax, dword_ptr((DATA + 0x8004) as u32)))?;
        a.probe32(|a| a.mov(dword_ptr((DATA + 0x8008) as u32), 1))?;
        // PDE 1: a 2 MiB page mapping 2-4 MiB onto 0-2 MiB.
        a.mov(dword_ptr((PD + 8) as u32), (P | RW | PS) as u32)?;
        report_mem(a, 0x20_0000 + DATA, 0xffff_ffff)?;
        report_mem(a, PD + 8, 0xfff)?;
        a.mov(dword_ptr((0x20_0000 + DATA + 4) as u32), 1)?;
        report_mem(a, PD + 8, 0xfff)?;
        report_mem(a, pte64(DATA), 0xfff)?;
        report_mem(a, DATA, 0xffff_ffff)?;
        report_mem(a, pte64(DATA), 0xfff)?;
        report_mem(a, pte64(DATA) + 4, 0xffff_ffff)?;
        // Without NXE, bit 63 is reserved.
        a.mov(ecx, EFER)?;
        a.rdmsr()?;
        a.and(eax, !0x800)?;
        a.wrmsr()?;
        a.probe32(|a| a.mov(eax, dword_ptr((DATA + 0x7000) as u32)))?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let k = KCODE32;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0xc3),
            pf(0x11, DATA + 0x7000, k),
            pf(0x9, DATA + 0x8004, k),
            pf(0xb, DATA + 0x8008, k),
            Ev::Val(0x77),
            Ev::Val(0xa3),
            Ev::Val(0xe3),
            Ev::Val(0x07),
            Ev::Val(0x77),
            Ev::Val(0x27),
            Ev::Val(0),
            pf(0x9, DATA + 0x7000, k),
            Ev::Val(0xd0e),
        ]
    );
}

/// PAE paging loads the four PDPTEs when CR0.PG is set and on every CR3 load: a present PDPTE
/// with a reserved bit (here RW, which PAE PDPTEs do not have) makes that MOV #GP(0) and leaves
/// the register unchanged.
#[test]
fn paging_pae_pdpte_reserved_bits() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.paging64();
    g.pae_pdpt();
    let bad = PT_AREA + 0x6000;
    g.w64(bad, PD | P);
    g.w64(bad + 8, PD | P | RW);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, bad as u32)?;
        a.mov(cr3, eax)?;
        a.probe32(|a| {
            a.mov(eax, cr0)?;
            a.or(eax, CR0_PG as i32)?;
            a.mov(cr0, eax)
        })?;
        a.mov(eax, cr0)?;
        a.shr(eax, 31)?;
        a.rep_eax()?;
        enable_paging32(a, PDPT as u32)?;
        a.val(0x9a6e)?;
        a.probe32(|a| {
            a.mov(eax, bad as u32)?;
            a.mov(cr3, eax)
        })?;
        a.mov(eax, cr3)?;
        a.rep_eax()?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            exc(13, Some(0), KCODE32),
            Ev::Val(0),
            Ev::Val(0x9a6e),
            exc(13, Some(0), KCODE32),
            Ev::Val(PDPT),
        ]
    );
}

// ---- long mode ---------------------------------------------------------------------------------------

const EFER_SCE: u32 = 0x1;
const EFER_LME: u32 = 0x100;
const EFER_NXE: u32 = 0x800;

impl Guest {
    /// Real mode -> 32-bit protected mode -> long mode (4-level paging over [`Guest::paging64`]'s
    /// tables, EFER |= `efer`) -> 64-bit code at [`LM64`].
    fn boot_long(&self, efer_bits: u32) {
        self.boot_pm32();
        self.paging64();
        self.code(32, PM32, &|a| {
            pm32_init(a, false)?;
            a.mov(eax, cr4)?;
            a.or(eax, 0x20)?;
            a.mov(cr4, eax)?;
            a.mov(eax, PML4 as u32)?;
            a.mov(cr3, eax)?;
            a.mov(ecx, EFER)?;
            a.rdmsr()?;
            a.or(eax, (EFER_LME | efer_bits) as i32)?;
            a.wrmsr()?;
            a.mov(eax, cr0)?;
            a.or(eax, CR0_PG as i32)?;
            a.mov(cr0, eax)?;
            a.jmp_far(KCODE64, LM64 as u32)
        });
    }
}

/// 64-bit kernel prologue: data segments, stack, IDT, and (when `tss`) TR.
fn lm64_init(a: &mut Asm, tss: bool) -> AsmResult {
    a.mov(ax, u32::from(KDATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(rsp, KSTACK)?;
    a.lidt(ptr(IDTR))?;
    if tss {
        a.mov(ax, u32::from(TSS_SEL))?;
        a.ltr(ax)?;
    }
    Ok(())
}

/// Long mode: 64-bit operands and pushes, EFER.LMA, a far jump to compatibility mode (32-bit
/// code, 4-byte pushes) and back, an interrupt from compatibility mode through the 64-bit IDT
/// and IRETQ back, IST and same-level 16-byte stack alignment, non-canonical addresses, and
/// leaving long mode by clearing CR0.PG in compatibility mode.
#[test]
fn long_mode_64bit_and_compatibility() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    let (c1, c2) = (CODE2 as u32, CODE2 as u32 + 0x400);
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.shr(rax, 32)?;
        a.rep_eax()?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(ecx, EFER)?;
        a.rdmsr()?;
        a.and(eax, 0x500)?;
        a.rep_eax()?;
        a.mov(rcx, rsp)?;
        a.push(rax)?;
        a.sub(rcx, rsp)?;
        a.mov(eax, ecx)?;
        a.rep_eax()?;
        a.pop(rax)?;
        // To compatibility mode through a far pointer in memory (m16:32).
        a.mov(dword_ptr(VARS), c1)?;
        a.mov(word_ptr(VARS + 4), u32::from(KCODE32))?;
        a.jmp(fword_ptr(VARS))?;
        // Back in 64-bit mode.
        a.here("back64")?;
        a.val(0x64)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.probe64(|a| {
            a.mov(rax, 0x0000_8000_0000_0000u64)?;
            a.mov(rax, qword_ptr(rax))
        })?;
        a.probe64(|a| a.ud2())?;
        // IST 1, and a same-level interrupt on a misaligned stack.
        a.int(0x41)?;
        a.sub(rsp, 8)?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.int(0x42)?;
        a.add(rsp, 8)?;
        a.mov(dword_ptr(VARS), c2)?;
        a.mov(word_ptr(VARS + 4), u32::from(KCODE32))?;
        a.jmp(fword_ptr(VARS))?;
        a.here("h40")?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.rep_eax()?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.iretq()?;
        a.here("h41")?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.rep_eax()?;
        a.iretq()
    });
    let back64 = k["back64"] as u32;
    g.code(32, u64::from(c1), &|a| {
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(ecx, esp)?;
        a.push(eax)?;
        a.sub(ecx, esp)?;
        a.mov(eax, ecx)?;
        a.rep_eax()?;
        a.pop(eax)?;
        a.int(0x40)?;
        a.val(0xc0)?;
        a.jmp_far(KCODE64, back64)
    });
    // Leave long mode: paging off in compatibility mode clears EFER.LMA.
    g.code(32, u64::from(c2), &|a| {
        a.mov(eax, cr0)?;
        a.and(eax, !CR0_PG as i32)?;
        a.mov(cr0, eax)?;
        a.mov(ecx, EFER)?;
        a.rdmsr()?;
        a.and(eax, 0x500)?;
        a.rep_eax()?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.hlt()
    });
    g.set_gate64(0x40, gate64(KCODE64, k["h40"], 0xe, 0, 0));
    g.set_gate64(0x41, gate64(KCODE64, k["h41"], 0xe, 0, 1));
    g.set_gate64(0x42, gate64(KCODE64, k["h41"], 0xe, 0, 0));
    let out = run(&g);
    let misaligned = KSTACK - 8;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x1234_5678),
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(0x500),
            Ev::Val(8),
            // Compatibility mode.
            Ev::Val(u64::from(KCODE32)),
            Ev::Val(4),
            Ev::Val(u64::from(KCODE32)),
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(0xc0),
            // 64-bit mode again.
            Ev::Val(0x64),
            Ev::Val(u64::from(KCODE64)),
            exc(13, Some(0), KCODE64),
            exc(6, None, KCODE64),
            // IST 1 stack: 0x4f00 minus the 5-quadword frame.
            Ev::Val(0x4f00 - 40),
            Ev::Val(KSTACK),
            Ev::Val(misaligned),
            // Same level, no IST: RSP aligned down to 16 before the frame.
            Ev::Val((misaligned & !0xf) - 40),
            Ev::Val(misaligned),
            // Out of long mode.
            Ev::Val(0x100),
            Ev::Val(u64::from(KCODE32)),
        ]
    );
}

/// 4-level paging in long mode: A bits on every level, CR0.WP, ring-3 faults (supervisor
/// page, read-only page, NX page and fetch from a supervisor page: error codes with U and
/// I), a PS bit in a PML4E (reserved) and a non-canonical address from ring 3 (#GP(0)).
#[test]
fn paging_4level_user_faults() {
    let g = Guest::new();
    g.boot_long(EFER_NXE);
    g.idt64();
    g.tss64(0x4f00);
    let pte = |page: u64, flags: u64| g.w64(pte64(page), page | flags);
    pte(DATA + 0x3000, P | RW);
    pte(DATA + 0x4000, P | US);
    pte(DATA + 0x7000, P | RW | US | NX);
    g.write(DATA + 0x3000, &[0xc3]);
    g.write(DATA + 0x7000, &[0xc3]);
    // PML4 entry 1 (512 GiB) with the PS bit, which is reserved there.
    g.w64(PML4 + 8, PDPT | P | RW | US | PS);
    let user = g.code(64, CODE2, &|a| {
        a.here("u1")?;
        a.mov(rax, qword_ptr(DATA + 0x3000))?;
        a.here("u2")?;
        a.mov(dword_ptr(DATA + 0x4000), 1)?;
        a.here("u3")?;
        a.mov(rax, DATA + 0x7000)?;
        a.call(rax)?;
        a.here("u4")?;
        a.mov(rax, DATA + 0x3000)?;
        a.jmp(rax)?;
        a.here("u5")?;
        a.mov(rax, 0xffff_7000_0000_0000u64)?;
        a.mov(rax, qword_ptr(rax))?;
        a.here("u6")?;
        a.mov(rax, 0x80_0000_0000u64)?;
        a.mov(rax, qword_ptr(rax))
    });
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        for table in [PML4, PDPT, PD, pte64(DATA + 0x3000)] {
            report_mem(a, table, 0x20)?;
        }
        report_mem(a, DATA + 0x3000, 0xff)?;
        report_mem(a, pte64(DATA + 0x3000), 0x20)?;
        a.mov(dword_ptr(DATA + 0x4000), 5)?;
        a.mov(rax, cr0)?;
        a.or(eax, CR0_WP as i32)?;
        a.mov(cr0, rax)?;
        a.probe64(|a| a.mov(dword_ptr(DATA + 0x4000), 6))?;
        for u in ["u1", "u2", "u3", "u4", "u5", "u6"] {
            let entry = user[u] as u32;
            a.probe64(|a| a.enter_user64(entry, EFLAGS_IOPL3))?;
        }
        a.probe64(|a| {
            a.mov(rax, 0x80_0000_0000u64)?;
            a.mov(rax, qword_ptr(rax))
        })?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let u = UCODE64 | 3;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x20),
            Ev::Val(0x20),
            Ev::Val(0x20),
            Ev::Val(0),
            Ev::Val(0xc3),
            Ev::Val(0x20),
            pf(3, DATA + 0x4000, KCODE64),
            pf(5, DATA + 0x3000, u),
            pf(7, DATA + 0x4000, u),
            pf(0x15, DATA + 0x7000, u),
            pf(0x15, DATA + 0x3000, u),
            exc(13, Some(0), u),
            pf(0xd, 0x80_0000_0000, u),
            pf(9, 0x80_0000_0000, KCODE64),
            Ev::Val(0xd0e),
        ]
    );
    assert_eq!(g.r32(DATA + 0x4000), 5);
}

// ---- fast system calls --------------------------------------------------------------------------------

const STAR: u32 = 0xc000_0081;
const LSTAR: u32 = 0xc000_0082;
const FMASK: u32 = 0xc000_0084;
const SYSENTER_CS: u32 = 0x174;
const SYSENTER_ESP: u32 = 0x175;
const SYSENTER_EIP: u32 = 0x176;

fn wrmsr(a: &mut Asm, index: u32, value: u64) -> AsmResult {
    a.mov(ecx, index)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()
}

/// SYSCALL/SYSRET in long mode: CS/SS from STAR, RIP from LSTAR, RCX/R11 = return RIP and
/// RFLAGS, FMASK clears flags; SYSRETQ returns to 64-bit ring 3, SYSRETD to compatibility
/// mode; SYSRET from ring 3 is #GP(0); SYSCALL without EFER.SCE is #UD.
#[test]
fn syscall_sysret() {
    let g = Guest::new();
    g.boot_long(EFER_SCE);
    g.idt64();
    g.tss64(0x4f00);
    g.code(32, CODE3, &|a| {
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.hlt() // ring 3: #GP(0)
    });
    let user = g.code(64, CODE2, &|a| {
        a.here("u1")?;
        a.std()?;
        a.mov(eax, 42)?;
        a.syscall()?;
        a.here("ret1")?;
        a.mov(ebx, eax)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, ebx)?;
        a.rep_eax()?;
        a.pushfq()?;
        a.pop(rax)?;
        a.and(eax, 0x400)?;
        a.rep_eax()?;
        a.cld()?;
        // Second call: the kernel returns with SYSRETD to compatibility mode.
        a.mov(eax, 43)?;
        a.syscall()?;
        a.here("u2")?;
        a.sysretq()
    });
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        wrmsr(
            a,
            STAR,
            (u64::from(UCODE32) << 48) | (u64::from(KCODE64) << 32),
        )?;
        wrmsr(a, LSTAR, LM64 + 0x800)?;
        wrmsr(a, FMASK, 0x400)?;
        let (u1, u2) = (user["u1"] as u32, user["u2"] as u32);
        a.probe64(|a| a.enter_user64(u1, EFLAGS_IOPL3))?;
        a.probe64(|a| a.enter_user64(u2, EFLAGS_IOPL3))?;
        // Without SCE.
        wrmsr(a, EFER, u64::from(EFER_LME | 0x400))?;
        a.probe64(|a| a.syscall())?;
        a.val(0xd0e)?;
        a.hlt()
    });
    assert!(k.bytes.len() < 0x800);
    let entry = assemble(64, LM64 + 0x800, &|a| {
        a.mov(r12, rax)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(rax, rcx)?;
        a.rep_eax()?;
        a.mov(rax, r11)?;
        a.and(eax, 0x3600)?;
        a.rep_eax()?;
        a.pushfq()?;
        a.pop(rax)?;
        a.and(eax, 0x400)?;
        a.rep_eax()?;
        a.mov(rax, r12)?;
        a.add(eax, 1)?;
        let mut second = a.create_label();
        a.cmp(eax, 44)?;
        a.je(second)?;
        a.sysretq()?;
        a.set_label(&mut second)?;
        a.mov(ecx, CODE3 as u32)?;
        a.mov(esp, (USTACK - 0x100) as u32)?;
        a.sysret()
    });
    g.write(entry.ip, &entry.bytes);
    let out = run(&g);
    let ret1 = user["ret1"];
    assert_eq!(
        out.events,
        vec![
            // Kernel side of the first SYSCALL.
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(ret1),
            Ev::Val(0x3400),
            Ev::Val(0),
            // Back in ring 3 with SYSRETQ.
            Ev::Val(u64::from(UCODE64 | 3)),
            Ev::Val(u64::from(UDATA | 3)),
            Ev::Val(43),
            Ev::Val(0x400),
            // Second SYSCALL, SYSRETD to compatibility mode.
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(user["u2"]),
            Ev::Val(0x3000),
            Ev::Val(0),
            Ev::Val(u64::from(UCODE32 | 3)),
            Ev::Val(u64::from(UDATA | 3)),
            Ev::Val(USTACK - 0x100),
            exc(13, Some(0), UCODE32 | 3),
            // SYSRETQ at ring 3.
            exc(13, Some(0), UCODE64 | 3),
            exc(6, None, KCODE64),
            Ev::Val(0xd0e),
        ]
    );
}

/// SYSENTER/SYSEXIT in 32-bit protected mode: CS/SS derived from IA32_SYSENTER_CS (+8 for
/// SS, +16/+24 with RPL 3 for SYSEXIT), ESP/EIP from the MSRs, IF cleared; SYSEXIT from ring 3
/// and SYSENTER with a null IA32_SYSENTER_CS are #GP(0).
#[test]
fn sysenter_sysexit() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let base = FREE;
    g.set_desc(base, desc(0, 0xfffff, 0x9a, 0xc));
    g.set_desc(base + 8, desc(0, 0xfffff, 0x92, 0xc));
    g.set_desc(base + 16, desc(0, 0xfffff, 0xfa, 0xc));
    g.set_desc(base + 24, desc(0, 0xfffff, 0xf2, 0xc));
    let user = g.code(32, CODE2, &|a| {
        a.here("u1")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.sti()?;
        a.sysenter()?;
        a.here("u1_ret")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.hlt()?;
        a.here("u2")?;
        a.sysexit()?;
        a.here("u3")?;
        a.sysenter()
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        wrmsr(a, SYSENTER_CS, u64::from(base))?;
        wrmsr(a, SYSENTER_ESP, STACK0 - 0x100)?;
        let entry = a.addr("entry");
        wrmsr(a, SYSENTER_EIP, u64::from(entry))?;
        // IOPL 3 for ring 3's reports (SYSEXIT leaves EFLAGS alone).
        a.pushfd()?;
        a.or(dword_ptr(esp), 0x3000)?;
        a.popfd()?;
        let (u1, u2, u3) = (user["u1"] as u32, user["u2"] as u32, user["u3"] as u32);
        a.probe32(|a| {
            a.mov(edx, u1)?;
            a.mov(ecx, USTACK as u32)?;
            a.sysexit()
        })?;
        a.probe32(|a| {
            a.mov(edx, u2)?;
            a.mov(ecx, USTACK as u32)?;
            a.sysexit()
        })?;
        wrmsr(a, SYSENTER_CS, 0)?;
        a.probe32(|a| a.enter_user32(u3, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("entry")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.and(eax, 0x3200)?;
        a.rep_eax()?;
        let ret = user["u1_ret"] as u32;
        a.mov(edx, ret)?;
        a.mov(ecx, (USTACK - 0x10) as u32)?;
        a.sysexit()
    });
    let out = run(&g);
    let ucs = base + 16 + 3;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(u64::from(ucs)),
            Ev::Val(u64::from(base + 24 + 3)),
            Ev::Val(USTACK),
            Ev::Val(u64::from(base)),
            Ev::Val(u64::from(base + 8)),
            Ev::Val(STACK0 - 0x100),
            Ev::Val(0x3000),
            Ev::Val(u64::from(ucs)),
            Ev::Val(USTACK - 0x10),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(0), UCODE32 | 3),
            Ev::Val(0xd0e),
        ]
    );
}

/// The TSS I/O permission bitmap at CPL 3 > IOPL: allowed ports reach the VMM (OUT, IN,
/// OUTS), a denied port or any denied byte of a wider access is #GP(0), ports past the
/// bitmap's end are #GP(0); IOPL 3 bypasses the bitmap.
#[test]
fn io_permission_bitmap() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[0x81, 0x83, 0x3f8]);
    g.write(DATA, &[0xa1, 0xa2, 0xa3]);
    g.write(DATA + 0x10, &[0xee; 4]);
    let user = g.code(32, CODE2, &|a| {
        a.here("u1")?;
        a.mov(al, 0x11)?;
        a.out(0x80u32, al)?;
        a.in_(al, 0x80u32)?;
        a.out(u32::from(P_VAL), al)?;
        a.mov(dx, 0x84u32)?;
        a.mov(eax, 0x1234_5678u32)?;
        a.out(dx, eax)?;
        a.mov(esi, DATA as u32)?;
        a.mov(ecx, 2u32)?;
        a.mov(dx, 0x80u32)?;
        a.rep().outsb()?;
        a.mov(edi, (DATA + 0x10) as u32)?;
        a.mov(ecx, 2u32)?;
        a.rep().insb()?;
        a.mov(dx, 0x81u32)?;
        a.outsb()?;
        a.here("u2")?;
        a.mov(dx, 0x82u32)?;
        a.out(dx, ax)?;
        a.here("u3")?;
        a.mov(dx, 0x3f8u32)?;
        a.in_(al, dx)?;
        a.here("u4")?;
        a.mov(dx, 0x400u32)?;
        a.out(dx, al)?;
        a.here("u5")?;
        a.mov(al, 0x22)?;
        a.out(0x81u32, al)?;
        a.hlt()
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        for u in ["u1", "u2", "u3", "u4"] {
            let entry = user[u] as u32;
            a.probe32(|a| a.enter_user32(entry, EFLAGS_IOPL0))?;
        }
        let u5 = user["u5"] as u32;
        a.probe32(|a| a.enter_user32(u5, EFLAGS_IOPL3))?;
        // Ring 0 with IOPL 0: CPL <= IOPL, no bitmap check.
        a.mov(al, 0x33)?;
        a.out(0x81u32, al)?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run_with(
        &g,
        Hooks {
            input: Some(&|port| if port == 0x80 { 0x5a } else { 0 }),
            ..Default::default()
        },
    );
    let ucs = UCODE32 | 3;
    assert_eq!(
        out.events,
        vec![
            Ev::Out(0x80, 0x11),
            Ev::In(0x80),
            Ev::Val(0x5a),
            Ev::Out(0x84, 0x1234_5678),
            Ev::Out(0x80, 0xa1),
            Ev::Out(0x80, 0xa2),
            Ev::In(0x80),
            Ev::In(0x80),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            Ev::Out(0x81, 0x22),
            exc(13, Some(0), ucs),
            Ev::Out(0x81, 0x33),
            Ev::Val(0xd0e),
        ]
    );
    assert_eq!(g.r32(DATA + 0x10), 0xeeee_5a5a, "REP INSB stores bytes");
}

// ---- exceptions --------------------------------------------------------------------------------------

/// Exceptions and their priority: traps (INT3, INTO) return after the instruction, faults
/// (#DE, #UD for UD2, a LOCK on NOP and MOV to CS) report before it; #TS(SS selector) when the
/// TSS's stack for the target level is unusable; segmentation checks come before paging
/// (#GP, not #PF, for an offset past the limit on a not-present page); an instruction fetch
/// that runs into a not-present page reports the page start in CR2.
#[test]
fn exceptions_priority_and_error_codes() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let root = g.paging32();
    g.w32(pte32(DATA + 0x1000), (DATA + 0x1000) as u32);
    g.w32(pte32(DATA + 0x3000), (DATA + 0x3000) as u32);
    // mov eax, imm32 at the last two bytes of a page, running into the not-present next one.
    g.write(DATA + 0x2ffe, &[0xb8, 0x78]);
    let seg = FREE;
    g.set_desc(seg, desc((DATA + 0x1000) as u32, 0xfff, 0x92, 0x4));
    let code1 = FREE + 8;
    g.set_desc(code1, desc(0, 0xfffff, 0xba, 0xc));
    // Ring 1's stack in the TSS is a DPL-0 segment.
    g.w32(TSS + 0xc, 0x6800);
    g.w32(TSS + 0x10, u32::from(KDATA));
    let user = g.code(32, CODE2, &|a| a.int(0x35));
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        enable_paging32(a, root)?;
        a.int3()?;
        a.here("after_int3")?;
        a.mov(al, 0x7f)?;
        a.add(al, 1)?;
        a.db(&[0xce])?; // into
        a.here("after_into")?;
        a.probe32(|a| {
            a.xor(edx, edx)?;
            a.xor(ecx, ecx)?;
            a.mov(eax, 1u32)?;
            a.div(ecx)
        })?;
        a.probe32(|a| a.ud2())?;
        a.probe32(|a| a.db(&[0xf0, 0x90]))?; // lock nop
        a.probe32(|a| a.db(&[0x8e, 0xc8]))?; // mov cs, ax
        let u = user.ip as u32;
        a.probe32(|a| a.enter_user32(u, EFLAGS_IOPL3))?;
        // Limit before paging: both offsets are on the not-present page.
        a.probe32(|a| {
            a.mov(ax, u32::from(seg))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr(0xffeu32))
        })?;
        a.probe32(|a| {
            a.mov(ax, u32::from(seg))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr(0x10u32))
        })?;
        a.probe32(|a| {
            a.mov(eax, (DATA + 0x2ffe) as u32)?;
            a.call(eax)
        })?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("h_eip")?;
        a.mov(eax, dword_ptr(esp))?;
        a.rep_eax()?;
        a.iretd()
    });
    let h = k["h_eip"] as u32;
    g.set_gate32(3, gate(KCODE32, h, 0xe, 0, 0));
    g.set_gate32(4, gate(KCODE32, h, 0xe, 0, 0));
    g.set_gate32(0x35, gate(code1, h, 0xe, 3, 0));
    let out = run(&g);
    let kc = KCODE32;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(k["after_int3"]),
            Ev::Val(k["after_into"]),
            exc(0, None, kc),
            exc(6, None, kc),
            exc(6, None, kc),
            exc(6, None, kc),
            exc(10, Some(u32::from(KDATA)), UCODE32 | 3),
            exc(13, Some(0), kc),
            pf(0, DATA + 0x1010, kc),
            pf(0, DATA + 0x3000, kc),
            Ev::Val(0xd0e),
        ]
    );
}

/// Double faults: a contributory exception while delivering a contributory one (#NP for the
/// #GP handler's code segment), a #GP while delivering a #PF; and a benign exception
/// followed by a contributory one is delivered serially (no #DF).
#[test]
fn double_faults() {
    let g = Guest::new();
    g.boot_pm32();
    let rt = g.idt32();
    let root = g.paging32();
    g.w32(pte32(DATA + 0x1000), (DATA + 0x1000) as u32);
    let absent = FREE;
    g.set_desc(absent, desc(0, 0xfffff, 0x1a, 0xc));
    let gp_gate = gate(KCODE32, rt["v13"] as u32, 0xe, 0, 0);
    let pf_gate = gate(KCODE32, rt["v14"] as u32, 0xe, 0, 0);
    let ud_gate = gate(KCODE32, rt["v6"] as u32, 0xe, 0, 0);
    let sel_field = |raw: u64, sel: u16| (raw & !0xffff_0000) | (u64::from(sel) << 16);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        enable_paging32(a, root)?;
        let set = |a: &mut Asm, v: u64, raw: u64| -> AsmResult {
            a.mov(dword_ptr((IDT + v * 8) as u32), raw as u32)?;
            a.mov(dword_ptr((IDT + v * 8 + 4) as u32), (raw >> 32) as u32)
        };
        // #GP whose handler's segment is not present: #NP -> #DF.
        set(a, 13, sel_field(gp_gate, absent))?;
        a.probe32(|a| {
            a.mov(ax, 0x400u32)?;
            a.mov(ds, ax)
        })?;
        set(a, 13, gp_gate)?;
        // #PF whose handler's selector is past the GDT: #GP -> #DF.
        set(a, 14, sel_field(pf_gate, 0x400))?;
        a.probe32(|a| a.mov(eax, dword_ptr((DATA + 0x1000) as u32)))?;
        set(a, 14, pf_gate)?;
        // #UD (benign) whose handler's segment is not present: just #NP (with EXT).
        set(a, 6, sel_field(ud_gate, absent))?;
        a.probe32(|a| a.ud2())?;
        set(a, 6, ud_gate)?;
        a.probe32(|a| a.ud2())?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let kc = KCODE32;
    assert_eq!(
        out.events,
        vec![
            exc(8, Some(0), kc),
            exc(8, Some(0), kc),
            exc(11, Some(u32::from(absent) + 1), kc),
            exc(6, None, kc),
            Ev::Val(0xd0e),
        ]
    );
}

/// A #PF while delivering a #PF (the stack is on a not-present page) in long mode: #DF on
/// the IST 1 stack, with CR2 holding the stack address that faulted.
#[test]
fn double_fault_on_ist_stack_in_long_mode() {
    let g = Guest::new();
    g.boot_long(0);
    let rt = g.idt64();
    g.tss64(0x4f00);
    g.w64(pte64(DATA + 0x1000), DATA + 0x1000);
    let v8 = rt["v8"];
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.probe64(|a| {
            a.mov(rsp, DATA + 0x1800)?;
            a.ud2()
        })?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("h_df")?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.mov(rax, cr2)?;
        a.rep_eax()?;
        a.mov(rax, v8)?;
        a.jmp(rax)
    });
    g.set_gate64(8, gate64(KCODE64, k["h_df"], 0xe, 0, 1));
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x4f00 - 48),
            Ev::Val(DATA + 0x1800 - 8),
            exc(8, Some(0), KCODE64),
            Ev::Val(0xd0e),
        ]
    );
}

/// Triple faults end the run with `Exit::Shutdown`: an exception with an IDT too small for
/// every handler (protected mode), an IVT too small (real mode), and a #PF whose frame and
/// #DF frame both land on a not-present stack page.
#[test]
fn triple_faults_shut_down() {
    // Protected mode, IDT limit 0.
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.val(1)?;
        a.mov(word_ptr(VARS as u32), 0)?;
        a.lidt(ptr(VARS as u32))?;
        a.int3()?;
        a.val(2)
    });
    assert_eq!(run(&g).events, vec![Ev::Val(1), Ev::Shutdown]);

    // Real mode, IVT limit 0.
    let g = Guest::new();
    g.code(16, REAL, &|a| {
        real_init(a)?;
        a.val(1)?;
        a.mov(word_ptr(VARS as u16), 0)?;
        a.lidt(ptr(VARS as u16))?;
        a.ud2()?;
        a.val(2)
    });
    assert_eq!(run(&g).events, vec![Ev::Val(1), Ev::Shutdown]);

    // #PF -> #PF pushing the frame -> #DF -> #PF pushing its frame: shutdown.
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let root = g.paging32();
    g.w32(pte32(DATA + 0x1000), (DATA + 0x1000) as u32);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        enable_paging32(a, root)?;
        a.val(1)?;
        a.mov(esp, (DATA + 0x1800) as u32)?;
        a.mov(eax, dword_ptr((DATA + 0x1000) as u32))?;
        a.val(2)
    });
    let out = run(&g);
    assert_eq!(out.events, vec![Ev::Val(1), Ev::Shutdown]);
    let s = out.vcpu.sregs().unwrap();
    assert_eq!(s.cr2, DATA + 0x1800 - 4, "CR2 is the last faulting address");
}

// ---- interrupt shadows, self-modifying code, restartable string instructions ----------------------

/// A reported value on which the harness requests an interrupt window.
const ASK_WINDOW: u32 = 0xabcd_0001;

/// The interrupt shadow: after STI (with IF=0 before) an interrupt window opens only after
/// the next instruction; after MOV SS and POP SS, the single-step trap of the next
/// instruction is folded into one #DB after it.
#[test]
fn interrupt_shadow_after_sti_and_mov_ss() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.val(ASK_WINDOW)?; // the harness asks for an interrupt window now
        a.nop()?;
        a.sti()?;
        a.here("after_sti")?;
        a.nop()?;
        a.here("after_nop")?;
        a.nop()?;
        a.cli()?;
        a.val(2)?;
        // Single-step across MOV SS and POP SS.
        a.mov(ax, u32::from(KDATA))?;
        a.push(eax)?;
        a.pushfd()?;
        a.or(dword_ptr(esp), 0x100)?;
        a.popfd()?;
        a.here("s0")?;
        a.nop()?;
        a.here("s1")?;
        a.mov(ss, ax)?;
        a.here("s2")?;
        a.nop()?;
        a.here("s3")?;
        a.pop(ss)?;
        a.here("s4")?;
        a.nop()?;
        a.here("s5")?;
        a.nop()?;
        a.here("stop")?;
        a.val(3)?;
        a.hlt()?;
        a.here("h_irq")?;
        a.push(eax)?;
        a.mov(eax, dword_ptr(esp + 4))?;
        a.rep_eax()?;
        a.pop(eax)?;
        a.iretd()?;
        // #DB: report EIP and DR6.BS; clear TF at "stop".
        a.here("h_db")?;
        a.push(eax)?;
        a.mov(eax, dword_ptr(esp + 4))?;
        a.rep_eax()?;
        a.mov(eax, dr6)?;
        a.and(eax, 0x4000)?;
        a.rep_eax()?;
        a.mov(eax, 0u32)?;
        a.mov(dr6, eax)?;
        let stop = a.addr("stop");
        let mut go = a.create_label();
        a.cmp(dword_ptr(esp + 4), stop as i32)?;
        a.jne(go)?;
        a.and(dword_ptr(esp + 12), !0x100)?;
        a.set_label(&mut go)?;
        a.pop(eax)?;
        a.iretd()
    });
    g.set_gate32(0x40, gate(KCODE32, k["h_irq"] as u32, 0xe, 0, 0));
    g.set_gate32(1, gate(KCODE32, k["h_db"] as u32, 0xe, 0, 0));
    let out = run_with(
        &g,
        Hooks {
            on_val: Some(&|v, vcpu| {
                if v == u64::from(ASK_WINDOW) {
                    vcpu.request_interrupt_window(true);
                }
            }),
            on_window: Some(0x40),
            ..Default::default()
        },
    );
    let bs = 0x4000;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(ASK_WINDOW.into()),
            Ev::Val(k["after_nop"]),
            Ev::Val(2),
            Ev::Val(k["s1"]),
            Ev::Val(bs),
            Ev::Val(k["s3"]),
            Ev::Val(bs),
            Ev::Val(k["s5"]),
            Ev::Val(bs),
            Ev::Val(k["stop"]),
            Ev::Val(bs),
            Ev::Val(3),
        ]
    );
}

/// Self-modifying code: a loop that patches the immediate of an instruction it already ran
/// (same block), a store to the very next instruction, code rewritten with REP MOVSB and run
/// again, and code rewritten through another linear alias of its physical page.
#[test]
fn self_modifying_code() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let root = g.paging32();
    // DATA+0x5000 is a second linear view of the CODE3 page.
    g.w32(pte32(DATA + 0x5000), (CODE3 | P | RW | US) as u32);
    // mov eax, 1; ret
    g.write(CODE3, &[0xb8, 1, 0, 0, 0, 0xc3]);
    // Replacement templates: mov eax, 2; ret and mov eax, 3; ret.
    g.write(DATA, &[0xb8, 2, 0, 0, 0, 0xc3]);
    g.write(DATA + 0x10, &[0xb8, 3, 0, 0, 0, 0xc3]);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        enable_paging32(a, root)?;
        a.xor(esi, esi)?;
        a.mov(ecx, 3u32)?;
        let top = a.here("loop")?;
        a.mov(eax, 0x100u32)?;
        a.add(esi, eax)?;
        let imm = a.addr("loop") + 1;
        a.add(dword_ptr(imm), 1)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(eax, esi)?;
        a.rep_eax()?;
        // Patch the next instruction: NOP becomes INC EAX.
        a.xor(eax, eax)?;
        let next = a.addr("next");
        a.mov(byte_ptr(next), 0x40)?;
        a.here("next")?;
        a.nop()?;
        a.rep_eax()?;
        // Run, rewrite with REP MOVSB, run again.
        a.mov(eax, CODE3 as u32)?;
        a.call(eax)?;
        a.rep_eax()?;
        a.mov(esi, DATA as u32)?;
        a.mov(edi, CODE3 as u32)?;
        a.mov(ecx, 6u32)?;
        a.rep().movsb()?;
        a.mov(eax, CODE3 as u32)?;
        a.call(eax)?;
        a.rep_eax()?;
        // Rewrite through the alias.
        a.mov(esi, (DATA + 0x10) as u32)?;
        a.mov(edi, (DATA + 0x5000) as u32)?;
        a.mov(ecx, 6u32)?;
        a.rep().movsb()?;
        a.mov(eax, CODE3 as u32)?;
        a.call(eax)?;
        a.rep_eax()?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(out.events, vals(&[0x100 + 0x101 + 0x102, 1, 1, 2, 3]));
}

/// REP MOVS that page-faults midway: the #PF reports the registers of the faulting
/// iteration (completed iterations stay done), the handler maps the page and IRETs, and the
/// instruction resumes and finishes. Forward MOVSB faulting on the destination, backward
/// MOVSD faulting on the source, and a MOVSD whose destination straddles into a missing page
/// (nothing of it is written before the fault).
#[test]
fn rep_movs_page_fault_resumes() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let root = g.paging32();
    for page in [DATA + 0x2000, DATA + 0x4000, DATA + 0x8000] {
        g.w32(pte32(page), page as u32);
    }
    let src: Vec<u8> = (0..0x40u8).map(|i| i ^ 0x5a).collect();
    g.write(DATA, &src);
    let back: Vec<u8> = (0..0x40u8).collect();
    g.write(DATA + 0x4fe0, &back[..0x20]);
    g.write(DATA + 0x5000, &back[0x20..]);
    g.w32(DATA + 0x7ffc, 0xeeee_eeee);
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        enable_paging32(a, root)?;
        let regs = |a: &mut Asm| -> AsmResult {
            a.mov(eax, ecx)?;
            a.rep_eax()?;
            a.mov(eax, esi)?;
            a.rep_eax()?;
            a.mov(eax, edi)?;
            a.rep_eax()
        };
        a.cld()?;
        a.mov(esi, DATA as u32)?;
        a.mov(edi, (DATA + 0x1ff0) as u32)?;
        a.mov(ecx, 0x40u32)?;
        a.rep().movsb()?;
        regs(a)?;
        a.std()?;
        a.mov(esi, (DATA + 0x5008) as u32)?;
        a.mov(edi, (DATA + 0x6100) as u32)?;
        a.mov(ecx, 8u32)?;
        a.rep().movsd()?;
        a.cld()?;
        regs(a)?;
        a.mov(esi, DATA as u32)?;
        a.mov(edi, (DATA + 0x7ffe) as u32)?;
        a.mov(ecx, 2u32)?;
        a.rep().movsd()?;
        regs(a)?;
        a.val(0xd0e)?;
        a.hlt()?;
        // #PF: report CR2, the error code, ECX/ESI/EDI at the fault and the dword at
        // DATA+0x7ffc; map the page at CR2 and return to the instruction.
        a.here("h_pf")?;
        a.pushad()?;
        a.mov(eax, cr2)?;
        a.rep_eax()?;
        a.mov(eax, dword_ptr(esp + 32))?;
        a.rep_eax()?;
        for off in [24, 4, 0] {
            a.mov(eax, dword_ptr(esp + off))?;
            a.rep_eax()?;
        }
        a.mov(eax, dword_ptr((DATA + 0x7ffc) as u32))?;
        a.rep_eax()?;
        a.mov(eax, cr2)?;
        a.mov(ebx, eax)?;
        a.and(eax, 0xffff_f000u32 as i32)?;
        a.or(eax, 7)?;
        a.shr(ebx, 12)?;
        a.mov(dword_ptr(ebx * 4 + PT32 as i32), eax)?;
        a.popad()?;
        a.add(esp, 4)?;
        a.iretd()
    });
    g.set_gate32(14, gate(KCODE32, k["h_pf"] as u32, 0xe, 0, 0));
    let out = run(&g);
    let e = 0xeeee_eeee;
    assert_eq!(
        out.events,
        vals(&[
            // Forward MOVSB: 16 bytes done, the 17th faults on the destination.
            DATA + 0x2000,
            2,
            0x30,
            DATA + 0x10,
            DATA + 0x2000,
            e,
            0,
            DATA + 0x40,
            DATA + 0x2030,
            // Backward MOVSD: 3 dwords done, the 4th faults on the source.
            DATA + 0x4ffc,
            0,
            5,
            DATA + 0x4ffc,
            DATA + 0x60f4,
            e,
            0,
            DATA + 0x4fe8,
            DATA + 0x60e0,
            // A straddling destination: nothing written before the fault.
            DATA + 0x8000,
            2,
            2,
            DATA,
            DATA + 0x7ffe,
            e,
            0,
            DATA + 8,
            DATA + 0x8006,
            0xd0e,
        ])
    );
    let mut buf = [0u8; 0x40];
    g.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1ff0))
        .unwrap();
    assert_eq!(&buf[..], &src[..]);
    for k in 0..8u64 {
        assert_eq!(g.r32(DATA + 0x6100 - 4 * k), g.r32(DATA + 0x5008 - 4 * k));
    }
    assert_eq!(
        g.r64(DATA + 0x7ffe),
        u64::from_le_bytes(src[..8].try_into().unwrap())
    );
}

/// Privilege changes in long mode: INT n from 64-bit ring 3 switches to RSP0 with a null SS
/// and IRETQ returns; a 64-bit call gate (16-byte descriptor) switches stacks and RETFQ
/// returns; INT n from compatibility-mode ring 3 goes through the same 64-bit IDT.
#[test]
fn long_mode_privilege_changes() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    let cgate = FREE;
    let user32 = g.code(32, CODE3, &|a| {
        a.int(0x80)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.hlt()
    });
    let user = g.code(64, CODE2, &|a| {
        a.int(0x80)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(dword_ptr(VARS), 0)?;
        a.mov(word_ptr(VARS + 8), u32::from(cgate | 3))?;
        // call far m16:64 through the gate (the offset is ignored)
        a.call(tword_ptr(VARS))?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.hlt()
    });
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        let u = user.ip as u32;
        a.probe64(|a| a.enter_user64(u, EFLAGS_IOPL3))?;
        let u32_ = user32.ip as u32;
        a.probe64(|a| {
            a.push(i32::from(UDATA | 3))?;
            a.push(USTACK as i32)?;
            a.push(EFLAGS_IOPL3 as i32)?;
            a.push(i32::from(UCODE32 | 3))?;
            a.push(u32_ as i32)?;
            a.iretq()
        })?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("h80")?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        for off in [8, 24, 32] {
            a.mov(rax, qword_ptr(rsp + off))?;
            a.rep_eax()?;
        }
        a.iretq()?;
        a.here("gate_fn")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.mov(rax, qword_ptr(rsp + 16))?;
        a.rep_eax()?;
        a.retf()
    });
    g.set_gate64(0x80, gate64(KCODE64, k["h80"], 0xe, 3, 0));
    let gf = k["gate_fn"];
    g.w64(GDT + u64::from(cgate), gate(KCODE64, gf as u32, 0xc, 3, 0));
    g.w64(GDT + u64::from(cgate) + 8, gf >> 32);
    let out = run(&g);
    let (u64cs, u32cs, uds) = (
        u64::from(UCODE64 | 3),
        u64::from(UCODE32 | 3),
        u64::from(UDATA | 3),
    );
    assert_eq!(
        out.events,
        vec![
            // INT 0x80 from 64-bit ring 3: RSP0, SS = null, frame CS/RSP/SS.
            Ev::Val(STACK0 - 40),
            Ev::Val(0),
            Ev::Val(u64cs),
            Ev::Val(USTACK),
            Ev::Val(uds),
            Ev::Val(u64cs),
            // The call gate: CPL 0 on RSP0 with SS, RSP, CS, RIP pushed.
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(STACK0 - 32),
            Ev::Val(USTACK),
            Ev::Val(u64cs),
            Ev::Val(USTACK),
            exc(13, Some(0), UCODE64 | 3),
            // From compatibility mode.
            Ev::Val(STACK0 - 40),
            Ev::Val(0),
            Ev::Val(u32cs),
            Ev::Val(USTACK),
            Ev::Val(uds),
            Ev::Val(u32cs),
            exc(13, Some(0), UCODE32 | 3),
            Ev::Val(0xd0e),
        ]
    );
}

/// SYSENTER/SYSEXITQ in long mode (Intel): SYSENTER enters 64-bit ring 0 with CS from the
/// MSR and SS = CS + 8; SYSEXITQ returns to 64-bit ring 3 with CS + 32 and SS + 40.
#[test]
fn sysenter_sysexit_long_mode() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    let user = g.code(64, CODE2, &|a| {
        a.sysenter()?;
        a.here("back")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.hlt()
    });
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        wrmsr(a, SYSENTER_CS, u64::from(KCODE64))?;
        wrmsr(a, SYSENTER_ESP, STACK0 - 0x80)?;
        let entry = a.addr("entry");
        wrmsr(a, SYSENTER_EIP, u64::from(entry))?;
        let u = user.ip as u32;
        a.probe64(|a| a.enter_user64(u, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("entry")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        // The return RIP: the user code's label, stored by the harness.
        a.mov(rdx, qword_ptr(VARS))?;
        a.mov(rcx, USTACK - 0x40)?;
        a.sysexitq()
    });
    g.w64(VARS, user["back"]);
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(u64::from(KCODE64 + 8)),
            Ev::Val(STACK0 - 0x80),
            Ev::Val(u64::from((KCODE64 + 32) | 3)),
            Ev::Val(u64::from((KCODE64 + 40) | 3)),
            Ev::Val(USTACK - 0x40),
            exc(13, Some(0), (KCODE64 + 32) | 3),
            Ev::Val(0xd0e),
        ]
    );
}

// ---- what the emulator does not implement ---------------------------------------------------------

/// Hardware task switches and virtual-8086 mode are not implemented: a guest that needs them
/// stops the vCPU with an error naming the feature (instead of running on with wrong state).
#[test]
fn unimplemented_task_switch_and_v86_fail_loudly() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    g.set_desc(FREE, desc(TSS as u32 + 0x100, 0x67, 0x89, 0));
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        a.val(1)?;
        a.jmp_far(FREE, 0)
    });
    let (out, err) = try_run(&g, Hooks::default());
    assert_eq!(out.events, vec![Ev::Val(1)]);
    let err = err.expect("a task switch stops the vCPU");
    assert!(err.contains("task switch"), "{err}");

    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        a.val(1)?;
        // IRET to virtual-8086 mode: GS, FS, DS, ES, SS, ESP, EFLAGS (VM), CS, EIP.
        for v in [0u32, 0, 0, 0, 0, 0x7000, 0x2_0002, 0, 0x8000] {
            a.push(v)?;
        }
        a.iretd()
    });
    let (out, err) = try_run(&g, Hooks::default());
    assert_eq!(out.events, vec![Ev::Val(1)]);
    let err = err.expect("virtual-8086 mode stops the vCPU");
    assert!(err.contains("virtual-8086"), "{err}");
}

/// A long REP STOSB is interruptible: an interrupt taken midway sees EIP at the REP
/// instruction with ECX/EDI partly advanced, and after IRET the instruction finishes.
#[test]
fn rep_stos_interrupted_and_resumed() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let count = 0x4_0000u32;
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.mov(edi, 0x10_0000u32)?;
        a.mov(ecx, count)?;
        a.mov(al, 0x77)?;
        a.cld()?;
        a.val(ASK_WINDOW)?; // the harness asks for an interrupt window now
        a.mov(al, 0x77)?;
        // The STI shadow covers the first run of REP STOSB: the window opens midway.
        a.sti()?;
        a.here("rep")?;
        a.rep().stosb()?;
        a.cli()?;
        a.mov(eax, ecx)?;
        a.rep_eax()?;
        a.mov(eax, edi)?;
        a.rep_eax()?;
        a.hlt()?;
        // The interrupt: report the return EIP, and whether ECX and EDI are midway and agree.
        a.here("h_irq")?;
        a.push(eax)?;
        a.mov(eax, dword_ptr(esp + 4))?;
        a.rep_eax()?;
        a.mov(eax, count)?;
        a.sub(eax, ecx)?;
        a.add(eax, 0x10_0000)?;
        a.sub(eax, edi)?;
        a.rep_eax()?;
        a.xor(eax, eax)?;
        a.cmp(ecx, 0)?;
        a.setne(al)?;
        a.cmp(ecx, count as i32)?;
        a.setb(ah)?;
        a.rep_eax()?;
        a.pop(eax)?;
        a.iretd()
    });
    g.set_gate32(0x40, gate(KCODE32, k["h_irq"] as u32, 0xe, 0, 0));
    let out = run_with(
        &g,
        Hooks {
            on_val: Some(&|v, vcpu| {
                if v == u64::from(ASK_WINDOW) {
                    vcpu.request_interrupt_window(true);
                }
            }),
            on_window: Some(0x40),
            ..Default::default()
        },
    );
    assert_eq!(
        out.events,
        vals(&[
            ASK_WINDOW.into(),
            k["rep"],
            0,
            0x0101,
            0,
            0x10_0000 + u64::from(count)
        ])
    );
    let mut buf = vec![0u8; count as usize + 1];
    g.mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
    assert!(buf[..count as usize].iter().all(|&b| b == 0x77));
    assert_eq!(buf[count as usize], 0);
}

/// LAR, LSL, VERR and VERW from ring 3: visibility by DPL/RPL/CPL (conforming code is
/// visible at any level), the system descriptor types each accepts, and their results.
#[test]
fn descriptor_queries_from_ring3() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let conf0 = FREE;
    let small3 = FREE + 8;
    let cgate = FREE + 0x10;
    g.set_desc(conf0, desc(0, 0xfffff, 0x9e, 0xc));
    g.set_desc(small3, desc(DATA as u32, 0x123, 0xf2, 0x4));
    g.set_desc(cgate, gate(KCODE32, PM32 as u32, 0xc, 3, 0));
    // (instruction, selector): ZF and, when set, the result.
    let queries: [(u8, u16); 14] = [
        (0, UDATA | 3),
        (0, KDATA),
        (0, conf0 | 3),
        (0, cgate | 3),
        (0, TSS_SEL),
        (1, small3 | 3),
        (1, UCODE32 | 3),
        (1, cgate | 3),
        (2, UDATA | 3),
        (2, KDATA),
        (2, UCODE32 | 3),
        (3, UDATA | 3),
        (3, UCODE32 | 3),
        (3, 0),
    ];
    let user = g.code(32, CODE2, &|a| {
        for (op, sel) in queries {
            a.mov(ecx, u32::from(sel))?;
            a.mov(ebx, 0xffff_ffffu32)?;
            match op {
                0 => a.lar(ebx, ecx)?,
                1 => a.lsl(ebx, ecx)?,
                2 => a.verr(cx)?,
                _ => a.verw(cx)?,
            }
            a.setz(al)?;
            a.movzx(eax, al)?;
            a.rep_eax()?;
            if op < 2 {
                a.mov(eax, ebx)?;
                if op == 0 {
                    // Bits 19:16 of LAR's result are undefined.
                    a.cmp(eax, -1)?;
                    let mut keep = a.create_label();
                    a.je(keep)?;
                    a.and(eax, 0x00f0_ff00)?;
                    a.set_label(&mut keep)?;
                }
                a.rep_eax()?;
            }
        }
        a.hlt()
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        let u = user.ip as u32;
        a.probe32(|a| a.enter_user32(u, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let unchanged = 0xffff_ffff;
    assert_eq!(
        out.events,
        vec![
            // LAR: access rights of a visible data segment; DPL 0 data is not visible from
            // ring 3; conforming code is; a call gate is a valid LAR type; so is a busy TSS
            // (but it has DPL 0: not visible).
            Ev::Val(1),
            Ev::Val(0x00c0_f300),
            Ev::Val(0),
            Ev::Val(unchanged),
            Ev::Val(1),
            Ev::Val(0x00c0_9e00),
            Ev::Val(1),
            Ev::Val(0x0000_ec00),
            Ev::Val(0),
            Ev::Val(unchanged),
            // LSL: byte-granular and page-granular limits; not for call gates.
            Ev::Val(1),
            Ev::Val(0x123),
            Ev::Val(1),
            Ev::Val(0xffff_ffff),
            Ev::Val(0),
            Ev::Val(unchanged),
            // VERR: data yes, DPL-0 data no, readable code yes.
            Ev::Val(1),
            Ev::Val(0),
            Ev::Val(1),
            // VERW: writable data yes, code no, null no.
            Ev::Val(1),
            Ev::Val(0),
            Ev::Val(0),
            exc(13, Some(0), UCODE32 | 3),
            Ev::Val(0xd0e),
        ]
    );
}
