//! Hypercalls: one guest ABI on every backend (see `docs/hypercalls.md`).
//!
//! The id is in RAX, arguments in RBX, RCX, RDX, RSI, RDI; the result goes back in RAX. The
//! emulator exits on VMCALL/VMMCALL ([`crate::Exit::Hypercall`]); every backend also takes the
//! doorbell, an `out` to [`DOORBELL_PORT`]. Handlers are registered by id in [`Hypercalls`] by
//! devices, extensions and the core.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use palacios_x86::{Regs, SRegs};

use crate::backend::{BackendError, Vcpu};
use crate::guest_va::{self, VaError};
use crate::memory::GuestMem;

/// The doorbell: `outb %al, $0xec` with the hypercall's registers.
pub const DOORBELL_PORT: u16 = 0xec;
/// CPUID leaf with the interface's signature; the next leaf has the details.
pub const CPUID_BASE: u32 = 0x4000_0100;
/// The signature in EBX, ECX, EDX of [`CPUID_BASE`].
pub const SIGNATURE: &[u8; 12] = b"PalaciosRsV3";
/// Version of the ABI in `docs/hypercalls.md`.
pub const ABI_VERSION: u32 = 1;

/// Ids of the hypercalls Palacios defines (and this project adds).
pub mod id {
    pub const TEST: u32 = 0x0001;
    pub const SYMCALL_RET: u32 = 0x0535;
    pub const SYMCALL_ERR: u32 = 0x0536;
    pub const SYMMOD_QUERY: u32 = 0x0600;
    pub const GUEST_INFO: u32 = 0x3000;
    pub const OS_DEBUG: u32 = 0xc0c0;
    pub const TIME_CPUFREQ: u32 = 0xd000;
    pub const TIME_RDHTSC: u32 = 0xd001;
}

/// Error results (negative numbers in RAX).
pub mod err {
    /// Unknown id, or not allowed from this privilege level.
    pub const UNKNOWN: i64 = -1;
    pub const EFAULT: i64 = -14;
    pub const EBUSY: i64 = -16;
    pub const EINVAL: i64 = -22;
}

/// The core a hypercall came from, its registers, and guest memory.
pub struct HcallCtx<'a> {
    pub cpu: u32,
    /// The registers; handlers write results here (written back after the handler).
    pub regs: Regs,
    pub vcpu: &'a mut dyn Vcpu,
    pub mem: &'a GuestMem,
    sregs: Option<SRegs>,
    mode: Option<(u8, bool)>,
}

impl<'a> HcallCtx<'a> {
    pub fn new(cpu: u32, regs: Regs, vcpu: &'a mut dyn Vcpu, mem: &'a GuestMem) -> Self {
        HcallCtx {
            cpu,
            regs,
            vcpu,
            mem,
            sregs: None,
            mode: None,
        }
    }

    /// The hypercall's id (EAX: ids fit in 32 bits).
    pub fn id(&self) -> u32 {
        self.regs.rax as u32
    }

    /// Argument `n` (0 = RBX, 1 = RCX, 2 = RDX, 3 = RSI, 4 = RDI), cut to 32 bits outside
    /// 64-bit mode.
    pub fn arg(&mut self, n: usize) -> u64 {
        let r = &self.regs;
        let v = [r.rbx, r.rcx, r.rdx, r.rsi, r.rdi]
            .get(n)
            .copied()
            .unwrap_or(0);
        if self.wide() { v } else { v & 0xffff_ffff }
    }

    /// Set RAX (a negative value is an error).
    pub fn ret(&mut self, v: i64) {
        self.regs.rax = v as u64;
        if !self.wide() {
            self.regs.rax &= 0xffff_ffff;
        }
    }

    /// The segment and control registers (read once, on first use).
    pub fn sregs(&mut self) -> Result<SRegs, BackendError> {
        if let Some(s) = self.sregs {
            return Ok(s);
        }
        let s = self.vcpu.sregs()?;
        self.sregs = Some(s);
        Ok(s)
    }

    /// (CPL, 64-bit mode), read once.
    fn mode(&mut self) -> (u8, bool) {
        if let Some(m) = self.mode {
            return m;
        }
        let m = self.vcpu.cpl_and_64bit().unwrap_or((3, true));
        self.mode = Some(m);
        m
    }

    /// In 64-bit mode (registers are 64 bits wide).
    pub fn wide(&mut self) -> bool {
        self.mode().1
    }

    /// The privilege level (CPL) the call came from.
    pub fn cpl(&mut self) -> u8 {
        self.mode().0
    }

    /// Read guest memory at a pointer argument (virtual when `virt`): at most `max` bytes.
    pub fn read_guest(
        &mut self,
        addr: u64,
        len: u64,
        max: u64,
        virt: bool,
    ) -> Result<Vec<u8>, i64> {
        if len > max {
            return Err(err::EINVAL);
        }
        let s = self.sregs().map_err(|_| err::EFAULT)?;
        guest_va::read(self.mem, &s, addr, len as usize, virt).map_err(va_err)
    }

    /// Write guest memory at a pointer argument (virtual when `virt`).
    pub fn write_guest(&mut self, addr: u64, data: &[u8], virt: bool) -> Result<(), i64> {
        let s = self.sregs().map_err(|_| err::EFAULT)?;
        guest_va::write(self.mem, &s, addr, data, virt).map_err(va_err)
    }

