//! Symbiotic interfaces (see `docs/hypercalls.md`): SymSpy's shared page, SymCall's upcall
//! registration and requests, SymMod's module queue. The SymCall itself runs in the exit loop
//! ([`crate::vm`]), which owns the core.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::hypercall::{HcallCtx, err};
use crate::memory::GuestMem;
use crate::msr::MsrDevice;

/// SymSpy's page address MSR.
pub const SYMSPY_MSR: u32 = 0x534;
/// SymCall registration MSRs: entry RIP, stack, CS selector, GS base, FS base. Palacios
/// numbers them 0x536-0x539 and 0x540 (0x53a-0x53f are not SymCall's and raise #GP).
pub const SYMCALL_RIP_MSR: u32 = 0x536;
pub const SYMCALL_RSP_MSR: u32 = 0x537;
pub const SYMCALL_CS_MSR: u32 = 0x538;
pub const SYMCALL_GS_MSR: u32 = 0x539;
pub const SYMCALL_FS_MSR: u32 = 0x540;
/// The page's magic (bytes "YS3V").
pub const SYMSPY_MAGIC: u32 = 0x5633_5359;
const GUEST_HALF: u64 = 2048;
/// Largest SymMod blob.
pub const SYMMOD_MAX: usize = 16 << 20;

/// A SymCall request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SymCallRequest {
    pub call: u64,
    #[serde(default)]
    pub args: Vec<u64>,
    /// Give up (and restore the guest) after this long.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Run the call this many times back to back (a benchmark); the result is the last one's.
    #[serde(default = "one")]
    pub repeat: u32,
}

fn default_timeout_ms() -> u64 {
    2000
}
fn one() -> u32 {
    1
}

/// A finished SymCall.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SymCallResult {
    /// The guest's status (RBX of SYMCALL_RET; 0 = ok).
    pub status: u64,
    /// RCX, RDX, RSI, RDI of SYMCALL_RET.
    pub results: [u64; 4],
    /// Exits the call took (the last repetition).
    pub exits: u64,
    /// Mean time per call in the vCPU thread, entry setup to restore, in nanoseconds.
    pub ns_per_call: u64,
}

/// Why a SymCall did not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SymCallError {
    #[error("the guest has not registered a SymCall entry point on core {0} (MSR 0x536 is 0)")]
    NotRegistered(u32),
    #[error("a SymCall is already running on core {0}: nesting is refused")]
    Nested(u32),
    #[error("the SymCall reported an error: code {0:#x} (SYMCALL_ERR)")]
    GuestError(u64),
    #[error("the SymCall faulted: {0}; the guest's state was restored")]
    Fault(String),
    #[error("the SymCall did not return within {0} ms; the guest's state was restored")]
    Timeout(u64),
    #[error("{0}")]
    Failed(String),
}

type Reply = std::sync::mpsc::Sender<Result<SymCallResult, SymCallError>>;

/// SymCall registration of one core, and a request waiting for it.
#[derive(Default)]
struct CoreSym {
    regs: Mutex<[u64; 5]>,
    pending: Mutex<Option<(SymCallRequest, Reply)>>,
    has_pending: AtomicBool,
    running: AtomicBool,
}

/// The checkpoint state.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SymState {
    pub symspy_gpa: u64,
    pub symcall: Vec<[u64; 5]>,
}

/// The symbiotic interfaces of one VM.
pub struct Symbiotic {
    mem: GuestMem,
    spy_gpa: Mutex<u64>,
    spy_seq: Mutex<u32>,
    vmm_info: Arc<dyn Fn() -> String + Send + Sync>,
    cores: Vec<CoreSym>,
    modules: Mutex<VecDeque<Vec<u8>>>,
}

impl Symbiotic {
    pub fn new(mem: GuestMem, cores: u32, vmm_info: Arc<dyn Fn() -> String + Send + Sync>) -> Self {
        Symbiotic {
            mem,
            spy_gpa: Mutex::new(0),
            spy_seq: Mutex::new(0),
            vmm_info,
            cores: (0..cores).map(|_| CoreSym::default()).collect(),
            modules: Mutex::new(VecDeque::new()),
        }
    }

    // ---- SymSpy ------------------------------------------------------------------------

    /// The registered page (0: none).
    pub fn symspy_page(&self) -> u64 {
        *lock(&self.spy_gpa)
    }

