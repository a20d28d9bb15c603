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
    /// Backend options (default: [`EmuBackend::default`]).
    options: Option<palacios_emu::EmuOptions>,
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
    let backend = hooks
        .options
        .clone()
        .map_or_else(EmuBackend::default, EmuBackend::new);
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

mod debug;
mod exceptions;
mod long;
mod paging;
mod privilege;
mod protected;
mod real;
mod shadows;
mod smp;
mod syscalls;
mod translator;
mod unimplemented;

// Helpers a later section reuses from an earlier one.
#[allow(unused_imports)]
use {
    exceptions::*, long::*, paging::*, privilege::*, protected::*, real::*, shadows::*,
    syscalls::*, unimplemented::*,
};