    /// Guest pointers are virtual when paging is on.
    pub fn paging(&mut self) -> bool {
        self.sregs().is_ok_and(|s| s.cr0 & (1 << 31) != 0)
    }
}

fn va_err(_: VaError) -> i64 {
    err::EFAULT
}

/// A hypercall handler.
pub type HcallFn = dyn Fn(&mut HcallCtx) + Send + Sync;

/// Hypercall handlers by id.
#[derive(Default)]
pub struct Hypercalls {
    map: RwLock<BTreeMap<u32, (String, Arc<HcallFn>)>>,
}

impl Hypercalls {
    /// Register `f` for `id`; an id already taken is refused with its owner's name.
    pub fn register(
        &self,
        id: u32,
        name: &str,
        f: impl Fn(&mut HcallCtx) + Send + Sync + 'static,
    ) -> Result<(), String> {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some((owner, _)) = m.get(&id) {
            return Err(format!(
                "hypercall {id:#x} is already registered by {owner}"
            ));
        }
        m.insert(id, (name.to_string(), Arc::new(f)));
        Ok(())
    }

    /// (id, owner) of every registered hypercall.
    pub fn list(&self) -> Vec<(u32, String)> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, (n, _))| (*k, n.clone())).collect()
    }

    /// The handler of `id`.
    pub fn get(&self, id: u32) -> Option<Arc<HcallFn>> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.get(&id).map(|(_, f)| f.clone())
    }

    /// Run the hypercall in `ctx`: unknown ids, and calls from user mode, get -1.
    pub fn dispatch(&self, ctx: &mut HcallCtx) {
        let f = if ctx.cpl() == 0 {
            self.get(ctx.id())
        } else {
            None
        };
        match f {
            Some(f) => f(ctx),
            None => {
                tracing::debug!(
                    "vCPU {}: hypercall {:#x} not handled (returns -1)",
                    ctx.cpu,
                    ctx.id()
                );
                ctx.ret(err::UNKNOWN)
            }
        }
    }
}

/// CPUID leaves of the interface: (leaf, subleaf, [eax, ebx, ecx, edx]).
pub fn cpuid_leaves(vmcall_traps: bool, tsc_khz: u32) -> Vec<(u32, u32, [u32; 4])> {
    let sig = |i: usize| u32::from_le_bytes(SIGNATURE[i * 4..i * 4 + 4].try_into().unwrap());
    vec![
        (CPUID_BASE, 0, [CPUID_BASE + 1, sig(0), sig(1), sig(2)]),
        (
            CPUID_BASE + 1,
            0,
            [
                u32::from(DOORBELL_PORT),
                ABI_VERSION,
                u32::from(vmcall_traps),
                tsc_khz,
            ],
        ),
    ]
}

/// The hypercalls every VM has: TEST, GUEST_INFO, TIME_CPUFREQ and TIME_RDHTSC.
pub fn register_core(
    h: &Hypercalls,
    info: Arc<dyn Fn() -> String + Send + Sync>,
    tsc_khz: Arc<dyn Fn() -> u64 + Send + Sync>,
) -> Result<(), String> {
    h.register(id::TEST, "core (TEST)", |c| {
        let sum = (0..5).fold(0u64, |s, i| s.wrapping_add(c.arg(i)));
        c.regs.rbx = sum;
        c.ret(0);
    })?;
    h.register(id::GUEST_INFO, "core (GUEST_INFO)", move |c| {
        let (buf, len) = (c.arg(0), c.arg(1));
        let text = info();
        let bytes = text.as_bytes();
        if len > 1 << 20 {
            return c.ret(err::EINVAL);
        }
        let n = bytes.len().min(len as usize);
        let virt = c.paging();
        match c.write_guest(buf, &bytes[..n], virt) {
            Ok(()) => c.ret(n as i64),
            Err(e) => c.ret(e),
        }
    })?;
    let khz = tsc_khz.clone();
    h.register(id::TIME_CPUFREQ, "core (TIME_CPUFREQ)", move |c| {
        let k = khz();
        c.regs.rcx = k;
        c.ret(k as i64);
    })?;
    h.register(id::TIME_RDHTSC, "core (TIME_RDHTSC)", |c| {
        let t = host_tsc();
        c.regs.rdx = t >> 32;
        c.regs.rax = t & 0xffff_ffff;
    })?;
    Ok(())
}

/// The host's time-stamp counter (host nanoseconds where there is none).
fn host_tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions on x86-64 (it reads a counter).
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_registered_once_and_listed() {
        let h = Hypercalls::default();
        h.register(0x10, "a", |c| c.ret(1)).unwrap();
        let e = h.register(0x10, "b", |c| c.ret(2)).unwrap_err();
        assert!(e.contains("already registered by a"), "{e}");
        assert_eq!(h.list(), vec![(0x10, "a".to_string())]);
        assert!(h.get(0x11).is_none());
    }

    #[test]
    fn the_cpuid_leaves_carry_the_signature_and_port() {
        let l = cpuid_leaves(true, 2_000_000);
        let [eax, b, c, d] = l[0].2;
        assert_eq!(eax, CPUID_BASE + 1);
        let mut sig = Vec::new();
        for r in [b, c, d] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, SIGNATURE);
        assert_eq!(l[1].2, [0xec, 1, 1, 2_000_000]);
    }
}