    /// Register the page at `gpa` (0 unregisters) and fill the VMM half.
    fn set_symspy(&self, gpa: u64) -> bool {
        if gpa == 0 {
            *lock(&self.spy_gpa) = 0;
            return true;
        }
        if gpa & 0xfff != 0 || !crate::memory::is_ram(&self.mem, gpa, 4096) {
            tracing::debug!("SymSpy: page {gpa:#x} is not a 4 KiB page of guest RAM: refused");
            return false;
        }
        *lock(&self.spy_gpa) = gpa;
        self.publish();
        true
    }

    /// Write the VMM half of the page again (its sequence number moves on).
    pub fn publish(&self) {
        let gpa = self.symspy_page();
        if gpa == 0 {
            return;
        }
        let seq = {
            let mut s = lock(&self.spy_seq);
            *s = s.wrapping_add(1);
            *s
        };
        let mut text = (self.vmm_info)().into_bytes();
        text.truncate(2048 - 16 - 1);
        text.push(0);
        let mut half = vec![0u8; 2048];
        half[0..4].copy_from_slice(&SYMSPY_MAGIC.to_le_bytes());
        half[4..8].copy_from_slice(&1u32.to_le_bytes());
        half[8..12].copy_from_slice(&seq.to_le_bytes());
        half[16..16 + text.len()].copy_from_slice(&text);
        let _ = self.mem.write_slice(&half, GuestAddress(gpa));
    }

    /// The guest half: its sequence number and its `key=value` lines.
    pub fn symspy_guest(&self) -> Option<(u32, Vec<(String, String)>)> {
        let gpa = self.symspy_page();
        if gpa == 0 {
            return None;
        }
        let mut half = vec![0u8; 2048];
        self.mem
            .read_slice(&mut half, GuestAddress(gpa + GUEST_HALF))
            .ok()?;
        let seq = u32::from_le_bytes(half[0..4].try_into().ok()?);
        Some((seq, parse_lines(&half[4..])))
    }

    // ---- SymCall -----------------------------------------------------------------------

    /// Core `cpu`'s registration: entry RIP, stack, CS, GS base, FS base.
    pub fn symcall_regs(&self, cpu: u32) -> Option<[u64; 5]> {
        self.cores.get(cpu as usize).map(|c| *lock(&c.regs))
    }

