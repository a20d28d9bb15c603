//! x87, SSE and SSE2 against the host CPU: each operation runs natively in this process and in
//! the emulator on the same random inputs (special values included: zeros, infinities, NaNs,
//! denormals, integer extremes) under random MXCSR/FCW rounding, DAZ/FTZ and precision
//! settings, with every exception masked. The vector registers, MXCSR (its sticky flags
//! included), RFLAGS' arithmetic flags, RAX and the x87 results and status word must agree.
//!
//! Not compared: RCPPS/RSQRTPS (approximations; the emulator's are exact), the x87
//! transcendental instructions (double precision here, see exec/x87.rs), FSQRT, FSCALE (its
//! overflow/underflow flags are not modelled), and x87
//! precision control (documented as possibly off by one ulp), and the result of a partial FPREM
//! (its reduction step is implementation-specific; C2 is compared).
//!
//! `PALACIOS_SIMD_CASES` sets the cases per operation (default 300).

#[cfg(not(target_arch = "x86_64"))]
#[test]
fn simd_against_host_cpu() {
    palacios_vmm::test_support::skip_machine(
        "simd",
        "needs an x86_64 host to run the instructions natively",
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_against_host_cpu() {
    host::run();
}

#[cfg(target_arch = "x86_64")]
mod host {
    use iced_x86::code_asm::*;
    use palacios_boot::{BootParams, elf::build_test_elf, elf64};
    use palacios_emu::EmuBackend;
    use palacios_vmm::backend::{Backend, Exit};
    use palacios_vmm::config::BootFormat;
    use palacios_vmm::{GuestMem, MemoryMap};
    use palacios_x86::{CpuState, cr4};
    use vm_memory::{Bytes, GuestAddress};

    /// Input block: xmm0, xmm1 (32 bytes), rax (8), mxcsr (4), fcw (2), then two x87 operands
    /// as 80-bit values at 64 and 80. Output block: xmm0, xmm1, mxcsr, rax, rflags, ST0, ST1,
    /// FSW.
    const IN: u64 = 0x1_0000;
    const OUT: u64 = 0x1_0100;
    const CODE: u64 = 0x2_0000;
    const OUT_LEN: usize = 128;

    type Op = (
        &'static str,
        fn(&mut CodeAssembler) -> Result<(), IcedError>,
    );

    macro_rules! ops {
        ($($name:literal => |$a:ident| $body:expr),* $(,)?) => {
            vec![$(($name, (|$a: &mut CodeAssembler| -> Result<(), IcedError> { $body; Ok(()) }) as fn(&mut CodeAssembler) -> Result<(), IcedError>)),*]
        };
    }

    fn sse_ops() -> Vec<Op> {
        ops![
            "addps" => |a| a.addps(xmm0, xmm1)?,
            "addss" => |a| a.addss(xmm0, xmm1)?,
            "addpd" => |a| a.addpd(xmm0, xmm1)?,
            "addsd" => |a| a.addsd(xmm0, xmm1)?,
            "subps" => |a| a.subps(xmm0, xmm1)?,
            "subsd" => |a| a.subsd(xmm0, xmm1)?,
            "mulps" => |a| a.mulps(xmm0, xmm1)?,
            "mulpd" => |a| a.mulpd(xmm0, xmm1)?,
            "mulss" => |a| a.mulss(xmm0, xmm1)?,
            "divps" => |a| a.divps(xmm0, xmm1)?,
            "divsd" => |a| a.divsd(xmm0, xmm1)?,
            "divss" => |a| a.divss(xmm0, xmm1)?,
            "minps" => |a| a.minps(xmm0, xmm1)?,
            "maxpd" => |a| a.maxpd(xmm0, xmm1)?,
            "minsd" => |a| a.minsd(xmm0, xmm1)?,
            "maxss" => |a| a.maxss(xmm0, xmm1)?,
            "sqrtps" => |a| a.sqrtps(xmm0, xmm1)?,
            "sqrtsd" => |a| a.sqrtsd(xmm0, xmm1)?,
            "sqrtss" => |a| a.sqrtss(xmm0, xmm1)?,
            "sqrtpd" => |a| a.sqrtpd(xmm0, xmm1)?,
            "cmpps lt" => |a| a.cmpps(xmm0, xmm1, 1)?,
            "cmpps unord" => |a| a.cmpps(xmm0, xmm1, 3)?,
            "cmppd nle" => |a| a.cmppd(xmm0, xmm1, 6)?,
            "cmpss eq" => |a| a.cmpss(xmm0, xmm1, 0)?,
            "cmpsd ord" => |a| a.cmpsd_3(xmm0, xmm1, 7)?,
            "comiss" => |a| a.comiss(xmm0, xmm1)?,
            "ucomiss" => |a| a.ucomiss(xmm0, xmm1)?,
            "comisd" => |a| a.comisd(xmm0, xmm1)?,
            "ucomisd" => |a| a.ucomisd(xmm0, xmm1)?,
            "cvtsi2ss r64" => |a| a.cvtsi2ss(xmm0, rax)?,
            "cvtsi2sd r32" => |a| a.cvtsi2sd(xmm0, eax)?,
            "cvtsi2ss r32" => |a| a.cvtsi2ss(xmm0, eax)?,
            "cvtss2si r64" => |a| a.cvtss2si(rax, xmm1)?,
            "cvttsd2si r32" => |a| a.cvttsd2si(eax, xmm1)?,
            "cvtsd2si r64" => |a| a.cvtsd2si(rax, xmm1)?,
            "cvttss2si r32" => |a| a.cvttss2si(eax, xmm1)?,
            "cvtss2sd" => |a| a.cvtss2sd(xmm0, xmm1)?,
            "cvtsd2ss" => |a| a.cvtsd2ss(xmm0, xmm1)?,
            "cvtps2pd" => |a| a.cvtps2pd(xmm0, xmm1)?,
            "cvtpd2ps" => |a| a.cvtpd2ps(xmm0, xmm1)?,
            "cvtdq2ps" => |a| a.cvtdq2ps(xmm0, xmm1)?,
            "cvtps2dq" => |a| a.cvtps2dq(xmm0, xmm1)?,
            "cvttps2dq" => |a| a.cvttps2dq(xmm0, xmm1)?,
            "cvtdq2pd" => |a| a.cvtdq2pd(xmm0, xmm1)?,
            "cvtpd2dq" => |a| a.cvtpd2dq(xmm0, xmm1)?,
            "cvttpd2dq" => |a| a.cvttpd2dq(xmm0, xmm1)?,
            "andnps" => |a| a.andnps(xmm0, xmm1)?,
            "xorpd" => |a| a.xorpd(xmm0, xmm1)?,
            "unpcklps" => |a| a.unpcklps(xmm0, xmm1)?,
            "unpckhpd" => |a| a.unpckhpd(xmm0, xmm1)?,
            "shufps" => |a| a.shufps(xmm0, xmm1, 0x1b)?,
            "shufpd" => |a| a.shufpd(xmm0, xmm1, 2)?,
            "movmskps" => |a| a.movmskps(eax, xmm1)?,
            "movmskpd" => |a| a.movmskpd(eax, xmm1)?,
            "movss" => |a| a.movss(xmm0, xmm1)?,
            "movsd" => |a| a.movsd_2(xmm0, xmm1)?,
            "movhlps" => |a| a.movhlps(xmm0, xmm1)?,
            "movlhps" => |a| a.movlhps(xmm0, xmm1)?,
            "movq xmm" => |a| a.movq(xmm0, xmm1)?,
            "movd xmm,r32" => |a| a.movd(xmm0, eax)?,
            "movq r64,xmm" => |a| a.movq(rax, xmm1)?,
            "paddb" => |a| a.paddb(xmm0, xmm1)?,
            "paddw" => |a| a.paddw(xmm0, xmm1)?,
            "paddd" => |a| a.paddd(xmm0, xmm1)?,
            "paddq" => |a| a.paddq(xmm0, xmm1)?,
            "psubb" => |a| a.psubb(xmm0, xmm1)?,
            "psubq" => |a| a.psubq(xmm0, xmm1)?,
            "paddsb" => |a| a.paddsb(xmm0, xmm1)?,
            "paddsw" => |a| a.paddsw(xmm0, xmm1)?,
            "paddusb" => |a| a.paddusb(xmm0, xmm1)?,
            "psubusw" => |a| a.psubusw(xmm0, xmm1)?,
            "psubsw" => |a| a.psubsw(xmm0, xmm1)?,
            "pmullw" => |a| a.pmullw(xmm0, xmm1)?,
            "pmulhw" => |a| a.pmulhw(xmm0, xmm1)?,
            "pmulhuw" => |a| a.pmulhuw(xmm0, xmm1)?,
            "pmuludq" => |a| a.pmuludq(xmm0, xmm1)?,
            "pmaddwd" => |a| a.pmaddwd(xmm0, xmm1)?,
            "pavgb" => |a| a.pavgb(xmm0, xmm1)?,
            "pavgw" => |a| a.pavgw(xmm0, xmm1)?,
            "pminub" => |a| a.pminub(xmm0, xmm1)?,
            "pmaxsw" => |a| a.pmaxsw(xmm0, xmm1)?,
            "psadbw" => |a| a.psadbw(xmm0, xmm1)?,
            "pcmpeqb" => |a| a.pcmpeqb(xmm0, xmm1)?,
            "pcmpeqd" => |a| a.pcmpeqd(xmm0, xmm1)?,
            "pcmpgtw" => |a| a.pcmpgtw(xmm0, xmm1)?,
            "pcmpgtb" => |a| a.pcmpgtb(xmm0, xmm1)?,
            "packsswb" => |a| a.packsswb(xmm0, xmm1)?,
            "packssdw" => |a| a.packssdw(xmm0, xmm1)?,
            "packuswb" => |a| a.packuswb(xmm0, xmm1)?,
            "punpcklbw" => |a| a.punpcklbw(xmm0, xmm1)?,
            "punpckhwd" => |a| a.punpckhwd(xmm0, xmm1)?,
            "punpckldq" => |a| a.punpckldq(xmm0, xmm1)?,
            "punpckhqdq" => |a| a.punpckhqdq(xmm0, xmm1)?,
            "psllw reg" => |a| a.psllw(xmm0, xmm1)?,
            "psrad reg" => |a| a.psrad(xmm0, xmm1)?,
            "psrlq imm" => |a| a.psrlq(xmm0, 13)?,
            "psraw imm" => |a| a.psraw(xmm0, 3)?,
            "pslld imm" => |a| a.pslld(xmm0, 31)?,
            "pslldq" => |a| a.pslldq(xmm0, 5)?,
            "psrldq" => |a| a.psrldq(xmm0, 11)?,
            "pshufd" => |a| a.pshufd(xmm0, xmm1, 0x9c)?,
            "pshuflw" => |a| a.pshuflw(xmm0, xmm1, 0x4e)?,
            "pshufhw" => |a| a.pshufhw(xmm0, xmm1, 0xb1)?,
            "pmovmskb" => |a| a.pmovmskb(eax, xmm1)?,
            "pinsrw" => |a| a.pinsrw(xmm0, eax, 5)?,
            "pextrw" => |a| a.pextrw(eax, xmm1, 6)?,
            "mmx paddsw" => |a| { a.movdq2q(mm0, xmm0)?; a.movdq2q(mm1, xmm1)?; a.paddsw(mm0, mm1)?; a.movq2dq(xmm0, mm0)?; a.emms()? },
            "mmx pmaddwd" => |a| { a.movdq2q(mm0, xmm0)?; a.movdq2q(mm1, xmm1)?; a.pmaddwd(mm0, mm1)?; a.movq2dq(xmm0, mm0)?; a.emms()? },
            "cvtpi2ps" => |a| { a.movdq2q(mm1, xmm1)?; a.cvtpi2ps(xmm0, mm1)?; a.emms()? },
            "cvttpd2pi" => |a| { a.cvttpd2pi(mm0, xmm1)?; a.movq2dq(xmm0, mm0)?; a.emms()? },
        ]
    }

    /// x87 operations on ST0 = operand A, ST1 = operand B (loaded B first).
    fn x87_ops() -> Vec<Op> {
        ops![
            "fadd" => |a| a.fadd_2(st0, st1)?,
            "fsub" => |a| a.fsub_2(st0, st1)?,
            "fsubr" => |a| a.fsubr_2(st0, st1)?,
            "fmul" => |a| a.fmul_2(st0, st1)?,
            "fdiv" => |a| a.fdiv_2(st0, st1)?,
            "fdivrp" => |a| { a.fdivrp(st1, st0)?; a.fld1()? },
            "fprem" => |a| a.fprem()?,
            "fprem1" => |a| a.fprem1()?,
            "frndint" => |a| a.frndint()?,
            "fxtract" => |a| { a.fxtract()?; a.fstp(st2)? },
            "fcom" => |a| a.fcom_2(st0, st1)?,
            "fucomi" => |a| a.fucomi(st0, st1)?,
            "fcomi" => |a| a.fcomi(st0, st1)?,
            "fxam" => |a| a.fxam()?,
            "ftst" => |a| a.ftst()?,
            "fchs fabs" => |a| { a.fchs()?; a.fxch(st0, st1)?; a.fabs()? },
            "fst m32 fld" => |a| { a.fst(dword_ptr(rsi + 96))?; a.fld(dword_ptr(rsi + 96))? },
            "fst m64 fld" => |a| { a.fst(qword_ptr(rsi + 96))?; a.fld(qword_ptr(rsi + 96))? },
            "fistp m64 fild" => |a| { a.fistp(qword_ptr(rsi + 96))?; a.fild(qword_ptr(rsi + 96))? },
            "fist m32 fild" => |a| { a.fist(dword_ptr(rsi + 96))?; a.fild(dword_ptr(rsi + 96))? },
            "fisttp m16 fild" => |a| { a.fisttp(word_ptr(rsi + 96))?; a.fild(word_ptr(rsi + 96))? },
            "fcmovb" => |a| a.fcmovb(st0, st1)?,
            "fldpi faddp" => |a| { a.fldpi()?; a.faddp(st1, st0)? },
            "fldl2e fmulp" => |a| { a.fldl2e()?; a.fmulp(st1, st0)? },
        ]
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// A float bit pattern of `bits` (32 or 64), often a special value.
        fn float(&mut self, bits: u32) -> u64 {
            let r = self.next();
            let (man, mask) = if bits == 32 {
                (23, 0xffff_ffffu64)
            } else {
                (52, u64::MAX)
            };
            let sign = (r & 1) << (bits - 1);
            let expmax = (1u64 << (bits - 1 - man)) - 1;
            let frac = self.next() & ((1 << man) - 1);
            let v = match (r >> 1) % 10 {
                0 => 0,
                1 => expmax << man,                 // infinity
                2 => (expmax << man) | frac.max(1), // NaN
                3 => frac.max(1),                   // denormal
                4 => ((expmax / 2 + (r >> 8) % 8) << man) | (frac & !0xfff), // small ints
                5 => (((r >> 8) % 0x30 + expmax / 2 + 20) << man) | frac, // near int limits
                _ => self.next() & (mask >> 1),
            };
            (v | sign) & mask
        }
        fn vector(&mut self) -> u128 {
            match self.next() % 3 {
                0 => (0..4).fold(0, |v, k| v | (u128::from(self.float(32)) << (32 * k))),
                1 => u128::from(self.float(64)) | (u128::from(self.float(64)) << 64),
                _ => u128::from(self.next()) | (u128::from(self.next()) << 64),
            }
        }
        /// An 80-bit value from a random double or integer (exactly representable).
        fn ext(&mut self) -> [u8; 10] {
            let f = f64::from_bits(self.float(64));
            let v: f64 = if self.next() % 4 == 0 {
                (self.next() as i64 >> (self.next() % 60)) as f64
            } else {
                f
            };
            f64_to_ext(v)
        }
    }

    fn f64_to_ext(f: f64) -> [u8; 10] {
        // Exact conversion of a double into the x87 format (finite, zero, inf, NaN).
        let b = f.to_bits();
        let sign = (b >> 63) as u16;
        let exp = ((b >> 52) & 0x7ff) as i32;
        let frac = b & ((1 << 52) - 1);
        let (e, m): (u16, u64) = if exp == 0 && frac == 0 {
            (0, 0)
        } else if exp == 0x7ff {
            (0x7fff, (1 << 63) | (frac << 11))
        } else if exp == 0 {
            let lz = frac.leading_zeros() - 11;
            ((1 - 1023 + 16383 - lz as i32) as u16, frac << (11 + lz))
        } else {
            ((exp - 1023 + 16383) as u16, (1 << 63) | (frac << 11))
        };
        let mut out = [0u8; 10];
        out[..8].copy_from_slice(&m.to_le_bytes());
        out[8..].copy_from_slice(&((sign << 15) | e).to_le_bytes());
        out
    }

    /// The code around an operation. Natively it saves and restores the host's MXCSR and
    /// leaves the x87 stack empty; in the guest it ends with HLT.
    fn assemble(op: &Op, x87: bool, native: bool) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        (|| -> Result<(), IcedError> {
            a.stmxcsr(dword_ptr(rsi + 120))?;
            a.ldmxcsr(dword_ptr(rdi + 40))?;
            a.movdqu(xmm0, xmmword_ptr(rdi))?;
            a.movdqu(xmm1, xmmword_ptr(rdi + 16))?;
            a.mov(rax, qword_ptr(rdi + 32))?;
            if x87 {
                a.fninit()?;
                a.fldcw(word_ptr(rdi + 44))?;
                a.fld(tword_ptr(rdi + 80))?;
                a.fld(tword_ptr(rdi + 64))?;
            }
            // RFLAGS arithmetic flags start at zero on both sides.
            a.xor(ecx, ecx)?;
            a.mov(rcx, rax)?;
            a.test(ecx, 0)?;
            (op.1)(&mut a)?;
            a.pushfq()?;
            a.pop(qword_ptr(rsi + 56))?;
            a.movdqu(xmmword_ptr(rsi), xmm0)?;
            a.movdqu(xmmword_ptr(rsi + 16), xmm1)?;
            a.stmxcsr(dword_ptr(rsi + 32))?;
            a.mov(qword_ptr(rsi + 40), rax)?;
            if x87 {
                a.fnstsw(word_ptr(rsi + 48))?;
                a.fstp(tword_ptr(rsi + 64))?;
                a.fstp(tword_ptr(rsi + 80))?;
                a.fninit()?;
            }
            a.ldmxcsr(dword_ptr(rsi + 120))?;
            if native {
                a.ret()?;
            } else {
                a.hlt()?;
            }
            Ok(())
        })()
        .unwrap();
        a.assemble(0).unwrap()
    }

    fn native(code: &[u8], input: &[u8; 128]) -> [u8; OUT_LEN] {
        let mut out = [0u8; OUT_LEN];
        // SAFETY: a fresh anonymous RWX mapping holds the assembled code, which only reads
        // `input`, writes `out` (through RDI/RSI as the System V ABI passes them), preserves
        // every callee-saved register and the host MXCSR, and leaves the x87 stack empty.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
            let f: extern "C" fn(*const u8, *mut u8) = std::mem::transmute(p);
            f(input.as_ptr(), out.as_mut_ptr());
            libc::munmap(p, 4096);
        }
        out
    }

    /// A long-mode core with CR4.OSFXSR/OSXMMEXCPT (the 64-bit ELF loader's entry state).
    pub struct Emu {
        pub mem: GuestMem,
        pub backend: EmuBackend,
        pub boot: CpuState,
    }

    impl Emu {
        pub fn new() -> Emu {
            let map = MemoryMap::pc(16 << 20);
            let mem = map.create_memory().unwrap();
            let elf = build_test_elf(true, 0x10_0000, &[(0x10_0000, &[0xf4], 1)]);
            let p = BootParams {
                format: BootFormat::Elf64,
                image: &elf,
                load_addr: None,
                entry: None,
                cmdline: "",
                modules: Vec::new(),
            };
            let mut boot = elf64::load(&mem, &map, &p).unwrap();
            boot.sregs.cr4 |= cr4::OSFXSR | cr4::OSXMMEXCPT;
            boot.sregs.cr0 |= palacios_x86::cr0::NE | palacios_x86::cr0::MP;
            let backend = EmuBackend::default();
            backend.map_memory(&mem).unwrap();
            Emu { mem, backend, boot }
        }

        fn run(&self, code: &[u8], input: &[u8; 128]) -> [u8; OUT_LEN] {
            self.mem.write_slice(code, GuestAddress(CODE)).unwrap();
            self.mem.write_slice(input, GuestAddress(IN)).unwrap();
            self.mem
                .write_slice(&[0u8; OUT_LEN], GuestAddress(OUT))
                .unwrap();
            let mut v = self.backend.create_vcpu(0).unwrap();
            let mut s = self.boot.clone();
            s.regs.rip = CODE;
            s.regs.rdi = IN;
            s.regs.rsi = OUT;
            s.regs.rsp = 0x8_0000;
            v.set_state(&s).unwrap();
            loop {
                match v.run().unwrap() {
                    Exit::Hlt => break,
                    Exit::Interrupted => {}
                    e => panic!("emulator exit {e:?} at {:#x}; {:?}", v.rip(), v.stats()),
                }
            }
            let mut out = [0u8; OUT_LEN];
            self.mem.read_slice(&mut out, GuestAddress(OUT)).unwrap();
            out
        }
    }

    pub fn run() {
        let cases: usize = std::env::var("PALACIOS_SIMD_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let emu = Emu::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut bad = Vec::new();
        let mut total = 0;
        for (x87, list) in [(false, sse_ops()), (true, x87_ops())] {
            for op in &list {
                let nat = assemble(op, x87, true);
                let gst = assemble(op, x87, false);
                for case in 0..cases {
                    let mut input = [0u8; 128];
                    input[..16].copy_from_slice(&rng.vector().to_le_bytes());
                    input[16..32].copy_from_slice(&rng.vector().to_le_bytes());
                    let rax_in = match rng.next() % 4 {
                        0 => rng.next() as i32 as i64 as u64,
                        1 => 1u64 << 63,
                        _ => rng.next(),
                    };
                    input[32..40].copy_from_slice(&rax_in.to_le_bytes());
                    // All exceptions masked; random rounding, DAZ and FTZ.
                    let r = rng.next();
                    let mxcsr = 0x1f80
                        | ((r & 3) << 13) as u32
                        | if r & 4 != 0 { 0x40 } else { 0 }
                        | if r & 8 != 0 { 0x8000 } else { 0 };
                    input[40..44].copy_from_slice(&mxcsr.to_le_bytes());
                    // FCW: masked, 64-bit precision, random rounding.
                    let fcw: u16 = 0x37f | (((r >> 4) & 3) << 10) as u16;
                    input[44..46].copy_from_slice(&fcw.to_le_bytes());
                    input[64..74].copy_from_slice(&rng.ext());
                    input[80..90].copy_from_slice(&rng.ext());
                    let want = native(&nat, &input);
                    let got = emu.run(&gst, &input);
                    total += 1;
                    // Compare xmm0/xmm1, MXCSR, RAX, arithmetic flags; x87: FSW (C0-C3 and
                    // the flags, not TOP), ST0 and ST1.
                    let flags = |o: &[u8; OUT_LEN]| {
                        u64::from_le_bytes(o[56..64].try_into().unwrap()) & 0x8d5
                    };
                    let mut same = want[..48] == got[..48] && flags(&want) == flags(&got);
                    if x87 {
                        let fsw = |o: &[u8; OUT_LEN]| u16::from_le_bytes([o[48], o[49]]) & 0x477f;
                        // A partial FPREM (C2 set: exponents 64 or more apart) reduces by an
                        // implementation-specific amount; only C2 itself is compared.
                        if op.0.starts_with("fprem") && fsw(&want) & 0x400 != 0 {
                            same &= fsw(&got) & 0x400 != 0;
                        } else {
                            same &= fsw(&want) == fsw(&got) && want[64..90] == got[64..90];
                        }
                    }
                    if !same && bad.len() < 20 {
                        bad.push(format!(
                            "{} case {case}: fsw host {:04x} emu {:04x}; input {}\n  host {}\n  emu  {}",
                            op.0,
                            u16::from_le_bytes([want[48], want[49]]),
                            u16::from_le_bytes([got[48], got[49]]),
                            hex(&input[..96]),
                            hex(&want[..96]),
                            hex(&got[..96])
                        ));
                    }
                }
            }
        }
        eprintln!("simd: {total} cases");
        assert!(
            bad.is_empty(),
            "{} mismatches:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    fn hex(b: &[u8]) -> String {
        b.chunks(16)
            .map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<String>())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// 16-byte SSE accesses to MMIO go out as 8-byte exits (and never crash the VMM).
#[cfg(target_arch = "x86_64")]
#[test]
fn sse_operands_on_mmio_are_split_into_8_byte_exits() {
    use iced_x86::code_asm::*;
    use palacios_vmm::backend::{Backend, Exit};
    use vm_memory::{Bytes, GuestAddress};
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0xfec0_0000u64).unwrap();
    a.movdqu(xmm0, xmmword_ptr(rax)).unwrap();
    a.movdqu(xmmword_ptr(rax + 0x10), xmm0).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x2_0000).unwrap();
    let emu = host::Emu::new();
    emu.mem.write_slice(&code, GuestAddress(0x2_0000)).unwrap();
    let mut v = emu.backend.create_vcpu(0).unwrap();
    let mut s = emu.boot.clone();
    s.regs.rip = 0x2_0000;
    v.set_state(&s).unwrap();
    let mut reads = Vec::new();
    let mut writes = Vec::new();
    loop {
        match v.run().unwrap() {
            Exit::MmioRead { addr, size } => {
                reads.push((addr, size));
                assert!(reads.len() < 10, "MMIO reads repeat: {reads:x?}");
                let val = if addr == 0xfec0_0000 {
                    0x1111_2222_3333_4444u64
                } else {
                    0x5555_6666_7777_8888
                };
                v.complete_read(&val.to_le_bytes()[..size as usize]);
            }
            Exit::MmioWrite { addr, data } => writes.push((addr, data.as_slice().to_vec())),
            Exit::Hlt => break,
            Exit::Interrupted => {}
            e => panic!("unexpected exit {e:?}"),
        }
    }
    assert_eq!(reads, [(0xfec0_0000, 8), (0xfec0_0008, 8)]);
    assert_eq!(
        writes,
        [
            (0xfec0_0010, 0x1111_2222_3333_4444u64.to_le_bytes().to_vec()),
            (0xfec0_0018, 0x5555_6666_7777_8888u64.to_le_bytes().to_vec()),
        ]
    );
}
