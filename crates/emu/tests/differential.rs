//! Differential testing of the emulator against the host CPU.
//!
//! Every general-purpose integer instruction form that user mode can execute runs with random
//! registers, arithmetic flags (and DF) and memory, natively inside this test process and in
//! the emulator; the general-purpose registers, the flags the Intel SDM defines for the
//! instruction, and the memory buffer must agree. The forms of the chosen mnemonics are
//! enumerated from iced-x86's opcode tables (every encoding, operand size, register and
//! memory operand, LOCK where allowed), plus string instructions with and without REP in each
//! address size, near branches, calls and returns, JCC/LOOP/JCXZ and XLAT. They run in 64-bit
//! code and, where the host has Linux's 32-bit user code segment, in 32-bit compatibility-mode
//! code too (which adds BCD arithmetic, PUSHA/POPA, BOUND, ARPL and 16-bit LEA).
//!
//! Memory operands use random bases, indexes, scales, displacements, 32-bit address sizes,
//! RIP-relative addressing and segment overrides, aimed at a buffer whose accesses may cross a
//! page boundary. Both sides use the same addresses: the test maps its data buffer, scratch
//! area and code at a fixed low address (MAP_FIXED_NOREPLACE), and the guest has RAM there
//! with the identity map of the 64-bit ELF loader's entry state, so memory operands,
//! RIP-relative addressing and return addresses agree.
//!
//! Flags and register bits the SDM leaves undefined are not compared (see `undefined_flags`
//! and `undefined_reg_bits`); cases that would fault natively (#DE, #BR) are not generated.
//!
//! Environment:
//! - `PALACIOS_DIFF_CASES`: number of cases (default 50000, a few seconds in a debug build;
//!   `bench/emu-soak.sh` runs 10^6 in release mode).
//! - `PALACIOS_DIFF_SEED`: seed (decimal or 0x-hex; default fixed). Printed, with every
//!   mismatch's case number, so a failure can be replayed.
//! - `PALACIOS_DIFF_FORM`: only run forms whose name contains this text.
//! - `PALACIOS_DIFF_SHOW`: how many mismatches to print in full (default 30).
//! - `PALACIOS_DIFF_TRACE`: print every case before it runs (to find one that crashes).
//! - `PALACIOS_DIFF_LIST`: print every form with its number of cases and mismatches.