    /// Run a SymCall on core `cpu` and wait for it (the exit loop serves it).
    pub fn call(
        &self,
        vm: &crate::control::VmHandle,
        cpu: u32,
        req: SymCallRequest,
    ) -> Result<SymCallResult, SymCallError> {
        let c = self
            .cores
            .get(cpu as usize)
            .ok_or_else(|| SymCallError::Failed(format!("no core {cpu} in this VM")))?;
        if lock(&c.regs)[0] == 0 {
            return Err(SymCallError::NotRegistered(cpu));
        }
        let timeout = Duration::from_millis(req.timeout_ms.clamp(1, 600_000));
        let repeat = u64::from(req.repeat.clamp(1, 1_000_000));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut p = lock(&c.pending);
            if p.is_some() || c.running.load(Ordering::Acquire) {
                return Err(SymCallError::Nested(cpu));
            }
            *p = Some((req, tx));
            c.has_pending.store(true, Ordering::Release);
        }
        vm.wakers().wake(cpu);
        let deadline = std::time::Instant::now() + timeout * (repeat.min(1000) as u32);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left.max(Duration::from_millis(20))) {
                Ok(r) => return r,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(SymCallError::Failed(
                        "the core ended before it ran the SymCall".into(),
                    ));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if vm.is_stopping() {
                        lock(&c.pending).take();
                        return Err(SymCallError::Failed("the VM is stopping".into()));
                    }
                    // Past the deadline: kick the core so its loop sees the timeout.
                    if std::time::Instant::now() >= deadline {
                        vm.wakers().wake(cpu);
                    }
                }
            }
        }
    }

    /// A request is waiting for core `cpu` (cheap: one atomic load).
    pub fn has_request(&self, cpu: u32) -> bool {
        self.cores
            .get(cpu as usize)
            .is_some_and(|c| c.has_pending.load(Ordering::Acquire))
    }

    /// Take core `cpu`'s request; the core is then running a SymCall until [`Symbiotic::done`].
    pub fn take_request(&self, cpu: u32) -> Option<(SymCallRequest, Reply)> {
        let c = self.cores.get(cpu as usize)?;
        let mut p = lock(&c.pending);
        c.has_pending.store(false, Ordering::Release);
        let r = p.take();
        if r.is_some() {
            c.running.store(true, Ordering::Release);
        }
        r
    }

    /// Core `cpu` finished its SymCall.
    pub fn done(&self, cpu: u32) {
        if let Some(c) = self.cores.get(cpu as usize) {
            c.running.store(false, Ordering::Release);
        }
    }

    /// Refuse the request waiting for core `cpu` (one arrived while a SymCall ran there).
    pub fn refuse_nested(&self, cpu: u32) {
        if let Some((_, reply)) = self.take_request_raw(cpu) {
            let _ = reply.send(Err(SymCallError::Nested(cpu)));
        }
    }

    fn take_request_raw(&self, cpu: u32) -> Option<(SymCallRequest, Reply)> {
        let c = self.cores.get(cpu as usize)?;
        let mut p = lock(&c.pending);
        c.has_pending.store(false, Ordering::Release);
        p.take()
    }

    // ---- SymMod ------------------------------------------------------------------------

    /// Queue a module blob for the guest to fetch.
    pub fn queue_module(&self, blob: Vec<u8>) -> Result<usize, String> {
        if blob.is_empty() || blob.len() > SYMMOD_MAX {
            return Err(format!(
                "a module must be 1 byte to {} MiB, not {} bytes",
                SYMMOD_MAX >> 20,
                blob.len()
            ));
        }
        let mut q = lock(&self.modules);
        if q.len() >= 16 {
            return Err("16 modules are already waiting for the guest".into());
        }
        q.push_back(blob);
        Ok(q.len())
    }

    /// Modules waiting for the guest.
    pub fn modules_waiting(&self) -> usize {
        lock(&self.modules).len()
    }

    /// SYMMOD_QUERY: RBX = module number, RCX = buffer (0: size only), RDX = its length.
    /// A module copied in full is taken off the queue.
    fn symmod_query(&self, c: &mut HcallCtx) {
        let (n, buf, len) = (c.arg(0), c.arg(1), c.arg(2));
        let blob = {
            let q = lock(&self.modules);
            match q.get(n as usize) {
                Some(b) => b.clone(),
                None => return c.ret(err::UNKNOWN),
            }
        };
        if buf != 0 {
            if len < blob.len() as u64 {
                return c.ret(err::EINVAL);
            }
            let virt = c.paging();
            if let Err(e) = c.write_guest(buf, &blob, virt) {
                return c.ret(e);
            }
            let mut q = lock(&self.modules);
            if n == 0 && q.front().is_some_and(|b| *b == blob) {
                q.pop_front();
            }
        }
        c.ret(blob.len() as i64);
    }

    /// Register SymSpy's and SymCall's MSRs and the SymMod hypercall.
    pub fn attach(self: &Arc<Self>, ctx: &mut crate::BuildCtx) -> Result<(), String> {
        ctx.msrs.insert(SYMSPY_MSR, SYMSPY_MSR, self.clone())?;
        ctx.msrs
            .insert(SYMCALL_RIP_MSR, SYMCALL_FS_MSR, self.clone())?;
        let me = self.clone();
        ctx.hypercalls.register(
            crate::hypercall::id::SYMMOD_QUERY,
            "core (SymMod)",
            move |c| me.symmod_query(c),
        )?;
        Ok(())
    }

    pub fn save(&self) -> SymState {
        SymState {
            symspy_gpa: self.symspy_page(),
            symcall: self.cores.iter().map(|c| *lock(&c.regs)).collect(),
        }
    }

    pub fn restore(&self, s: SymState) -> Result<(), String> {
        if s.symcall.len() != self.cores.len() {
            return Err(format!(
                "SymCall registrations for {} cores, this VM has {}",
                s.symcall.len(),
                self.cores.len()
            ));
        }
        if s.symspy_gpa != 0
            && (s.symspy_gpa & 0xfff != 0 || !crate::memory::is_ram(&self.mem, s.symspy_gpa, 4096))
        {
            return Err(format!("SymSpy page {:#x} is not guest RAM", s.symspy_gpa));
        }
        *lock(&self.spy_gpa) = s.symspy_gpa;
        for (c, r) in self.cores.iter().zip(s.symcall) {
            *lock(&c.regs) = r;
        }
        Ok(())
    }
}

