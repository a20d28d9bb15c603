//! the emulator side.

use super::*;

pub(crate) struct Emu {
    /// The fixed base address (guest-physical and linear, as natively).
    pub(crate) base: u64,
    pub(crate) mem: GuestMem,
    pub(crate) backend: EmuBackend,
    pub(crate) boot: CpuState,
    /// Blocks the translator translated, over all cases.
    pub(crate) translated: std::cell::Cell<u64>,
    /// Fill the TLB for the data pages before a 64-bit case, so that translated memory
    /// accesses take their inline path rather than the handler.
    warm: bool,
}

impl Emu {
    /// `translate`: every block goes through the block translator ([`palacios_emu::jit`])
    /// the first time it runs; otherwise everything is interpreted.
    pub(crate) fn new(base: u64, translate: bool) -> Emu {
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
        let backend = EmuBackend::new(palacios_emu::EmuOptions {
            no_jit: !translate,
            jit_threshold: Some(1),
            ..Default::default()
        });
        backend.map_memory(&mem).expect("map guest memory");
        Emu {
            base,
            mem,
            backend,
            boot,
            translated: std::cell::Cell::new(0),
            warm: translate,
        }
    }

    /// Run `code` (placed at `code_addr`) from `rip` until HLT, in 64-bit mode or (bits 32)
    /// in compatibility mode.
    pub(crate) fn run(
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
        if self.warm && bits == 64 {
            // `add byte [page], 0` on each page the cases use, then HLT; the TLB survives
            // the register reload below.
            let mut warm = Vec::new();
            for page in 0..3u64 {
                let a = u32::try_from(base + page * 0x1000).expect("buffer below 4 GiB");
                warm.extend_from_slice(&[0x80, 0x04, 0x25]);
                warm.extend_from_slice(&a.to_le_bytes());
                warm.push(0);
            }
            warm.push(0xf4);
            let at = base + TRAMPOLINE_OFF;
            self.mem.write_slice(&warm, GuestAddress(at)).unwrap();
            let mut w = s.clone();
            w.regs.rip = at;
            vcpu.set_state(&w).map_err(|e| e.to_string())?;
            match vcpu.run() {
                Ok(Exit::Hlt) => {}
                other => return Err(format!("TLB warm-up: {other:?}")),
            }
            vcpu.set_regs(&s.regs).map_err(|e| e.to_string())?;
        } else {
            vcpu.set_state(&s).map_err(|e| e.to_string())?;
        }
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
        for (k, v) in vcpu.stats() {
            if k == "emu blocks translated" {
                self.translated.set(self.translated.get() + v);
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
                r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            flags: r.rflags,
        };
        let mut d = vec![0u8; DATA_LEN];
        self.mem.read_slice(&mut d, GuestAddress(base)).unwrap();
        Ok((o, d))
    }
}