#[cfg(not(target_arch = "x86_64"))]
#[test]
fn differential_against_host_cpu() {
    eprintln!(
        "SKIPPED: differential testing runs x86 instructions natively and needs an x86_64 host \
         (this host is {})",
        std::env::consts::ARCH
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn differential_against_host_cpu() {
    host::run();
}

#[cfg(target_arch = "x86_64")]
mod host {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    use std::time::Instant;

    use iced_x86::{
        Code, Decoder, DecoderOptions, Encoder, EncodingKind, Formatter, IcedError, Instruction,
        MemoryOperand, Mnemonic, NasmFormatter, OpCodeOperandKind as K, OpKind, Register,
        RepPrefixKind,
    };
    use palacios_boot::{BootParams, elf::build_test_elf, elf64};
    use palacios_emu::EmuBackend;
    use palacios_vmm::backend::{Backend, Exit};
    use palacios_vmm::config::BootFormat;
    use palacios_vmm::{GuestMem, MemoryMap};
    use palacios_x86::{CpuState, Regs};
    use vm_memory::{Bytes, GuestAddress};

    // ---- layout (offsets from the fixed base, identical natively and in the guest) ----------

    /// Data buffer that memory operands, strings and the stack use; compared after each case.
    const DATA_LEN: usize = 0x2000;
    /// Native stub's input and output register blocks, saved host RSP, scratch stack.
    const IN_OFF: u64 = 0x2000;
    const OUT_OFF: u64 = 0x2100;
    const HOST_RSP_OFF: u64 = 0x2200;
    /// The far pointer (offset32, selector) of the 32-bit stub, and the 32-bit stub's saved ESP.
    const FARPTR_OFF: u64 = 0x2300;
    const HOST_ESP32_OFF: u64 = 0x2308;
    /// DS and ES of the 64-bit code (null on Linux), restored after the 32-bit code.
    const DS_SAVE_OFF: u64 = 0x2310;
    const ES_SAVE_OFF: u64 = 0x2318;
    const SCRATCH_TOP_OFF: u64 = 0x3000;
    /// Code page: 64-bit cases, 32-bit cases, and the trampoline into 32-bit code.
    const CODE_OFF: u64 = 0x3000;
    const CODE32_OFF: u64 = 0x3800;
    const TRAMPOLINE_OFF: u64 = 0x3c00;
    /// The user-mode 32-bit code segment of x86_64 Linux.
    const USER32_CS: u16 = 0x23;
    const MAP_LEN: usize = 0x4000;
    /// Guest RAM; every base candidate lies inside it.
    const GUEST_RAM: u64 = 512 << 20;
    const BASE_CANDIDATES: [u64; 6] = [
        0x1000_0000,
        0x0800_0000,
        0x1800_0000,
        0x0400_0000,
        0x1c00_0000,
        0x0c00_0000,
    ];
    /// Where the boot ELF's (unused) entry point goes.
    const ELF_ENTRY: u64 = 0x10_0000;

    const CF: u64 = 1;
    const PF: u64 = 1 << 2;
    const AF: u64 = 1 << 4;
    const ZF: u64 = 1 << 6;
    const SF: u64 = 1 << 7;
    const IF: u64 = 1 << 9;
    const DF: u64 = 1 << 10;
    const OF: u64 = 1 << 11;
    const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Flags compared (minus the instruction's undefined ones).
    const COMPARED: u64 = ARITH | DF;

    const RSP: usize = 4;
    const RBP: usize = 5;
    const RAX: usize = 0;
    const RCX: usize = 1;
    const RDX: usize = 2;
    const RBX: usize = 3;
    const RSI: usize = 6;
    const RDI: usize = 7;

    const NAMES: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    use iced_x86::Register as G;
    const R64: [Register; 16] = [
        G::RAX,
        G::RCX,
        G::RDX,
        G::RBX,
        G::RSP,
        G::RBP,
        G::RSI,
        G::RDI,
        G::R8,
        G::R9,
        G::R10,
        G::R11,
        G::R12,
        G::R13,
        G::R14,
        G::R15,
    ];
    const R32: [Register; 16] = [
        G::EAX,
        G::ECX,
        G::EDX,
        G::EBX,
        G::ESP,
        G::EBP,
        G::ESI,
        G::EDI,
        G::R8D,
        G::R9D,
        G::R10D,
        G::R11D,
        G::R12D,
        G::R13D,
        G::R14D,
        G::R15D,
    ];
    const R16: [Register; 16] = [
        G::AX,
        G::CX,
        G::DX,
        G::BX,
        G::SP,
        G::BP,
        G::SI,
        G::DI,
        G::R8W,
        G::R9W,
        G::R10W,
        G::R11W,
        G::R12W,
        G::R13W,
        G::R14W,
        G::R15W,
    ];
    const R8: [Register; 20] = [
        G::AL,
        G::CL,
        G::DL,
        G::BL,
        G::SPL,
        G::BPL,
        G::SIL,
        G::DIL,
        G::R8L,
        G::R9L,
        G::R10L,
        G::R11L,
        G::R12L,
        G::R13L,
        G::R14L,
        G::R15L,
        G::AH,
        G::CH,
        G::DH,
        G::BH,
    ];

    fn mask(size: u64) -> u64 {
        if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (size * 8)) - 1
        }
    }

    fn sext(v: u64, size: u64) -> i64 {
        let sh = 64 - size * 8;
        ((v << sh) as i64) >> sh
    }

    fn gpr_index(r: Register) -> usize {
        let full = r.full_register();
        R64.iter()
            .position(|&x| x == full)
            .expect("a general-purpose register")
    }

    fn is_high8(r: Register) -> bool {
        matches!(r, G::AH | G::CH | G::DH | G::BH)
    }

    // ---- random numbers -----------------------------------------------------------------------

    /// SplitMix64.
    struct Rng(u64);

    const SPECIAL: [u64; 20] = [
        0,
        1,
        2,
        0x7f,
        0x80,
        0xff,
        0x100,
        0x7fff,
        0x8000,
        0xffff,
        0x1_0000,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0x1_0000_0000,
        0x7fff_ffff_ffff_ffff,
        0x8000_0000_0000_0000,
        u64::MAX,
        u64::MAX - 1,
        0x8000_0000_0000_0001,
    ];

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
        fn pick<T: Copy>(&mut self, v: &[T]) -> T {
            v[self.below(v.len() as u64) as usize]
        }
        /// A register value: often a boundary value in the low 8/16/32/64 bits.
        fn value(&mut self) -> u64 {
            match self.below(8) {
                0 | 1 => {
                    let w = self.pick(&[1u64, 2, 4, 8]);
                    let s = self.pick(&SPECIAL);
                    (self.next() & !mask(w)) | (s & mask(w))
                }
                2 => self.pick(&SPECIAL),
                3 => self.below(70),
                4 => 0u64.wrapping_sub(self.below(70)),
                _ => self.next(),
            }
        }
        /// A shift or rotate count: mostly around the operand width.
        fn count(&mut self, bits: u64) -> u64 {
            match self.below(4) {
                0 => self.below(256),
                1 => self.pick(&[0, 1, bits - 1, bits, bits + 1, 31, 32, 63]),
                _ => self.below(bits + 2),
            }
        }
    }

    // ---- machine state ------------------------------------------------------------------------

    #[derive(Clone, Copy, PartialEq, Eq)]
    struct State {
        gpr: [u64; 16],
        flags: u64,
    }

    impl State {
        fn get(&self, r: Register) -> u64 {
            let v = self.gpr[gpr_index(r)];
            if is_high8(r) {
                (v >> 8) & 0xff
            } else {
                v & mask(r.size() as u64)
            }
        }
        /// Set the low `r.size()` bits (or the high byte), keeping the rest.
        fn set_low(&mut self, r: Register, v: u64) {
            let i = gpr_index(r);
            if is_high8(r) {
                self.gpr[i] = (self.gpr[i] & !0xff00) | ((v & 0xff) << 8);
            } else {
                let m = mask(r.size() as u64);
                self.gpr[i] = (self.gpr[i] & !m) | (v & m);
            }
        }
    }

    fn rd(data: &[u8], base: u64, addr: u64, size: u64) -> u64 {
        let o = (addr - base) as usize;
        let mut b = [0u8; 8];
        b[..size as usize].copy_from_slice(&data[o..o + size as usize]);
        u64::from_le_bytes(b)
    }

    fn wr(data: &mut [u8], base: u64, addr: u64, size: u64, v: u64) {
        let o = (addr - base) as usize;
        data[o..o + size as usize].copy_from_slice(&v.to_le_bytes()[..size as usize]);
    }

    // ---- the native side ----------------------------------------------------------------------

    /// Runs code natively: a stub loads all GPRs and RFLAGS from the input block, runs the
    /// instruction, and stores them to the output block, using only absolute addressing.
    struct Native {
        base: u64,
        s64: Stub,
        /// None where the host has no 32-bit user code segment.
        s32: Option<Stub>,
    }

    /// Code around the instruction under test, at `off` in the mapping.
    struct Stub {
        pro: Vec<u8>,
        epi: Vec<u8>,
        off: u64,
    }

    impl Native {
        fn new() -> Result<Native, String> {
            let mut tried = Vec::new();
            for &want in &BASE_CANDIDATES {
                // SAFETY: a fresh anonymous mapping at an address nothing else uses
                // (MAP_FIXED_NOREPLACE refuses to replace an existing mapping).
                let p = unsafe {
                    libc::mmap(
                        want as *mut libc::c_void,
                        MAP_LEN,
                        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                        -1,
                        0,
                    )
                };
                if p as u64 == want {
                    let (pro, epi) = stubs(want).map_err(|e| e.to_string())?;
                    let s64 = Stub {
                        pro,
                        epi,
                        off: CODE_OFF,
                    };
                    let s32 = if user32_cs_usable() {
                        let (stub, tramp) = stubs32(want).map_err(|e| e.to_string())?;
                        // SAFETY: inside the mapping just made.
                        unsafe {
                            let b = want as *mut u8;
                            let fp = b.add(FARPTR_OFF as usize);
                            let off = (want + CODE32_OFF) as u32;
                            std::ptr::copy_nonoverlapping(off.to_le_bytes().as_ptr(), fp, 4);
                            std::ptr::copy_nonoverlapping(
                                USER32_CS.to_le_bytes().as_ptr(),
                                fp.add(4),
                                2,
                            );
                            let t = b.add(TRAMPOLINE_OFF as usize);
                            std::ptr::copy_nonoverlapping(tramp.as_ptr(), t, tramp.len());
                        }
                        Some(stub)
                    } else {
                        None
                    };
                    return Ok(Native {
                        base: want,
                        s64,
                        s32,
                    });
                }
                if p != libc::MAP_FAILED {
                    // An old kernel treated the address as a hint.
                    // SAFETY: unmapping the mapping just made.
                    unsafe { libc::munmap(p, MAP_LEN) };
                }
                tried.push(format!("{want:#x}: {}", std::io::Error::last_os_error()));
            }
            Err(format!(
                "no fixed RWX mapping possible ({})",
                tried.join("; ")
            ))
        }

        fn stub(&self, bits: u32) -> &Stub {
            if bits == 32 {
                self.s32.as_ref().expect("32-bit code")
            } else {
                &self.s64
            }
        }

        /// Address of the instruction under test (after the prologue).
        fn insn_addr(&self, bits: u32) -> u64 {
            let s = self.stub(bits);
            self.base + s.off + s.pro.len() as u64
        }

        fn run(&self, bits: u32, insn: &[u8], st: &State, data: &[u8]) -> (State, Vec<u8>) {
            let b = self.base as *mut u8;
            let s = self.stub(bits);
            let mut code = s.pro.clone();
            code.extend_from_slice(insn);
            code.extend_from_slice(&s.epi);
            assert!(code.len() <= 0x400);
            // SAFETY: everything written lies inside the fixed mapping made in `new`; the code
            // is the stub the test assembled around an instruction whose memory accesses and
            // control transfers stay inside the mapping (the case generator guarantees it).
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), b, DATA_LEN);
                let inp = b.add(IN_OFF as usize) as *mut u64;
                for (i, v) in st.gpr.iter().enumerate() {
                    inp.add(i).write_volatile(*v);
                }
                inp.add(16).write_volatile(st.flags);
                std::ptr::write_bytes(b.add(OUT_OFF as usize), 0, 17 * 8);
                std::ptr::copy_nonoverlapping(code.as_ptr(), b.add(s.off as usize), code.len());
                // 64-bit cases run their stub directly; 32-bit ones through the trampoline.
                let entry = if bits == 32 { TRAMPOLINE_OFF } else { s.off };
                let f: extern "C" fn() = std::mem::transmute(b.add(entry as usize));
                f();
                let out = b.add(OUT_OFF as usize) as *const u64;
                let mut o = State {
                    gpr: [0; 16],
                    flags: out.add(16).read_volatile(),
                };
                for (i, v) in o.gpr.iter_mut().enumerate() {
                    *v = out.add(i).read_volatile();
                }
                let mut d = vec![0u8; DATA_LEN];
                std::ptr::copy_nonoverlapping(b, d.as_mut_ptr(), DATA_LEN);
                (o, d)
            }
        }
    }

    /// The stub around the instruction; absolute addresses only, so it runs anywhere.
    fn stubs(base: u64) -> Result<(Vec<u8>, Vec<u8>), IcedError> {
        use iced_x86::code_asm::*;
        let regs = [
            rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
        ];
        let inp = base + IN_OFF;
        let out = base + OUT_OFF;
        let host_rsp = base + HOST_RSP_OFF;
        let scratch = base + SCRATCH_TOP_OFF;
        let mut a = CodeAssembler::new(64)?;
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r)?;
        }
        a.mov(qword_ptr(host_rsp), rsp)?;
        a.mov(rsp, scratch)?;
        a.push(qword_ptr(inp + 16 * 8))?;
        a.popfq()?;
        for (i, r) in regs.iter().enumerate() {
            if i != RSP {
                a.mov(*r, qword_ptr(inp + 8 * i as u64))?;
            }
        }
        a.mov(rsp, qword_ptr(inp + 8 * RSP as u64))?;
        let pro = a.assemble(0)?;

        let mut a = CodeAssembler::new(64)?;
        a.mov(qword_ptr(out + 8 * RSP as u64), rsp)?;
        a.mov(rsp, scratch)?;
        a.pushfq()?;
        a.pop(qword_ptr(out + 16 * 8))?;
        for (i, r) in regs.iter().enumerate() {
            if i != RSP {
                a.mov(qword_ptr(out + 8 * i as u64), *r)?;
            }
        }
        a.mov(rsp, qword_ptr(host_rsp))?;
        a.cld()?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.ret()?;
        let epi = a.assemble(0)?;
        // The stub must not depend on where it runs.
        for part in [&pro, &epi] {
            let mut d = Decoder::with_ip(64, part, 0, DecoderOptions::NONE);
            for i in &mut d {
                assert!(
                    !i.is_ip_rel_memory_operand(),
                    "stub uses RIP-relative addressing: {i}"
                );
            }
        }
        Ok((pro, epi))
    }

    /// Whether the host has the 32-bit user code segment (compatibility mode).
    fn user32_cs_usable() -> bool {
        let ar: u32;
        let ok: u8;
        // SAFETY: LAR only reads the descriptor's access rights (ZF says whether it could).
        unsafe {
            core::arch::asm!(
                "lar {ar:e}, {sel:e}",
                "setz {ok}",
                sel = in(reg) u32::from(USER32_CS),
                ar = out(reg) ar,
                ok = out(reg_byte) ok,
            );
        }
        // Present, 32-bit (D), not 64-bit (L), DPL 3 code.
        ok == 1
            && ar & (1 << 15) != 0
            && ar & (1 << 22) != 0
            && ar & (1 << 21) == 0
            && (ar >> 13) & 3 == 3
    }

    /// The 32-bit stub (prologue, epilogue) and the 64-bit trampoline that far-calls it.
    fn stubs32(base: u64) -> Result<(Stub, Vec<u8>), IcedError> {
        use iced_x86::code_asm::*;
        let regs = [eax, ecx, edx, ebx, esp, ebp, esi, edi];
        let inp = base + IN_OFF;
        let out = base + OUT_OFF;
        let host_esp = base + HOST_ESP32_OFF;
        let mut a = CodeAssembler::new(32)?;
        // 64-bit processes run with null DS/ES, which 32-bit code cannot use: take SS's.
        a.push(ss)?;
        a.pop(ds)?;
        a.push(ss)?;
        a.pop(es)?;
        a.mov(dword_ptr(host_esp), esp)?;
        a.push(dword_ptr(inp + 16 * 8))?;
        a.popfd()?;
        for (i, r) in regs.iter().enumerate() {
            if i != RSP {
                a.mov(*r, dword_ptr(inp + 8 * i as u64))?;
            }
        }
        a.mov(esp, dword_ptr(inp + 8 * RSP as u64))?;
        let pro = a.assemble(0)?;

        let mut a = CodeAssembler::new(32)?;
        a.mov(dword_ptr(out + 8 * RSP as u64), esp)?;
        a.mov(esp, dword_ptr(host_esp))?;
        a.pushfd()?;
        a.pop(dword_ptr(out + 16 * 8))?;
        for (i, r) in regs.iter().enumerate() {
            if i != RSP {
                a.mov(dword_ptr(out + 8 * i as u64), *r)?;
            }
        }
        a.retf()?;
        let epi = a.assemble(0)?;

        let mut a = CodeAssembler::new(64)?;
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r)?;
        }
        a.mov(qword_ptr(base + HOST_RSP_OFF), rsp)?;
        a.mov(rsp, base + SCRATCH_TOP_OFF)?;
        a.mov(word_ptr(base + DS_SAVE_OFF), ds)?;
        a.mov(word_ptr(base + ES_SAVE_OFF), es)?;
        // CALL m16:32 (the form Intel and AMD both have in 64-bit mode) into compatibility mode;
        // the 32-bit RETF comes back.
        a.add_instruction(Instruction::with1(
            Code::Call_m1632,
            MemoryOperand::new(
                G::None,
                G::None,
                1,
                (base + FARPTR_OFF) as i64,
                8,
                false,
                G::None,
            ),
        )?)?;
        a.mov(ds, word_ptr(base + DS_SAVE_OFF))?;
        a.mov(es, word_ptr(base + ES_SAVE_OFF))?;
        a.mov(rsp, qword_ptr(base + HOST_RSP_OFF))?;
        a.cld()?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.ret()?;
        let tramp = a.assemble(0)?;
        let mut d = Decoder::with_ip(64, &tramp, 0, DecoderOptions::NONE);
        for i in &mut d {
            assert!(
                !i.is_ip_rel_memory_operand(),
                "trampoline uses RIP-relative addressing: {i}"
            );
        }
        Ok((
            Stub {
                pro,
                epi,
                off: CODE32_OFF,
            },
            tramp,
        ))
    }

    // ---- the emulator side ----------------------------------------------------------------------

    struct Emu {
        /// The fixed base address (guest-physical and linear, as natively).
        base: u64,
        mem: GuestMem,
        backend: EmuBackend,
        boot: CpuState,
    }

    impl Emu {
        fn new(base: u64) -> Emu {
            let map = MemoryMap::pc(GUEST_RAM);
            let mem = map.create_memory().expect("guest memory");
            // The 64-bit ELF loader's entry state: boot GDT, 64-bit code segment, identity map.
            let elf = build_test_elf(true, ELF_ENTRY, &[(ELF_ENTRY, &[0xf4], 1)]);
            let params = BootParams {
                format: BootFormat::Elf64,
                image: &elf,
                load_addr: None,
                entry: None,
                cmdline: "",
                modules: Vec::new(),
            };
            let boot = elf64::load(&mem, &map, &params).expect("long-mode entry state");
            let backend = EmuBackend::default();
            backend.map_memory(&mem).expect("map guest memory");
            Emu {
                base,
                mem,
                backend,
                boot,
            }
        }

        /// Run `code` (placed at `code_addr`) from `rip` until HLT, in 64-bit mode or (bits 32)
        /// in compatibility mode.
        fn run(
            &self,
            bits: u32,
            code_addr: u64,
            code: &[u8],
            rip: u64,
            st: &State,
            data: &[u8],
        ) -> Result<(State, Vec<u8>), String> {
            let base = self.base;
            self.mem.write_slice(data, GuestAddress(base)).unwrap();
            self.mem.write_slice(code, GuestAddress(code_addr)).unwrap();
            // A fresh core per case: no decoded blocks of earlier cases' code survive.
            let mut vcpu = self.backend.create_vcpu(0).map_err(|e| e.to_string())?;
            let g = &st.gpr;
            let mut s = self.boot.clone();
            if bits == 32 {
                use palacios_x86::segment::{SEL_CODE32, TYPE_CODE, flat};
                s.sregs.cs = flat(SEL_CODE32, TYPE_CODE, false);
            }
            s.regs = Regs {
                rax: g[0],
                rcx: g[1],
                rdx: g[2],
                rbx: g[3],
                rsp: g[4],
                rbp: g[5],
                rsi: g[6],
                rdi: g[7],
                r8: g[8],
                r9: g[9],
                r10: g[10],
                r11: g[11],
                r12: g[12],
                r13: g[13],
                r14: g[14],
                r15: g[15],
                rip,
                rflags: st.flags,
            };
            vcpu.set_state(&s).map_err(|e| e.to_string())?;
            let mut n = 0;
            loop {
                match vcpu.run() {
                    Ok(Exit::Hlt) => break,
                    Ok(Exit::Interrupted) if n < 100 => n += 1,
                    Ok(e) => {
                        let mut msg = format!("emulator exit {e:?} at RIP {:#x}", vcpu.rip());
                        for (k, v) in vcpu.stats() {
                            if k.contains("unimplemented") {
                                let _ = write!(msg, "; {k}: {v}");
                            }
                        }
                        return Err(msg);
                    }
                    Err(e) => return Err(format!("emulator error: {e}")),
                }
            }
            let r = vcpu.regs().map_err(|e| e.to_string())?;
            let end = code_addr + code.len() as u64;
            if r.rip != end {
                return Err(format!(
                    "emulator stopped at RIP {:#x}, expected {end:#x}",
                    r.rip
                ));
            }
            let o = State {
                gpr: [
                    r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10,
                    r.r11, r.r12, r.r13, r.r14, r.r15,
                ],
                flags: r.rflags,
            };
            let mut d = vec![0u8; DATA_LEN];
            self.mem.read_slice(&mut d, GuestAddress(base)).unwrap();
            Ok((o, d))
        }
    }

    // ---- instruction forms ----------------------------------------------------------------------

    #[derive(Clone)]
    enum Form {
        /// Operands from the opcode table.
        Code { code: Code, bits: u32 },
        /// A string instruction in an address size (a32: 67h in 64-bit code) with a repeat prefix.
        Str {
            code: Code,
            a32: bool,
            rep: RepPrefixKind,
            bits: u32,
        },
        /// Fixed bytes (branches over an increment, XLAT).
        Raw {
            name: String,
            bytes: Vec<u8>,
            kind: RawKind,
            bits: u32,
        },
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum RawKind {
        /// Conditional branch or loop over an instruction: small RCX sometimes.
        Branch,
        /// XLAT: RBX (EBX with 67h or in 32-bit code) points into the buffer.
        Xlat,
    }

    impl Form {
        fn bits(&self) -> u32 {
            match self {
                Form::Code { bits, .. } | Form::Str { bits, .. } | Form::Raw { bits, .. } => *bits,
            }
        }

        fn name(&self) -> String {
            let n = match self {
                Form::Code { code, .. } => format!("{code:?}"),
                Form::Str { code, a32, rep, .. } => {
                    let r = match rep {
                        RepPrefixKind::None => "",
                        RepPrefixKind::Repe => "rep ",
                        RepPrefixKind::Repne => "repne ",
                        _ => "?",
                    };
                    format!("{r}{code:?}{}", if *a32 { " a32" } else { "" })
                }
                Form::Raw { name, .. } => name.clone(),
            };
            if self.bits() == 32 {
                format!("compat32 {n}")
            } else {
                n
            }
        }
    }

    /// Mnemonics whose table forms are tested.
    fn tested(m: Mnemonic, bits: u32) -> bool {
        use Mnemonic::*;
        let common = matches!(
            m,
            Add | Or
                | Adc
                | Sbb
                | And
                | Sub
                | Xor
                | Cmp
                | Test
                | Inc
                | Dec
                | Neg
                | Not
                | Shl
                | Sal
                | Shr
                | Sar
                | Rol
                | Ror
                | Rcl
                | Rcr
                | Shld
                | Shrd
                | Mul
                | Imul
                | Div
                | Idiv
                | Bt
                | Bts
                | Btr
                | Btc
                | Bsf
                | Bsr
                | Popcnt
                | Mov
                | Movzx
                | Movsx
                | Movsxd
                | Movbe
                | Xchg
                | Xadd
                | Cmpxchg
                | Cmpxchg8b
                | Cmpxchg16b
                | Bswap
                | Lea
                | Cbw
                | Cwde
                | Cdqe
                | Cwd
                | Cdq
                | Cqo
                | Lahf
                | Sahf
                | Clc
                | Stc
                | Cmc
                | Cld
                | Std
                | Push
                | Pop
                | Pushf
                | Pushfd
                | Pushfq
                | Popf
                | Popfd
                | Popfq
                | Enter
                | Leave
                | Nop
                | Pause
                | Lfence
                | Mfence
                | Sfence
                | Prefetchnta
                | Prefetcht0
                | Prefetcht1
                | Prefetcht2
                | Prefetchw
                | Clflush
                | Endbr64
                | Endbr32
                | Seto
                | Setno
                | Setb
                | Setae
                | Sete
                | Setne
                | Setbe
                | Seta
                | Sets
                | Setns
                | Setp
                | Setnp
                | Setl
                | Setge
                | Setle
                | Setg
                | Cmovo
                | Cmovno
                | Cmovb
                | Cmovae
                | Cmove
                | Cmovne
                | Cmovbe
                | Cmova
                | Cmovs
                | Cmovns
                | Cmovp
                | Cmovnp
                | Cmovl
                | Cmovge
                | Cmovle
                | Cmovg
        );
        // Instructions that only 32-bit code has.
        let legacy = matches!(
            m,
            Daa | Das | Aaa | Aas | Aam | Aad | Pusha | Pushad | Popa | Popad | Arpl | Bound
        );
        common || (bits == 32 && legacy)
    }

    /// Near control transfers, tested with targets that continue at the next instruction.
    const BRANCH_CODES: [Code; 14] = [
        Code::Call_rel32_64,
        Code::Call_rm64,
        Code::Jmp_rel8_64,
        Code::Jmp_rel32_64,
        Code::Jmp_rm64,
        Code::Retnq,
        Code::Retnq_imm16,
        Code::Call_rel32_32,
        Code::Call_rm32,
        Code::Jmp_rel8_32,
        Code::Jmp_rel32_32,
        Code::Jmp_rm32,
        Code::Retnd,
        Code::Retnd_imm16,
    ];

    fn supported_kind(k: K) -> bool {
        matches!(
            k,
            K::r8_or_mem
                | K::r16_or_mem
                | K::r32_or_mem
                | K::r64_or_mem
                | K::r8_reg
                | K::r8_opcode
                | K::r16_reg
                | K::r16_rm
                | K::r16_opcode
                | K::r32_reg
                | K::r32_rm
                | K::r32_opcode
                | K::r64_reg
                | K::r64_rm
                | K::r64_opcode
                | K::mem
                | K::mem_offs
                | K::al
                | K::cl
                | K::ax
                | K::eax
                | K::rax
                | K::imm8
                | K::imm8_const_1
                | K::imm8sex16
                | K::imm8sex32
                | K::imm8sex64
                | K::imm16
                | K::imm32
                | K::imm32sex64
                | K::imm64
                | K::br32_1
                | K::br32_4
                | K::br64_1
                | K::br64_4
        )
    }

    /// All forms: 64-bit code, and 32-bit (compatibility-mode) code if `compat`.
    fn forms(compat: bool) -> Vec<Form> {
        let mut v = Vec::new();
        for bits in [64u32, 32] {
            if bits == 32 && !compat {
                continue;
            }
            for code in Code::values() {
                let op = code.op_code();
                let mode = if bits == 64 { op.mode64() } else { op.mode32() };
                if !op.is_instruction() || !mode || op.encoding() != EncodingKind::Legacy {
                    continue;
                }
                let branch = BRANCH_CODES.contains(&code);
                if !branch && !tested(code.mnemonic(), bits) {
                    continue;
                }
                if !op.op_kinds().iter().all(|&k| supported_kind(k)) {
                    continue;
                }
                // The 486's early CMPXCHG opcodes (0F A6/A7) are no longer instructions.
                if matches!(
                    code,
                    Code::Cmpxchg486_rm8_r8 | Code::Cmpxchg486_rm16_r16 | Code::Cmpxchg486_rm32_r32
                ) {
                    continue;
                }
                v.push(Form::Code { code, bits });
            }
            use Code::*;
            let strings = [
                Movsb_m8_m8,
                Movsw_m16_m16,
                Movsd_m32_m32,
                Movsq_m64_m64,
                Cmpsb_m8_m8,
                Cmpsw_m16_m16,
                Cmpsd_m32_m32,
                Cmpsq_m64_m64,
                Scasb_AL_m8,
                Scasw_AX_m16,
                Scasd_EAX_m32,
                Scasq_RAX_m64,
                Lodsb_AL_m8,
                Lodsw_AX_m16,
                Lodsd_EAX_m32,
                Lodsq_RAX_m64,
                Stosb_m8_AL,
                Stosw_m16_AX,
                Stosd_m32_EAX,
                Stosq_m64_RAX,
            ];
            for code in strings {
                if bits == 32 && code.op_code().operand_size() == 64 {
                    continue;
                }
                // 32-bit code has no address size that reaches the buffer other than its own.
                let sizes: &[bool] = if bits == 64 { &[false, true] } else { &[false] };
                for &a32 in sizes {
                    for rep in [
                        RepPrefixKind::None,
                        RepPrefixKind::Repe,
                        RepPrefixKind::Repne,
                    ] {
                        v.push(Form::Str {
                            code,
                            a32,
                            rep,
                            bits,
                        });
                    }
                }
            }
            // Conditional branches and loops over a 3-byte increment of the last register.
            let inc: &[u8] = if bits == 64 {
                &[0x49, 0xff, 0xc7] // inc r15
            } else {
                &[0x8d, 0x7f, 0x01] // lea edi, [edi+1]
            };
            const CC: [&str; 16] = [
                "o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le",
                "g",
            ];
            for (cc, name) in CC.iter().enumerate() {
                let mut b = vec![0x70 | cc as u8, 3];
                b.extend_from_slice(inc);
                v.push(Form::Raw {
                    name: format!("j{name} rel8 over inc"),
                    bytes: b,
                    kind: RawKind::Branch,
                    bits,
                });
                let mut b = vec![0x0f, 0x80 | cc as u8, 3, 0, 0, 0];
                b.extend_from_slice(inc);
                v.push(Form::Raw {
                    name: format!("j{name} rel32 over inc"),
                    bytes: b,
                    kind: RawKind::Branch,
                    bits,
                });
            }
            for (op, name) in [
                (0xe0u8, "loopne"),
                (0xe1, "loope"),
                (0xe2, "loop"),
                (0xe3, "jcxz"),
            ] {
                // The address-size prefix selects the count register: ECX in 64-bit code, CX
                // in 32-bit code.
                for prefixed in [false, true] {
                    let mut b = if prefixed { vec![0x67] } else { vec![] };
                    b.extend_from_slice(&[op, 3]);
                    b.extend_from_slice(inc);
                    let counter = match (bits, prefixed) {
                        (64, false) => "rcx",
                        (64, true) | (32, false) => "ecx",
                        _ => "cx",
                    };
                    v.push(Form::Raw {
                        name: format!("{name} {counter} over inc"),
                        bytes: b,
                        kind: RawKind::Branch,
                        bits,
                    });
                }
            }
            v.push(Form::Raw {
                name: "xlatb".into(),
                bytes: vec![0xd7],
                kind: RawKind::Xlat,
                bits,
            });
            if bits == 64 {
                v.push(Form::Raw {
                    name: "rex.w xlatb".into(),
                    bytes: vec![0x48, 0xd7],
                    kind: RawKind::Xlat,
                    bits,
                });
                v.push(Form::Raw {
                    name: "xlatb a32".into(),
                    bytes: vec![0x67, 0xd7],
                    kind: RawKind::Xlat,
                    bits,
                });
            }
        }
        v
    }

    // ---- case generation ----------------------------------------------------------------------

    struct Case {
        bytes: Vec<u8>,
        ins: Instruction,
        st: State,
        data: Vec<u8>,
    }

    enum Op {
        R(Register),
        M(MemoryOperand),
        I(i64),
    }

    fn build(code: Code, ops: &[Op]) -> Result<Instruction, IcedError> {
        use Op::*;
        match ops {
            [] => Ok(Instruction::with(code)),
            [R(a)] => Instruction::with1(code, *a),
            [M(a)] => Instruction::with1(code, *a),
            [I(a)] => Instruction::with1(code, *a as i32),
            [R(a), R(b)] => Instruction::with2(code, *a, *b),
            [R(a), M(b)] => Instruction::with2(code, *a, *b),
            [M(a), R(b)] => Instruction::with2(code, *a, *b),
            [R(a), I(b)] => Instruction::with2(code, *a, *b),
            [M(a), I(b)] => Instruction::with2(code, *a, *b as i32),
            [I(a), I(b)] => Instruction::with2(code, *a as i32, *b as i32),
            [R(a), R(b), R(c)] => Instruction::with3(code, *a, *b, *c),
            [R(a), R(b), I(c)] => Instruction::with3(code, *a, *b, *c as i32),
            [R(a), M(b), I(c)] => Instruction::with3(code, *a, *b, *c as i32),
            [M(a), R(b), R(c)] => Instruction::with3(code, *a, *b, *c),
            [M(a), R(b), I(c)] => Instruction::with3(code, *a, *b, *c as i32),
            _ => panic!("{code:?}: unexpected operand combination"),
        }
    }

    fn encode(bits: u32, ins: &Instruction, ip: u64) -> Result<Vec<u8>, IcedError> {
        let mut e = Encoder::new(bits);
        e.encode(ins, ip)?;
        Ok(e.take_buffer())
    }

    fn decode_one(bits: u32, bytes: &[u8], ip: u64) -> Instruction {
        Decoder::with_ip(bits, bytes, ip, DecoderOptions::NONE).decode()
    }

    /// Where a memory operand lands and how it is formed.
    struct MemPlan {
        target: u64,
        size: u64,
    }

    fn lockable(m: Mnemonic) -> bool {
        use Mnemonic::*;
        matches!(
            m,
            Add | Or
                | Adc
                | Sbb
                | And
                | Sub
                | Xor
                | Inc
                | Dec
                | Neg
                | Not
                | Bts
                | Btr
                | Btc
                | Xadd
                | Cmpxchg
                | Cmpxchg8b
                | Cmpxchg16b
                | Xchg
        )
    }

    fn uses_stack(m: Mnemonic) -> bool {
        use Mnemonic::*;
        matches!(
            m,
            Push | Pop
                | Pushf
                | Pushfd
                | Pushfq
                | Popf
                | Popfd
                | Popfq
                | Enter
                | Leave
                | Call
                | Ret
                | Pusha
                | Pushad
                | Popa
                | Popad
        )
    }

    fn is_shift(m: Mnemonic) -> bool {
        use Mnemonic::*;
        matches!(
            m,
            Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd
        )
    }

    struct Gen<'a> {
        rng: &'a mut Rng,
        base: u64,
        ip: u64,
        /// 64: 64-bit code; 32: 32-bit code in compatibility mode (8 registers, no RIP).
        bits: u32,
    }

    impl Gen<'_> {
        fn random_state(&mut self) -> (State, Vec<u8>) {
            let mut st = State {
                gpr: [0; 16],
                flags: 0,
            };
            for v in st.gpr.iter_mut() {
                *v = self.rng.value();
            }
            st.gpr[RSP] = self.stack_ptr();
            st.flags = (self.rng.next() & COMPARED) | IF | 2;
            let mut data = vec![0u8; DATA_LEN];
            if self.rng.chance(4) {
                // Few distinct bytes: REPE/REPNE comparisons find equal elements.
                let choices = [0u8, 0xff, 1, 0x80];
                let n = 1 + self.rng.below(4) as usize;
                for b in data.iter_mut() {
                    *b = choices[self.rng.below(n as u64) as usize];
                }
            } else {
                for c in data.chunks_mut(8) {
                    c.copy_from_slice(&self.rng.next().to_le_bytes());
                }
            }
            (st, data)
        }

        fn stack_ptr(&mut self) -> u64 {
            let mut sp = self.base + 0x1a00 + self.rng.below(64) * 8;
            if self.rng.chance(8) {
                sp += self.rng.below(8);
            }
            sp
        }

        /// A buffer address for `size` bytes: anywhere, or across the page boundary.
        fn target(&mut self, size: u64, align: u64) -> u64 {
            let off = if self.rng.chance(4) {
                0x1000 - self.rng.below(size.max(2) + 4)
            } else {
                0x200 + self.rng.below(0x1c00 - 0x200 - 64)
            };
            (self.base + off) & !(align - 1)
        }

        fn small_signed(&mut self) -> i64 {
            self.rng.below(128) as i64 - 64
        }

        /// Number of general-purpose registers the code can name.
        fn nregs(&self) -> usize {
            if self.bits == 32 { 8 } else { 16 }
        }

        /// Choose a memory operand for `size` bytes at `target` and set the registers it uses.
        /// `avoid`: registers whose values are constrained otherwise.
        fn memory(
            &mut self,
            st: &mut State,
            target: u64,
            avoid: &[usize],
            rsp_fixed: bool,
            rip_ok: bool,
            offs: bool,
        ) -> (MemoryOperand, Vec<usize>) {
            // In 32-bit code the buffer is reachable with 32-bit addresses only.
            let a32 = self.bits == 32 || self.rng.chance(6);
            if offs {
                // MOV AL/AX/EAX/RAX, moffs: an absolute 64-bit (or 32-bit) address.
                return (
                    MemoryOperand::new(
                        G::None,
                        G::None,
                        1,
                        target as i64,
                        if a32 { 4 } else { 8 },
                        false,
                        G::None,
                    ),
                    vec![],
                );
            }
            let regs = if a32 { &R32 } else { &R64 };
            let shape = self.rng.below(16);
            if rip_ok && self.bits == 64 && shape == 0 {
                let b = if a32 { G::EIP } else { G::RIP };
                return (
                    MemoryOperand::new(b, G::None, 1, target as i64, 4, false, G::None),
                    vec![],
                );
            }
            let pool: Vec<usize> = (0..self.nregs()).filter(|i| !avoid.contains(i)).collect();
            let base = if shape == 1 {
                None
            } else if rsp_fixed && shape == 2 && !avoid.contains(&RSP) {
                Some(RSP)
            } else {
                let p: Vec<usize> = pool.iter().copied().filter(|&i| i != RSP).collect();
                Some(self.rng.pick(&p))
            };
            let index = if self.rng.chance(2) || (base.is_none() && self.rng.chance(2)) {
                let p: Vec<usize> = pool
                    .iter()
                    .copied()
                    .filter(|&i| i != RSP && Some(i) != base)
                    .collect();
                Some(self.rng.pick(&p))
            } else {
                None
            };
            let scale = self.rng.pick(&[1u64, 2, 4, 8]);
            let am = if a32 { 0xffff_ffffu64 } else { u64::MAX };
            let mut used = Vec::new();
            let mut idx_part = 0u64;
            if let Some(x) = index {
                let v = self.small_signed() as u64;
                st.gpr[x] = if a32 {
                    (self.rng.next() << 32) | (v & 0xffff_ffff)
                } else {
                    v
                };
                idx_part = v.wrapping_mul(scale);
                used.push(x);
            }
            let (disp, size) = match base {
                Some(b) if b == RSP => {
                    let d = target.wrapping_sub(st.gpr[RSP]).wrapping_sub(idx_part) & am;
                    let d = if a32 {
                        d as u32 as i32 as i64
                    } else {
                        d as i64
                    };
                    (d, 4)
                }
                Some(b) => {
                    let d: i64 = match self.rng.below(4) {
                        0 => 0,
                        1 => self.rng.below(256) as i64 - 128,
                        2 => self.rng.next() as i32 as i64,
                        _ => self.rng.below(0x20000) as i64 - 0x10000,
                    };
                    let v = target.wrapping_sub(idx_part).wrapping_sub(d as u64);
                    st.gpr[b] = if a32 {
                        (self.rng.next() << 32) | (v & 0xffff_ffff)
                    } else {
                        v
                    };
                    used.push(b);
                    (d, if d == 0 { 0 } else { 1 })
                }
                None => {
                    let d = target.wrapping_sub(idx_part) & am;
                    let d = if a32 { d as u32 as i64 } else { d as i64 };
                    (
                        d,
                        if index.is_some() {
                            1
                        } else if a32 {
                            4
                        } else {
                            8
                        },
                    )
                }
            };
            let br = base.map(|b| regs[b]).unwrap_or(G::None);
            let xr = index.map(|x| regs[x]).unwrap_or(G::None);
            // Sometimes a segment override: all these segments are flat (64-bit code ignores
            // CS, DS, ES and SS overrides; CS would be read-only in 32-bit code).
            let seg = if self.rng.chance(12) {
                if self.bits == 64 {
                    self.rng.pick(&[G::ES, G::CS, G::SS, G::DS])
                } else {
                    self.rng.pick(&[G::ES, G::SS, G::DS])
                }
            } else {
                G::None
            };
            (
                MemoryOperand::new(br, xr, scale as u32, disp, size, false, seg),
                used,
            )
        }

        fn case(&mut self, form: &Form) -> Option<Case> {
            match form {
                Form::Code { code, .. } => self.code_case(*code),
                Form::Str { code, a32, rep, .. } => self.string_case(*code, *a32, *rep),
                Form::Raw { bytes, kind, .. } => self.raw_case(bytes, *kind),
            }
        }

        fn raw_case(&mut self, bytes: &[u8], kind: RawKind) -> Option<Case> {
            let (mut st, data) = self.random_state();
            match kind {
                RawKind::Branch => {
                    if self.rng.chance(2) {
                        st.gpr[RCX] = (self.rng.next() << 32) | self.rng.below(3);
                        if self.rng.chance(2) {
                            st.gpr[RCX] &= 0xffff_ffff;
                        }
                    }
                }
                RawKind::Xlat => {
                    let t = self.base + 0x200 + self.rng.below(0x1800);
                    let a32 = self.bits == 32 || bytes[0] == 0x67;
                    st.gpr[RBX] = if a32 { (self.rng.next() << 32) | t } else { t };
                }
            }
            let ins = decode_one(self.bits, bytes, self.ip);
            Some(Case {
                bytes: bytes.to_vec(),
                ins,
                st,
                data,
            })
        }

        fn string_case(&mut self, code: Code, a32: bool, rep: RepPrefixKind) -> Option<Case> {
            use Mnemonic::*;
            let a32 = a32 || self.bits == 32;
            let asz = if a32 { 32 } else { 64 };
            let n = G::None;
            let ins = match code {
                Code::Movsb_m8_m8 => Instruction::with_movsb(asz, n, rep),
                Code::Movsw_m16_m16 => Instruction::with_movsw(asz, n, rep),
                Code::Movsd_m32_m32 => Instruction::with_movsd(asz, n, rep),
                Code::Movsq_m64_m64 => Instruction::with_movsq(asz, n, rep),
                Code::Cmpsb_m8_m8 => Instruction::with_cmpsb(asz, n, rep),
                Code::Cmpsw_m16_m16 => Instruction::with_cmpsw(asz, n, rep),
                Code::Cmpsd_m32_m32 => Instruction::with_cmpsd(asz, n, rep),
                Code::Cmpsq_m64_m64 => Instruction::with_cmpsq(asz, n, rep),
                Code::Scasb_AL_m8 => Instruction::with_scasb(asz, rep),
                Code::Scasw_AX_m16 => Instruction::with_scasw(asz, rep),
                Code::Scasd_EAX_m32 => Instruction::with_scasd(asz, rep),
                Code::Scasq_RAX_m64 => Instruction::with_scasq(asz, rep),
                Code::Lodsb_AL_m8 => Instruction::with_lodsb(asz, n, rep),
                Code::Lodsw_AX_m16 => Instruction::with_lodsw(asz, n, rep),
                Code::Lodsd_EAX_m32 => Instruction::with_lodsd(asz, n, rep),
                Code::Lodsq_RAX_m64 => Instruction::with_lodsq(asz, n, rep),
                Code::Stosb_m8_AL => Instruction::with_stosb(asz, rep),
                Code::Stosw_m16_AX => Instruction::with_stosw(asz, rep),
                Code::Stosd_m32_EAX => Instruction::with_stosd(asz, rep),
                Code::Stosq_m64_RAX => Instruction::with_stosq(asz, rep),
                _ => unreachable!(),
            }
            .ok()?;
            let (mut st, mut data) = self.random_state();
            let size = ins.memory_size().size() as u64;
            let repeated = rep != RepPrefixKind::None;
            let count = if repeated { self.rng.below(20) } else { 0 };
            let upper = |rng: &mut Rng| if a32 { rng.next() << 32 } else { 0 };
            if repeated {
                st.gpr[RCX] = upper(self.rng) | count;
            }
            let ptr = |g: &mut Self| {
                let off = if g.rng.chance(4) {
                    0x1000 - 32 + g.rng.below(64)
                } else {
                    0x400 + g.rng.below(0x1400)
                };
                g.base + off
            };
            let si = ptr(self);
            let di = ptr(self);
            st.gpr[RSI] = upper(self.rng) | si;
            st.gpr[RDI] = upper(self.rng) | di;
            let m = ins.mnemonic();
            if matches!(m, Scasb | Scasw | Scasd | Scasq) && self.rng.chance(2) {
                // Look for an element that is there.
                let v = rd(
                    &data,
                    self.base,
                    di + size * self.rng.below(count + 1),
                    size,
                );
                st.gpr[RAX] = (st.gpr[RAX] & !mask(size)) | v;
            }
            if matches!(m, Cmpsb | Cmpsw | Cmpsd | Cmpsq) && self.rng.chance(2) {
                // Equal runs, differing somewhere.
                let dir_down = st.flags & DF != 0;
                for k in 0..count.max(1) {
                    let (s, d) = if dir_down {
                        (si.wrapping_sub(k * size), di.wrapping_sub(k * size))
                    } else {
                        (si + k * size, di + k * size)
                    };
                    if self.rng.chance(6) {
                        continue;
                    }
                    let v = rd(&data, self.base, s, size);
                    wr(&mut data, self.base, d, size, v);
                }
            }
            let bytes = encode(self.bits, &ins, self.ip).ok()?;
            let ins = decode_one(self.bits, &bytes, self.ip);
            Some(Case {
                bytes,
                ins,
                st,
                data,
            })
        }

        fn code_case(&mut self, code: Code) -> Option<Case> {
            use Mnemonic::*;
            let op = code.op_code();
            let mn = code.mnemonic();
            let (mut st, mut data) = self.random_state();
            let stack = uses_stack(mn);
            let branch = BRANCH_CODES.contains(&code);
            let mut rsp_fixed = true;
            if !stack && self.rng.chance(8) {
                st.gpr[RSP] = self.rng.value();
                rsp_fixed = false;
            }
            let kinds = op.op_kinds().to_vec();
            // Which operand (if any) is memory.
            let mem_n = kinds.iter().position(|&k| {
                matches!(k, K::mem | K::mem_offs)
                    || (matches!(
                        k,
                        K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem
                    ) && self.rng.chance(2))
            });
            let size_of = |k: K| -> u64 {
                match k {
                    K::r8_or_mem | K::r8_reg | K::r8_opcode | K::al | K::cl => 1,
                    K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode | K::ax => 2,
                    K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode | K::eax => 4,
                    _ => 8,
                }
            };
            // Registers for register operands.
            let mut regs = vec![G::None; kinds.len()];
            for (n, &k) in kinds.iter().enumerate() {
                if Some(n) == mem_n {
                    continue;
                }
                regs[n] = match k {
                    K::al => G::AL,
                    K::cl => G::CL,
                    K::ax => G::AX,
                    K::eax => G::EAX,
                    K::rax => G::RAX,
                    K::r8_or_mem | K::r8_reg | K::r8_opcode if self.bits == 32 => {
                        self.rng
                            .pick(&[G::AL, G::CL, G::DL, G::BL, G::AH, G::CH, G::DH, G::BH])
                    }
                    K::r8_or_mem | K::r8_reg | K::r8_opcode => self.rng.pick(&R8),
                    K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode => {
                        self.rng.pick(&R16[..self.nregs()])
                    }
                    K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode if branch => {
                        // CALL/JMP through ESP would run the stack.
                        self.rng
                            .pick(&[G::EAX, G::ECX, G::EDX, G::EBX, G::EBP, G::ESI, G::EDI])
                    }
                    K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode => {
                        self.rng.pick(&R32[..self.nregs()])
                    }
                    K::r64_or_mem | K::r64_reg | K::r64_rm | K::r64_opcode => {
                        if branch {
                            // CALL/JMP through RSP would run the stack.
                            self.rng.pick(&[
                                G::RAX,
                                G::RCX,
                                G::RDX,
                                G::RBX,
                                G::RBP,
                                G::RSI,
                                G::RDI,
                                G::R8,
                                G::R13,
                                G::R15,
                            ])
                        } else {
                            self.rng.pick(&R64)
                        }
                    }
                    _ => G::None,
                };
            }
            // BT* with a register bit offset into memory: a bounded offset.
            let bt_mem_reg = matches!(mn, Bt | Bts | Btr | Btc)
                && mem_n == Some(0)
                && kinds.get(1).is_some_and(|&k| k != K::imm8);
            let mut avoid = Vec::new();
            if bt_mem_reg {
                avoid.push(gpr_index(regs[1]));
            }
            if matches!(mn, Enter | Leave) {
                avoid.push(RBP);
            }
            // The memory operand.
            let mut plan = None;
            let mut addr_regs = Vec::new();
            let mut mem_op = None;
            if let Some(n) = mem_n {
                let size = match kinds[n] {
                    K::mem => match mn {
                        Cmpxchg8b => 8,
                        Cmpxchg16b => 16,
                        Bound => 2 * regs[0].size() as u64,
                        _ => 8, // LEA: nothing is accessed
                    },
                    K::mem_offs => size_of(kinds[1 - n]),
                    k => size_of(k),
                };
                let align = if mn == Cmpxchg16b { 16 } else { 1 };
                let target = if bt_mem_reg {
                    self.base + 0x500 + self.rng.below(0x1500)
                } else {
                    self.target(size, align)
                };
                let (m, used) = if mn == Lea {
                    self.lea_operand()
                } else {
                    self.memory(
                        &mut st,
                        target,
                        &avoid,
                        rsp_fixed,
                        true,
                        kinds[n] == K::mem_offs,
                    )
                };
                addr_regs = used;
                mem_op = Some(m);
                if mn != Lea {
                    plan = Some(MemPlan { target, size });
                    if self.rng.chance(8) {
                        let v = self.rng.pick(&SPECIAL);
                        wr(&mut data, self.base, target, size.min(8), v);
                    }
                }
            }
            let free = |r: usize| !addr_regs.contains(&r);
            // Immediates and the operand list.
            let width = plan
                .as_ref()
                .map(|p| p.size)
                .unwrap_or_else(|| regs.first().map(|r| r.size() as u64).unwrap_or(8).max(1));
            let mut ops = Vec::new();
            for (n, &k) in kinds.iter().enumerate() {
                let o = match k {
                    K::imm8 => {
                        let v = if is_shift(mn) {
                            self.rng.count(width * 8)
                        } else if mn == Enter {
                            if self.rng.chance(4) {
                                self.rng.below(256)
                            } else {
                                self.rng.below(5)
                            }
                        } else {
                            self.rng.below(256)
                        };
                        Op::I(v as i64)
                    }
                    K::imm8_const_1 => Op::I(1),
                    K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => {
                        Op::I(self.rng.next() as i8 as i64)
                    }
                    // ENTER probes the final stack pointer: its frame stays in the buffer.
                    K::imm16 if mn == Enter => Op::I(if self.rng.chance(2) {
                        self.rng.below(64) as i64
                    } else {
                        self.rng.below(0x1000) as i64
                    }),
                    K::imm16 => Op::I(if self.rng.chance(2) {
                        self.rng.below(64) as i64
                    } else {
                        self.rng.next() as u16 as i64
                    }),
                    K::imm32 | K::imm32sex64 => Op::I(self.rng.value() as i32 as i64),
                    K::imm64 => Op::I(self.rng.value() as i64),
                    K::br64_1 | K::br64_4 | K::br32_1 | K::br32_4 => Op::I(0),
                    _ if Some(n) == mem_n => Op::M(mem_op.unwrap()),
                    _ => Op::R(regs[n]),
                };
                ops.push(o);
            }
            // Register constraints.
            if bt_mem_reg {
                let r = regs[1];
                let bits = (r.size() * 8) as u64;
                let off = self.rng.below(0x400 * 8 * 2) as i64 - 0x400 * 8;
                let upper = if bits == 64 {
                    0
                } else {
                    self.rng.next() & !mask(bits / 8)
                };
                st.gpr[gpr_index(r)] = upper | (off as u64 & mask(bits / 8));
            }
            if is_shift(mn) && kinds.last() == Some(&K::cl) && free(RCX) {
                let c = self.rng.count(width * 8);
                st.set_low(G::CL, c);
            }
            if matches!(mn, Div | Idiv) && self.rng.below(8) != 0 {
                let lo_r = if width == 1 { G::AL } else { R64[RAX] };
                if free(RDX) && free(RAX) {
                    let lo = st.get(lo_r) & mask(width);
                    let hi = if mn == Idiv {
                        if (lo >> (width * 8 - 1)) & 1 == 1 {
                            mask(width)
                        } else {
                            0
                        }
                    } else {
                        self.rng.below(4)
                    };
                    if width == 1 {
                        st.set_low(G::AH, hi);
                    } else {
                        st.gpr[RDX] = (st.gpr[RDX] & !mask(width)) | hi;
                    }
                }
            }
            if matches!(mn, Enter | Leave) {
                st.gpr[RBP] = self.base + 0x1400 + self.rng.below(0x20) * 8;
                if mn == Enter && self.rng.chance(4) {
                    st.gpr[RBP] = self.rng.value();
                    // Only a level of 0 or 1 does not read the old frame.
                    if let Some(Op::I(level)) = ops.get_mut(1) {
                        *level &= 0xe1;
                    }
                }
            }
            if matches!(mn, Popf | Popfd | Popfq) {
                let size = match code {
                    Code::Popfw => 2,
                    Code::Popfd => 4,
                    _ => 8,
                };
                let v = (self.rng.next() & (ARITH | DF | 0x8028)) | IF | 2;
                wr(&mut data, self.base, st.gpr[RSP], size, v);
            }
            if mn == Cmpxchg && self.rng.chance(2) {
                // The comparison succeeds.
                let size = width;
                match &plan {
                    Some(p) => {
                        let v = st.gpr[RAX] & mask(size);
                        wr(&mut data, self.base, p.target, size, v);
                    }
                    None => {
                        let d = regs[0];
                        if free(RAX) && free(gpr_index(d)) {
                            let v = st.get(d);
                            st.gpr[RAX] = (st.gpr[RAX] & !mask(size)) | v;
                        }
                    }
                }
            }
            if mn == Bound {
                // In range (BOUND raises #BR otherwise): lower <= index <= upper, signed.
                let p = plan.as_ref().unwrap();
                let w = p.size / 2;
                let idx = sext(st.get(regs[0]), w);
                let (min, max) = (-(1i64 << (w * 8 - 1)), (1i64 << (w * 8 - 1)) - 1);
                let lo = idx
                    .saturating_sub(self.rng.below(4) as i64 * self.rng.below(1000) as i64)
                    .max(min);
                let hi = idx
                    .saturating_add(self.rng.below(4) as i64 * self.rng.below(1000) as i64)
                    .min(max);
                wr(&mut data, self.base, p.target, w, lo as u64);
                wr(&mut data, self.base, p.target + w, w, hi as u64);
            }
            if matches!(mn, Cmpxchg8b | Cmpxchg16b) && self.rng.chance(2) {
                let p = plan.as_ref().unwrap();
                let h = p.size / 2;
                let (a, d) = (st.gpr[RAX] & mask(h), st.gpr[RDX] & mask(h));
                wr(&mut data, self.base, p.target, h, a);
                wr(&mut data, self.base, p.target + h, h, d);
            }

            // Encode (branch targets: the next instruction).
            let mut ins = if matches!(
                kinds.first(),
                Some(K::br64_1 | K::br64_4 | K::br32_1 | K::br32_4)
            ) {
                let len = if matches!(kinds[0], K::br64_1 | K::br32_1) {
                    2
                } else {
                    5
                };
                Instruction::with_branch(code, self.ip + len).ok()?
            } else {
                build(code, &ops).ok()?
            };
            if lockable(mn) && mem_n == Some(0) && self.rng.chance(2) {
                ins.set_has_lock_prefix(true);
            }
            let bytes = encode(self.bits, &ins, self.ip).ok()?;
            let ins = decode_one(self.bits, &bytes, self.ip);
            if ins.len() != bytes.len() || ins.code() != code {
                return None;
            }
            let next = self.ip + bytes.len() as u64;
            // Indirect branches and returns go to the next instruction.
            let w = u64::from(self.bits / 8);
            match code {
                Code::Call_rm64 | Code::Jmp_rm64 | Code::Call_rm32 | Code::Jmp_rm32 => {
                    match &plan {
                        Some(p) => wr(&mut data, self.base, p.target, w, next),
                        None => {
                            if !free(gpr_index(regs[0])) {
                                return None;
                            }
                            st.gpr[gpr_index(regs[0])] = next;
                        }
                    }
                }
                Code::Retnq | Code::Retnq_imm16 | Code::Retnd | Code::Retnd_imm16 => {
                    wr(&mut data, self.base, st.gpr[RSP] & mask(w), w, next)
                }
                _ => {}
            }
            if !valid(&ins, &st, &data, self.base, plan.as_ref()) {
                return None;
            }
            Some(Case {
                bytes,
                ins,
                st,
                data,
            })
        }

        /// LEA's operand: any registers and displacement, any address size (16-bit in 32-bit
        /// code too: LEA does not access memory), RIP-relative too.
        fn lea_operand(&mut self) -> (MemoryOperand, Vec<usize>) {
            let disp = match self.rng.below(3) {
                0 => 0,
                1 => self.rng.below(256) as i64 - 128,
                _ => self.rng.next() as i32 as i64,
            };
            if self.bits == 32 && self.rng.chance(3) {
                let base = self.rng.pick(&[G::BX, G::BP, G::None]);
                let index = self.rng.pick(&[G::SI, G::DI, G::None]);
                let size = if base == G::None && index == G::None {
                    2
                } else if disp as i16 as i64 == disp as i8 as i64 {
                    1
                } else {
                    2
                };
                return (
                    MemoryOperand::new(base, index, 1, disp as u16 as i64, size, false, G::None),
                    vec![],
                );
            }
            let a32 = self.bits == 32 || self.rng.chance(3);
            let regs = if a32 { &R32 } else { &R64 };
            if self.bits == 64 && self.rng.chance(10) {
                let b = if a32 { G::EIP } else { G::RIP };
                let t =
                    self.ip.wrapping_add(disp as u64) & if a32 { 0xffff_ffff } else { u64::MAX };
                return (
                    MemoryOperand::new(b, G::None, 1, t as i64, 4, false, G::None),
                    vec![],
                );
            }
            let n = self.nregs() as u64;
            let base = if self.rng.chance(8) {
                None
            } else {
                Some(self.rng.below(n) as usize)
            };
            let index = if self.rng.chance(2) {
                let p: Vec<usize> = (0..n as usize)
                    .filter(|&i| i != RSP && Some(i) != base)
                    .collect();
                Some(self.rng.pick(&p))
            } else {
                None
            };
            let scale = self.rng.pick(&[1u32, 2, 4, 8]);
            let (disp, size) = match base {
                Some(_) => (disp, if disp == 0 { 0 } else { 1 }),
                None if index.is_some() => (if a32 { disp as u32 as i64 } else { disp }, 1),
                None if a32 => (disp as u32 as i64, 4),
                None => (disp, 8),
            };
            let br = base.map(|b| regs[b]).unwrap_or(G::None);
            let xr = index.map(|x| regs[x]).unwrap_or(G::None);
            (
                MemoryOperand::new(br, xr, scale, disp, size, false, G::None),
                vec![],
            )
        }
    }

    /// Whether the case is defined and does not fault natively.
    fn valid(
        ins: &Instruction,
        st: &State,
        data: &[u8],
        base: u64,
        plan: Option<&MemPlan>,
    ) -> bool {
        use Mnemonic::*;
        match ins.mnemonic() {
            Div | Idiv => {
                let (size, d) = match ins.op0_kind() {
                    OpKind::Register => {
                        let r = ins.op0_register();
                        (r.size() as u64, st.get(r))
                    }
                    _ => {
                        let p = plan.unwrap();
                        (p.size, rd(data, base, p.target, p.size))
                    }
                };
                if d == 0 {
                    return false;
                }
                let bits = size * 8;
                let (lo, hi) = if size == 1 {
                    (st.gpr[RAX] & 0xff, (st.gpr[RAX] >> 8) & 0xff)
                } else {
                    (st.gpr[RAX] & mask(size), st.gpr[RDX] & mask(size))
                };
                let n = (u128::from(hi) << bits) | u128::from(lo);
                if ins.mnemonic() == Div {
                    n / u128::from(d) <= u128::from(mask(size))
                } else {
                    let sh = 128 - 2 * bits;
                    let n = ((n << sh) as i128) >> sh;
                    let ds = 64 - bits;
                    let d = i128::from(((d << ds) as i64) >> ds);
                    let q = n / d;
                    q >= -(1i128 << (bits - 1)) && q < (1i128 << (bits - 1))
                }
            }
            // AAM 0 divides by zero.
            Aam => ins.immediate8() != 0,
            Shld | Shrd => {
                // A 16-bit count above 16 leaves the result undefined.
                let size = op_size(ins);
                size != 2 || shift_count(ins, st) & 31 <= 16
            }
            _ => true,
        }
    }

    fn op_size(ins: &Instruction) -> u64 {
        match ins.op0_kind() {
            OpKind::Register => ins.op0_register().size() as u64,
            _ => ins.memory_size().size() as u64,
        }
    }

    /// The raw shift count of a shift, rotate or double shift.
    fn shift_count(ins: &Instruction, st: &State) -> u64 {
        let n = if matches!(ins.mnemonic(), Mnemonic::Shld | Mnemonic::Shrd) {
            2
        } else {
            1
        };
        if ins.op_count() <= n {
            return 1;
        }
        match ins.op_kind(n) {
            OpKind::Register => st.get(ins.op_register(n)),
            _ => ins.immediate(n) & 0xff,
        }
    }

    /// Arithmetic flags the Intel SDM leaves undefined after `ins` with inputs `st`.
    fn undefined_flags(ins: &Instruction, st: &State) -> u64 {
        use Mnemonic::*;
        let mn = ins.mnemonic();
        match mn {
            And | Or | Xor | Test => AF,
            Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd => {
                let size = op_size(ins);
                let c = shift_count(ins, st) & if size == 8 { 63 } else { 31 };
                if c == 0 {
                    return 0;
                }
                let mut u = if c != 1 { OF } else { 0 };
                if matches!(mn, Shl | Sal | Shr | Sar | Shld | Shrd) {
                    u |= AF;
                }
                if matches!(mn, Shl | Sal | Shr) && c >= size * 8 {
                    u |= CF;
                }
                u
            }
            Mul | Imul => SF | ZF | AF | PF,
            Div | Idiv => ARITH,
            Bt | Bts | Btr | Btc => OF | SF | AF | PF,
            Bsf | Bsr => CF | OF | SF | AF | PF,
            Daa | Das => OF,
            Aaa | Aas => OF | SF | ZF | PF,
            Aam | Aad => OF | AF | CF,
            _ => 0,
        }
    }

    /// Register bits the SDM leaves undefined after `ins`: (register, bits not compared).
    fn undefined_reg_bits(
        ins: &Instruction,
        st: &State,
        data: &[u8],
        base: u64,
    ) -> Option<(usize, u64)> {
        use Mnemonic::*;
        match ins.mnemonic() {
            // BSWAP of a 16-bit register (Intel and AMD clear it, but the SDM says undefined).
            Bswap if ins.op0_register().size() == 2 => {
                Some((gpr_index(ins.op0_register()), 0xffff))
            }
            // BSF/BSR of zero: the destination is undefined. Cores keep it, but Intel's clear the
            // upper half of a 32-bit destination and AMD's do not: the low 32 bits are compared.
            Bsf | Bsr if ins.op0_register().size() == 4 => {
                let size = 4;
                let src = match ins.op1_kind() {
                    OpKind::Register => st.get(ins.op1_register()),
                    _ => rd(data, base, mem_addr(ins, st), size),
                };
                (src & mask(size) == 0).then(|| (gpr_index(ins.op0_register()), !0xffff_ffffu64))
            }
            _ => None,
        }
    }

    /// The address of a (non-RIP-relative or RIP-relative) memory operand.
    fn mem_addr(ins: &Instruction, st: &State) -> u64 {
        let mut a = ins.memory_displacement64();
        let b = ins.memory_base();
        let mut am = u64::MAX;
        if b != G::None && b != G::RIP && b != G::EIP {
            a = a.wrapping_add(st.get(b));
            if b.size() == 4 {
                am = 0xffff_ffff;
            }
        }
        let x = ins.memory_index();
        if x != G::None {
            a = a.wrapping_add(st.get(x).wrapping_mul(u64::from(ins.memory_index_scale())));
            if x.size() == 4 {
                am = 0xffff_ffff;
            }
        }
        if b == G::EIP || (b == G::None && x == G::None && ins.memory_displ_size() == 4) {
            am = 0xffff_ffff;
        }
        a & am
    }

    // ---- running and comparing ----------------------------------------------------------------

    fn nasm(ins: &Instruction) -> String {
        let mut f = NasmFormatter::new();
        let mut s = String::new();
        f.format(ins, &mut s);
        s
    }

    fn hex(b: &[u8]) -> String {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn env_u64(name: &str) -> Option<u64> {
        let v = std::env::var(name).ok()?;
        let v = v.trim().replace('_', "");
        let r = if let Some(h) = v.strip_prefix("0x") {
            u64::from_str_radix(h, 16)
        } else {
            v.parse()
        };
        Some(r.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
    }

    pub fn run() {
        let cases = env_u64("PALACIOS_DIFF_CASES").unwrap_or(50_000);
        let seed = env_u64("PALACIOS_DIFF_SEED").unwrap_or(0x5eed_0000_d1ff);
        let show = env_u64("PALACIOS_DIFF_SHOW").unwrap_or(30);
        let filter = std::env::var("PALACIOS_DIFF_FORM").ok();
        let trace = std::env::var_os("PALACIOS_DIFF_TRACE").is_some();
        let native = match Native::new() {
            Ok(n) => n,
            Err(e) => panic!("differential test: {e}"),
        };
        let emu = Emu::new(native.base);
        let base = native.base;
        let compat = native.s32.is_some();
        if !compat {
            println!(
                "differential: the host has no 32-bit user code segment; compatibility-mode forms skipped"
            );
        }
        let mut forms = forms(compat);
        if let Some(f) = &filter {
            forms.retain(|x| x.name().contains(f.as_str()));
            assert!(!forms.is_empty(), "no form matches PALACIOS_DIFF_FORM={f}");
        }
        println!(
            "differential: {} instruction forms, {cases} cases, seed {seed:#x}, buffer at {base:#x}",
            forms.len()
        );
        // Registers compared: all 64 bits of 16 in 64-bit code, the low halves of 8 in 32-bit code.
        let reg_mask = |bits: u32| -> [u64; 16] {
            let mut m = [u64::MAX; 16];
            if bits == 32 {
                for (i, v) in m.iter_mut().enumerate() {
                    *v = if i < 8 { 0xffff_ffff } else { 0 };
                }
            }
            m
        };
        let same = |a: &State, b: &State, m: &[u64; 16]| {
            (0..16).all(|i| (a.gpr[i] ^ b.gpr[i]) & m[i] == 0)
        };

        // The harness itself: a NOP returns the inputs unchanged on both sides.
        for bits in [64u32, 32] {
            if bits == 32 && !compat {
                continue;
            }
            let stub = native.stub(bits);
            let ip = native.insn_addr(bits);
            let mut rng = Rng(seed);
            let mut g = Gen {
                rng: &mut rng,
                base,
                ip,
                bits,
            };
            let (st, data) = g.random_state();
            let m = reg_mask(bits);
            let (n, nd) = native.run(bits, &[0x90], &st, &data);
            assert!(
                same(&n, &st, &m),
                "native {bits}-bit harness changed registers"
            );
            assert_eq!(
                n.flags & COMPARED,
                st.flags & COMPARED,
                "native {bits}-bit harness changed flags"
            );
            assert!(nd == data, "native {bits}-bit harness changed memory");
            let mut code = stub.pro.clone();
            code.extend_from_slice(&[0x90, 0xf4]);
            let (e, ed) = emu
                .run(bits, base + stub.off, &code, ip, &st, &data)
                .expect("emulator runs a NOP");
            assert!(
                same(&e, &st, &m),
                "emulator {bits}-bit harness changed registers"
            );
            assert!(ed == data, "emulator {bits}-bit harness changed memory");
        }

        let start = Instant::now();
        let mut ran = 0u64;
        let mut mismatches = 0u64;
        let mut skipped = 0u64;
        let mut per_form: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for case in 0..cases {
            let form = &forms[(case % forms.len() as u64) as usize];
            let bits = form.bits();
            let stub = native.stub(bits);
            let ip = native.insn_addr(bits);
            let mut rng = Rng(seed ^ case.wrapping_mul(0xd605_bbb5_8c8a_bbd9));
            let mut g = Gen {
                rng: &mut rng,
                base,
                ip,
                bits,
            };
            let mut c = None;
            for _ in 0..200 {
                c = g.case(form);
                if c.is_some() {
                    break;
                }
            }
            let Some(c) = c else {
                skipped += 1;
                continue;
            };
            ran += 1;
            if trace {
                eprintln!(
                    "case {case} {}: {} [{}]",
                    form.name(),
                    nasm(&c.ins),
                    hex(&c.bytes)
                );
            }
            let (n_st, n_data) = native.run(bits, &c.bytes, &c.st, &c.data);
            let mut code = stub.pro.clone();
            code.extend_from_slice(&c.bytes);
            code.push(0xf4);
            let emu_out = emu.run(bits, base + stub.off, &code, ip, &c.st, &c.data);
            let undefined = undefined_flags(&c.ins, &c.st);
            let fmask = COMPARED & !undefined;
            let mut rmask = reg_mask(bits);
            if let Some((r, bits)) = undefined_reg_bits(&c.ins, &c.st, &c.data, base) {
                rmask[r] &= !bits;
            }
            let mut report = String::new();
            match &emu_out {
                Err(e) => {
                    let _ = writeln!(report, "  emulator failed: {e}");
                }
                Ok((e_st, e_data)) => {
                    for i in 0..16 {
                        if (n_st.gpr[i] ^ e_st.gpr[i]) & rmask[i] != 0 {
                            let _ = writeln!(
                                report,
                                "  {:>4}: native {:#018x}  emu {:#018x}",
                                NAMES[i], n_st.gpr[i], e_st.gpr[i]
                            );
                        }
                    }
                    if (n_st.flags ^ e_st.flags) & fmask != 0 {
                        let _ = writeln!(
                            report,
                            "  flags: native {:#06x}  emu {:#06x}  (compared {fmask:#06x}, differ {:#06x})",
                            n_st.flags & COMPARED,
                            e_st.flags & COMPARED,
                            (n_st.flags ^ e_st.flags) & fmask
                        );
                    }
                    let diffs: Vec<usize> =
                        (0..DATA_LEN).filter(|&k| n_data[k] != e_data[k]).collect();
                    for &k in diffs.iter().take(16) {
                        let _ = writeln!(
                            report,
                            "  mem {:#x}: was {:02x} native {:02x} emu {:02x}",
                            base + k as u64,
                            c.data[k],
                            n_data[k],
                            e_data[k]
                        );
                    }
                    if diffs.len() > 16 {
                        let _ = writeln!(report, "  ... {} differing bytes", diffs.len());
                    }
                }
            }
            let e = per_form.entry(form.name()).or_default();
            e.0 += 1;
            if !report.is_empty() {
                e.1 += 1;
                mismatches += 1;
                if mismatches <= show {
                    let mut s = format!(
                        "MISMATCH case {case} form {}: {}   [{}]\n  in:",
                        form.name(),
                        nasm(&c.ins),
                        hex(&c.bytes)
                    );
                    for (i, (name, v)) in NAMES.iter().zip(c.st.gpr).enumerate() {
                        if i % 4 == 0 {
                            s.push_str("\n   ");
                        }
                        let _ = write!(s, " {name:>3}={v:#018x}");
                    }
                    let _ = write!(s, "\n    flags={:#06x}\n", c.st.flags & COMPARED);
                    if let Ok((e_st, _)) = &emu_out {
                        let _ = writeln!(
                            s,
                            "  out flags: native {:#06x} emu {:#06x}",
                            n_st.flags & COMPARED,
                            e_st.flags & COMPARED
                        );
                    }
                    s.push_str(&report);
                    println!("{s}");
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        if std::env::var_os("PALACIOS_DIFF_LIST").is_some() {
            for (name, (n, m)) in &per_form {
                println!("  {name}: {n} cases, {m} mismatches");
            }
        }
        // Every form must have produced cases (a generator that never finds valid operands
        // would silently test nothing).
        if cases >= 4 * forms.len() as u64 {
            let idle: Vec<String> = forms
                .iter()
                .map(|f| f.name())
                .filter(|n| !per_form.contains_key(n))
                .collect();
            assert!(idle.is_empty(), "forms that never ran: {idle:?}");
        }
        let bad: Vec<_> = per_form.iter().filter(|(_, v)| v.1 > 0).collect();
        if !bad.is_empty() {
            println!("forms with mismatches:");
            for (name, (n, m)) in &bad {
                println!("  {name}: {m} of {n}");
            }
        }
        println!(
            "differential: {ran} cases run ({skipped} skipped: no valid operands), {} forms, \
             {mismatches} mismatches, {secs:.1} s, seed {seed:#x}",
            per_form.len()
        );
        assert_eq!(
            mismatches, 0,
            "the emulator disagrees with the host CPU (seed {seed:#x})"
        );
    }
}