/// Index of a SymCall MSR in a core's registration.
fn symcall_slot(msr: u32) -> Option<usize> {
    match msr {
        SYMCALL_RIP_MSR => Some(0),
        SYMCALL_RSP_MSR => Some(1),
        SYMCALL_CS_MSR => Some(2),
        SYMCALL_GS_MSR => Some(3),
        SYMCALL_FS_MSR => Some(4),
        _ => None,
    }
}

impl MsrDevice for Symbiotic {
    fn read(&self, cpu: u32, msr: u32) -> Option<u64> {
        if msr == SYMSPY_MSR {
            return Some(self.symspy_page());
        }
        let i = symcall_slot(msr)?;
        self.symcall_regs(cpu).map(|r| r[i])
    }
    fn write(&self, cpu: u32, msr: u32, value: u64) -> bool {
        if msr == SYMSPY_MSR {
            return self.set_symspy(value);
        }
        match (symcall_slot(msr), self.cores.get(cpu as usize)) {
            (Some(i), Some(c)) => {
                lock(&c.regs)[i] = value;
                true
            }
            _ => false,
        }
    }
}

/// `key=value` lines up to the first NUL (lines without `=` are skipped).
pub fn parse_lines(b: &[u8]) -> Vec<(String, String)> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryMap;

    fn sym() -> Symbiotic {
        let mem = MemoryMap::pc(16 << 20).create_memory().unwrap();
        Symbiotic::new(mem, 2, Arc::new(|| "vmm=palacios-rs\ncores=2\n".into()))
    }

    #[test]
    fn symspy_page_is_checked_and_filled() {
        let s = sym();
        assert!(!s.write(0, SYMSPY_MSR, 0x1234), "unaligned");
        assert!(!s.write(0, SYMSPY_MSR, 0xfff_f000), "outside RAM");
        assert!(s.write(0, SYMSPY_MSR, 0x5000));
        assert_eq!(s.read(1, SYMSPY_MSR), Some(0x5000));
        let magic: u32 = s.mem.read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!(magic, SYMSPY_MAGIC);
        let mut text = [0u8; 32];
        s.mem.read_slice(&mut text, GuestAddress(0x5010)).unwrap();
        assert_eq!(parse_lines(&text)[0], ("vmm".into(), "palacios-rs".into()));
        s.mem
            .write_slice(
                b"\x07\0\0\0pid=42\nbad\nname=x\0junk=1",
                GuestAddress(0x5800),
            )
            .unwrap();
        let (seq, kv) = s.symspy_guest().unwrap();
        assert_eq!(seq, 7);
        assert_eq!(
            kv,
            vec![("pid".into(), "42".into()), ("name".into(), "x".into())]
        );
    }

    #[test]
    fn symcall_registration_is_per_core_and_saved() {
        let s = sym();
        assert!(s.write(1, SYMCALL_RIP_MSR, 0x1000));
        assert!(s.write(1, SYMCALL_FS_MSR, 0x77));
        assert_eq!(s.symcall_regs(1), Some([0x1000, 0, 0, 0, 0x77]));
        assert_eq!(s.symcall_regs(0), Some([0; 5]));
        // Between 0x539 and 0x540 there are no SymCall MSRs.
        assert!(!s.write(1, 0x53a, 1));
        assert_eq!(s.read(1, 0x53f), None);
        let st = s.save();
        let t = sym();
        t.restore(st).unwrap();
        assert_eq!(t.symcall_regs(1), Some([0x1000, 0, 0, 0, 0x77]));
        assert!(
            t.restore(SymState {
                symspy_gpa: 0x123,
                symcall: vec![[0; 5]; 2]
            })
            .is_err()
        );
    }

    #[test]
    fn modules_are_bounded() {
        let s = sym();
        assert!(s.queue_module(vec![]).is_err());
        assert!(s.queue_module(vec![0; SYMMOD_MAX + 1]).is_err());
        assert_eq!(s.queue_module(vec![0x90, 0xc3]), Ok(1));
        assert_eq!(s.modules_waiting(), 1);
    }
}
