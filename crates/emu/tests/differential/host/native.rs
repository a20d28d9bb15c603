//! the native side.

use super::*;

/// Runs code natively: a stub loads all GPRs and RFLAGS from the input block, runs the
/// instruction, and stores them to the output block, using only absolute addressing.
pub(crate) struct Native {
    pub(crate) base: u64,
    pub(crate) s64: Stub,
    /// None where the host has no 32-bit user code segment.
    pub(crate) s32: Option<Stub>,
}

/// Code around the instruction under test, at `off` in the mapping.
pub(crate) struct Stub {
    pub(crate) pro: Vec<u8>,
    pub(crate) epi: Vec<u8>,
    pub(crate) off: u64,
}

impl Native {
    pub(crate) fn new() -> Result<Native, String> {
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

    pub(crate) fn stub(&self, bits: u32) -> &Stub {
        if bits == 32 {
            self.s32.as_ref().expect("32-bit code")
        } else {
            &self.s64
        }
    }

    /// Address of the instruction under test (after the prologue).
    pub(crate) fn insn_addr(&self, bits: u32) -> u64 {
        let s = self.stub(bits);
        self.base + s.off + s.pro.len() as u64
    }

    pub(crate) fn run(&self, bits: u32, insn: &[u8], st: &State, data: &[u8]) -> (State, Vec<u8>) {
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
pub(crate) fn stubs(base: u64) -> Result<(Vec<u8>, Vec<u8>), IcedError> {
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
pub(crate) fn user32_cs_usable() -> bool {
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
pub(crate) fn stubs32(base: u64) -> Result<(Stub, Vec<u8>), IcedError> {
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
