//! One emulated core: architectural state, its memory path (segmentation, TLB, page walks)
//! and what it owes the VMM (queued exits and answers to earlier ones).

use std::collections::VecDeque;
use std::sync::Arc;

use palacios_vmm::backend::{Exit, IoData};
use palacios_vmm::intercept::{Intercepted, Intercepts, SyscallAbi, space_of};

use crate::cpu::{CS, Cpu, Mode, SS};
use crate::model::CpuModel;
use crate::paging::{self, Kind, Tlb, perm};
use crate::phys::{PhysMem, Target};

/// Why an instruction did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An exception with its error code (if the vector has one).
    Exc(u8, Option<u32>),
    /// A page fault at a linear address.
    Pf(u64, u32),
    /// The instruction needs the VMM's answer (port read, MMIO read, trapped MSR) and is
    /// executed again once it is there. (Boxed: handlers return `Result<(), Fault>` in
    /// registers only while it stays small.)
    Exit(Box<Exit>),
    /// Something the emulator cannot do (the VM fails with this message).
    Fatal(&'static &'static str),
}

impl Fault {
    pub fn exit(e: Exit) -> Fault {
        Fault::Exit(Box::new(e))
    }
}

const _: () = assert!(
    std::mem::size_of::<R<()>>() <= 16,
    "handler results must fit in two registers"
);

pub type R<T> = Result<T, Fault>;

/// Deterministic time: guest nanoseconds per instruction (a 100 MIPS virtual CPU, about the
/// emulator's real speed, so guest timeouts and busy-waits behave as with host time).
pub const NS_PER_INSN: u64 = 10;

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const NMI: u8 = 2;
pub const BP: u8 = 3;
pub const OF: u8 = 4;
pub const BR: u8 = 5;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SSF: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const MF: u8 = 16;
pub const AC: u8 = 17;
pub const XM: u8 = 19;

pub fn gp(code: u32) -> Fault {
    Fault::Exc(GP, Some(code))
}
pub fn ud() -> Fault {
    Fault::Exc(UD, None)
}

/// Counters the backend reports in telemetry.
#[derive(Clone, Debug, Default)]
pub struct EmuStats {
    pub instructions: u64,
    pub blocks_decoded: u64,
    pub smc_invalidations: u64,
    /// Blocks decoded while another core might still write their page through an old
    /// translation ([`crate::block::Pending`]), checks of such blocks, and those found
    /// changed by another core.
    pub blocks_provisional: u64,
    pub provisional_checks: u64,
    pub cross_modified: u64,
    pub blocks_translated: u64,
    /// Instructions that raised #UD because the emulator does not implement them, by mnemonic.
    pub unimplemented: std::collections::BTreeMap<String, u64>,
}

/// One core and its path to memory.
pub struct Machine {
    pub cpu: Cpu,
    pub phys: PhysMem,
    pub tlb: Tlb,
    pub model: Arc<CpuModel>,
    /// Exits to report after the current instruction (port writes, MMIO writes, HLT).
    pub exits: VecDeque<Exit>,
    /// Answer to the last IoIn / MsrRead exit.
    pub io_answer: Option<IoData>,
    pub msr_answer: Option<Option<u64>>,
    pub msr_write_answer: Option<bool>,
    /// MMIO reads answered for the instruction being (re-)executed.
    pub mmio_answers: Vec<(u64, IoData)>,
    /// Stop the current block after this instruction.
    pub brk: bool,
    /// MSR ranges the VMM handles.
    pub trapped_msrs: Arc<Vec<(u32, u32)>>,
    pub stats: EmuStats,
    /// The virtual clock behind the TSC.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Instructions retired by this core.
    pub icount: u64,
    /// Deterministic time: guest ns = icount * NS_PER_INSN + skipped.
    pub deterministic: bool,
    /// Guest ns skipped while halted (deterministic time).
    pub skipped: u64,
    /// This core's index (its APIC ID).
    pub vcpu: u32,
    /// How many cores the VM has (grows while they are created).
    pub cores_shared: Arc<std::sync::atomic::AtomicU32>,
    /// The fault a translated block stopped at (see [`crate::jit`]).
    pub jit_fault: Option<Fault>,
    /// Guest events the VMM stops at (GEARS); `None` costs one test where they could occur.
    pub intercepts: Option<Box<Intercepts>>,
    /// (RIP, space) of an intercepted system call the VMM let through: it runs unstopped once.
    pub intercept_pass: Option<(u64, u64)>,
    /// The breakpoints DR7 enables ([`crate::debug`]).
    pub dbg: crate::debug::Debug,
    /// Set by SYSCALL and SYSRET: the single-step trap follows the TF they leave.
    pub tf_after: bool,
    /// This core's acknowledgement of code-page epochs ([`crate::phys::CoreAck`]).
    pub ack: Arc<crate::phys::CoreAck>,
}

impl Machine {
    pub fn new(
        phys: PhysMem,
        model: Arc<CpuModel>,
        clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        let ack = phys.code.register();
        Machine {
            ack,
            cpu: Cpu::default(),
            phys,
            tlb: Tlb::default(),
            model,
            exits: VecDeque::new(),
            io_answer: None,
            msr_answer: None,
            msr_write_answer: None,
            mmio_answers: Vec::new(),
            brk: false,
            trapped_msrs: Arc::new(Vec::new()),
            stats: EmuStats::default(),
            clock,
            icount: 0,
            deterministic: false,
            skipped: 0,
            vcpu: 0,
            cores_shared: Arc::new(std::sync::atomic::AtomicU32::new(1)),
            jit_fault: None,
            intercepts: None,
            intercept_pass: None,
            dbg: crate::debug::Debug::default(),
            tf_after: false,
        }
    }

    /// DR0–DR3, DR7 or CR4.DE changed: derive the enabled breakpoints again. Data
    /// breakpoints need their pages out of the TLB, so it is flushed when they change.
    pub fn debug_changed(&mut self) {
        let old_data = self.dbg.data;
        let (hits, deferred) = (self.dbg.hits, self.dbg.deferred);
        self.dbg = crate::debug::Debug::from_cpu(&self.cpu);
        (self.dbg.hits, self.dbg.deferred) = (hits, deferred);
        if old_data || self.dbg.data {
            self.tlb.flush_all();
        }
        // Back to the dispatcher, which checks breakpoints one instruction at a time.
        self.brk = true;
    }

    /// A system call from user mode (`abi`, number `nr`): `Err` stops at it, before it runs,
    /// when the VMM selected it.
    #[inline]
    pub fn syscall_intercept(&mut self, abi: SyscallAbi, nr: u64, len: usize) -> R<()> {
        let Some(f) = self.intercepts.as_ref().and_then(|i| i.syscalls.as_ref()) else {
            return Ok(());
        };
        let space = space_of(self.cpu.cr3);
        if self.cpu.cpl != 3 || !f.hit(abi, nr, space) {
            return Ok(());
        }
        // The instruction's own RIP (handlers run with RIP already past it).
        let rip = self.cpu.rip.wrapping_sub(len as u64);
        if self.intercept_pass.take() == Some((rip, space)) {
            return Ok(());
        }
        Err(Fault::exit(Exit::Intercept(Intercepted::Syscall {
            abi,
            entered: false,
        })))
    }

    /// The core just changed privilege: stop after this instruction if it entered user mode
    /// in the watched space.
    #[inline]
    pub fn note_user_entry(&mut self) {
        if self.cpu.cpl == 3
            && let Some(i) = &self.intercepts
            && i.user_entry == Some(space_of(self.cpu.cr3))
        {
            self.exit_after(Exit::Intercept(Intercepted::UserEntry));
        }
    }

    /// Whether an exception at the current instruction stops instead of being delivered.
    pub fn fault_intercepted(&self) -> bool {
        self.cpu.cpl == 3
            && self
                .intercepts
                .as_ref()
                .is_some_and(|i| i.user_faults == Some(space_of(self.cpu.cr3)))
    }

    /// Queue an exit for after this instruction.
    pub fn exit_after(&mut self, e: Exit) {
        self.exits.push_back(e);
        self.brk = true;
    }

    // ---- segmentation -------------------------------------------------------------------

    /// Linear address of `off` in segment `seg` for an access of `size` bytes, with the
    /// limit and type checks of the current mode.
    #[inline(always)]
    pub fn linear(&self, seg: usize, off: u64, size: u64, kind: Kind) -> R<u64> {
        if self.cpu.mode == Mode::Long64 {
            let lin = if seg >= 4 {
                self.cpu.seg[seg].base.wrapping_add(off)
            } else {
                off
            };
            if !canonical(lin) || !canonical(lin.wrapping_add(size - 1)) {
                return Err(seg_fault(seg, 0));
            }
            return Ok(lin);
        }
        self.linear_legacy(seg, off, size, kind)
    }

    /// [`Machine::linear`] outside 64-bit mode.
    #[inline(never)]
    fn linear_legacy(&self, seg: usize, off: u64, size: u64, kind: Kind) -> R<u64> {
        let s = &self.cpu.seg[seg];
        let protected = matches!(self.cpu.mode, Mode::Protected | Mode::Compat);
        if protected {
            if s.unusable || (s.selector & !3 == 0 && seg != CS && seg != SS && !s.present) {
                return Err(seg_fault(seg, 0));
            }
            let code = s.type_ & 8 != 0;
            match kind {
                Kind::Write if code || s.type_ & 2 == 0 => return Err(seg_fault(seg, 0)),
                Kind::Read if code && s.type_ & 2 == 0 => return Err(seg_fault(seg, 0)),
                _ => {}
            }
        }
        let last = off.wrapping_add(size - 1);
        let limit = u64::from(s.limit);
        let expand_down = s.s && s.type_ & 0xc == 0x4;
        let bad = if expand_down && protected {
            let top = if s.db { 0xffff_ffff } else { 0xffff };
            off <= limit || last > top || last < off
        } else {
            last > limit || last < off
        };
        if bad {
            return Err(seg_fault(seg, 0));
        }
        Ok(s.base.wrapping_add(off) & 0xffff_ffff)
    }

    // ---- translation ----------------------------------------------------------------------

    /// Translate `lin` for `kind`, filling the TLB for RAM.
    pub fn translate(&mut self, lin: u64, kind: Kind, user: bool) -> R<(u64, Target)> {
        let t = paging::walk(&self.cpu, &self.phys, lin, kind, user)
            .map_err(|code| Fault::Pf(lin, code))?;
        let target = self.phys.lookup(t.phys);
        let mut no_write = match target {
            Target::Ram(_, page) => self.phys.code.has_code(page),
            Target::Mmio => false,
        };
        // Dirty tracking: a write translation is granted only by a write, which marks the
        // page; other accesses get none, so the first write after them comes back here.
        if let (Some(log), Target::Ram(_, page)) = (self.phys.tracking(), target) {
            if kind == Kind::Write {
                log.mark_page(page);
            } else {
                no_write = true;
            }
        }
        self.tlb.fill(user, lin, &t, target, no_write);
        if self.dbg.data && self.dbg.watches_page(lin) {
            // Accesses to a page a data breakpoint watches take the slow path (checked there).
            let e = &mut self.tlb.sets[user as usize][Tlb::slot(lin)];
            if e.page == lin >> 12 {
                e.perm &= !(perm::R | perm::W);
            }
        }
        Ok((t.phys, target))
    }

    #[inline]
    fn user(&self) -> bool {
        self.cpu.cpl == 3
    }

    /// Host pointer for `size` bytes at `lin` if the TLB allows `need` without a walk.
    #[inline(always)]
    fn fast(&self, lin: u64, size: u64, need: u8) -> Option<*mut u8> {
        if (lin & 0xfff) + size > 0x1000 {
            return None;
        }
        let e = &self.tlb.sets[self.user() as usize][Tlb::slot(lin)];
        if e.page == lin >> 12 && e.perm & need != 0 {
            // SAFETY: the entry maps this whole linear page to a host RAM page.
            Some(unsafe { e.host.add((lin & 0xfff) as usize) })
        } else {
            None
        }
    }

    // ---- linear-address access ----------------------------------------------------------

    /// Read `size` (1, 2, 4, 8) bytes at linear `lin`.
    #[inline(always)]
    pub fn read_lin(&mut self, lin: u64, size: u64) -> R<u64> {
        if let Some(p) = self.fast(lin, size, perm::R) {
            // SAFETY: `fast` checked that all `size` bytes lie in one mapped RAM page.
            return Ok(unsafe { load(p, size) });
        }
        self.read_lin_slow(lin, size, self.user())
    }

    /// Read with an explicit privilege (descriptor tables and TSS are supervisor accesses).
    pub fn read_lin_slow(&mut self, lin: u64, size: u64, user: bool) -> R<u64> {
        let mut buf = [0u8; 16];
        self.read_bytes(lin, &mut buf[..size as usize], user)?;
        Ok(u64::from_le_bytes(buf[..8].try_into().unwrap()))
    }

    /// Read bytes at linear `lin` (may cross pages; MMIO is answered through exits).
    pub fn read_bytes(&mut self, lin: u64, buf: &mut [u8], user: bool) -> R<()> {
        let size = buf.len() as u64;
        if self.dbg.data {
            self.dbg.access(lin, size, false);
        }
        let first = self.translate(lin, Kind::Read, user)?;
        let split = (lin & 0xfff) + size > 0x1000;
        let second = if split {
            let l2 = (lin | 0xfff).wrapping_add(1);
            Some(self.translate(l2, Kind::Read, user)?)
        } else {
            None
        };
        if let (_, Target::Mmio) = first
            && !split
        {
            // Operands wider than 8 bytes (x87, SSE, FXRSTOR) are read in 8-byte pieces.
            for (k, piece) in buf.chunks_mut(8).enumerate() {
                let v = self.mmio_read(first.0 + 8 * k as u64, piece.len() as u64)?;
                piece.copy_from_slice(&v.to_le_bytes()[..piece.len()]);
            }
            return Ok(());
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let l = lin.wrapping_add(i as u64);
            let (tphys, target) = if (l ^ lin) & !0xfff == 0 {
                first
            } else {
                second.unwrap()
            };
            let phys = (tphys & !0xfff) | (l & 0xfff);
            *b = match target {
                // SAFETY: the translation's host pointer is for `tphys`; the page is backed,
                // so its base plus any in-page offset stays inside the mapping.
                Target::Ram(p, _) => unsafe { *page_base(p, tphys).add((l & 0xfff) as usize) },
                Target::Mmio => self.mmio_read(phys, 1)? as u8,
            };
        }
        Ok(())
    }

    fn mmio_read(&mut self, phys: u64, size: u64) -> R<u64> {
        if let Some(pos) = self.mmio_answers.iter().position(|(a, _)| *a == phys) {
            let (_, d) = self.mmio_answers[pos];
            let mut b = [0u8; 8];
            b[..d.as_slice().len()].copy_from_slice(d.as_slice());
            return Ok(u64::from_le_bytes(b));
        }
        Err(Fault::exit(Exit::MmioRead {
            addr: phys,
            size: size as u8,
        }))
    }

    /// Write `size` bytes of `val` at linear `lin`.
    #[inline(always)]
    pub fn write_lin(&mut self, lin: u64, size: u64, val: u64) -> R<()> {
        if let Some(p) = self.fast(lin, size, perm::W) {
            // SAFETY: `fast` checked that all `size` bytes lie in one writable RAM page.
            unsafe { store(p, size, val) };
            return Ok(());
        }
        self.write_bytes(lin, &val.to_le_bytes()[..size as usize], self.user())
    }

    /// Write bytes at linear `lin`: every page is translated before anything is written.
    pub fn write_bytes(&mut self, lin: u64, data: &[u8], user: bool) -> R<()> {
        let size = data.len() as u64;
        if self.dbg.data {
            self.dbg.access(lin, size, true);
        }
        let first = self.translate(lin, Kind::Write, user)?;
        let split = (lin & 0xfff) + size > 0x1000;
        let l2 = (lin | 0xfff).wrapping_add(1);
        let second = if split {
            Some(self.translate(l2, Kind::Write, user)?)
        } else {
            None
        };
        let parts = [(lin, first, 0usize)]
            .into_iter()
            .chain(second.map(|s| (l2, s, (0x1000 - (lin & 0xfff)) as usize)));
        let parts: Vec<_> = parts.collect();
        for (k, &(l, (phys, target), start)) in parts.iter().enumerate() {
            let end = parts.get(k + 1).map(|p| p.2).unwrap_or(data.len());
            let chunk = &data[start..end];
            match target {
                Target::Ram(p, page) => {
                    // SAFETY: `p` is the host address of `phys`; the chunk stays within its page.
                    unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), p, chunk.len()) };
                    if self.phys.code.has_code(page) {
                        self.phys.code.written(page);
                        self.stats.smc_invalidations += 1;
                        self.brk = true;
                    }
                    let _ = l;
                }
                Target::Mmio => {
                    // One exit per 8 bytes (an exit carries at most 8).
                    for (k, piece) in chunk.chunks(8).enumerate() {
                        self.exit_after(Exit::MmioWrite {
                            addr: phys + 8 * k as u64,
                            data: IoData::new(piece),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Read-modify-write of `size` bytes at `lin`; atomic when `locked` (LOCK prefix, XCHG)
    /// and the operand is naturally aligned RAM. Returns the old value.
    #[inline]
    pub fn rmw_lin(
        &mut self,
        lin: u64,
        size: u64,
        locked: bool,
        mut f: impl FnMut(u64) -> u64,
    ) -> R<u64> {
        if !locked {
            // Translate for writing first, so a read-only page faults as a write.
            if self.fast(lin, size, perm::W).is_none() {
                self.probe_lin_write(lin, size)?;
            }
            let old = self.read_lin(lin, size)?;
            self.write_lin(lin, size, f(old))?;
            return Ok(old);
        }
        let p = match self.fast(lin, size, perm::W) {
            Some(p) => Some(p),
            None if (lin & 0xfff) + size <= 0x1000 => {
                self.translate(lin, Kind::Write, self.user())?;
                self.fast(lin, size, perm::W)
            }
            None => None,
        };
        match p {
            Some(p) if lin & (size - 1) == 0 => {
                // SAFETY: aligned, inside one writable RAM page; guest RAM is shared with other
                // vCPU threads, so the update is an atomic compare-and-swap.
                Ok(unsafe { atomic_update(p, size, &mut f) })
            }
            _ => {
                let old = self.read_lin(lin, size)?;
                self.write_lin(lin, size, f(old))?;
                Ok(old)
            }
        }
    }

    // ---- segment-relative access --------------------------------------------------------

    #[inline(always)]
    pub fn read(&mut self, seg: usize, off: u64, size: u64) -> R<u64> {
        let lin = self.linear(seg, off, size, Kind::Read)?;
        self.read_lin(lin, size)
    }

    #[inline(always)]
    pub fn write(&mut self, seg: usize, off: u64, size: u64, val: u64) -> R<()> {
        let lin = self.linear(seg, off, size, Kind::Write)?;
        self.write_lin(lin, size, val)
    }

    /// Read `buf.len()` bytes (up to a page) at seg:off: 80-bit, 128-bit and FXSAVE-image
    /// operands. `align` (a power of two, or 1) is checked on the linear address: #GP(0).
    pub fn read_buf(&mut self, seg: usize, off: u64, buf: &mut [u8], align: u64) -> R<()> {
        let len = buf.len() as u64;
        let lin = self.linear(seg, off, len, Kind::Read)?;
        if lin & (align - 1) != 0 {
            return Err(gp(0));
        }
        if let Some(p) = self.fast(lin, len, perm::R) {
            // SAFETY: `fast` checked that all `len` bytes lie in one mapped RAM page.
            unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        self.read_bytes(lin, buf, self.user())
    }

    /// Write `data` (up to a page) at seg:off; nothing is written unless all of it can be.
    pub fn write_buf(&mut self, seg: usize, off: u64, data: &[u8], align: u64) -> R<()> {
        let len = data.len() as u64;
        let lin = self.linear(seg, off, len, Kind::Write)?;
        if lin & (align - 1) != 0 {
            return Err(gp(0));
        }
        if let Some(p) = self.fast(lin, len, perm::W) {
            // SAFETY: `fast` checked that all `len` bytes lie in one writable RAM page.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
            return Ok(());
        }
        self.write_bytes(lin, data, self.user())
    }

    /// Check that a write of `size` bytes at seg:off would succeed, without writing.
    pub fn probe_write(&mut self, seg: usize, off: u64, size: u64) -> R<()> {
        let lin = self.linear(seg, off, size, Kind::Write)?;
        if self.fast(lin, size, perm::W).is_some() {
            return Ok(());
        }
        self.translate(lin, Kind::Write, self.user())?;
        if (lin & 0xfff) + size > 0x1000 {
            self.translate((lin | 0xfff) + 1, Kind::Write, self.user())?;
        }
        Ok(())
    }

    /// Check that a write of `size` bytes at linear `lin` would succeed.
    fn probe_lin_write(&mut self, lin: u64, size: u64) -> R<()> {
        let user = self.user();
        self.translate(lin, Kind::Write, user)?;
        if (lin & 0xfff) + size > 0x1000 {
            self.translate((lin | 0xfff).wrapping_add(1), Kind::Write, user)?;
        }
        Ok(())
    }

    /// Supervisor-privilege read of system structures (GDT, IDT, TSS) by linear address.
    pub fn read_sys(&mut self, lin: u64, size: u64) -> R<u64> {
        let lin = if self.cpu.long_mode() {
            lin
        } else {
            lin & 0xffff_ffff
        };
        self.read_lin_slow(lin, size, false)
    }

    pub fn write_sys(&mut self, lin: u64, size: u64, val: u64) -> R<()> {
        let lin = if self.cpu.long_mode() {
            lin
        } else {
            lin & 0xffff_ffff
        };
        self.write_bytes(lin, &val.to_le_bytes()[..size as usize], false)
    }

    /// Check the code-page epoch: if a page became code since the last look, drop writes.
    #[inline]
    pub fn sync_code_epoch(&mut self) {
        let e = self.phys.code.epoch();
        if e != self.tlb.code_epoch {
            self.tlb.drop_writes();
            self.tlb.code_epoch = e;
            self.ack.ack(e);
        }
    }

    /// Read code bytes at linear `lin` through the TLB without side effects (for traces).
    pub fn peek_code(&self, lin: u64, out: &mut [u8]) -> bool {
        for (i, b) in out.iter_mut().enumerate() {
            let l = lin.wrapping_add(i as u64);
            let e = &self.tlb.sets[self.user() as usize][Tlb::slot(l)];
            if e.page != l >> 12 || e.host.is_null() {
                return false;
            }
            // SAFETY: the entry maps this linear page to a host RAM page.
            *b = unsafe { *e.host.add((l & 0xfff) as usize) };
        }
        true
    }

    /// Deterministic guest time in ns.
    pub fn virtual_ns(&self) -> u64 {
        self.icount
            .wrapping_mul(NS_PER_INSN)
            .wrapping_add(self.skipped)
    }

    pub fn cs_base(&self) -> u64 {
        self.cpu.seg[CS].base
    }
}

/// Host address of the start of the page that host address `p` (for physical `phys`) is in.
#[inline]
fn page_base(p: *mut u8, phys: u64) -> *mut u8 {
    p.wrapping_sub((phys & 0xfff) as usize)
}

#[inline]
pub fn canonical(a: u64) -> bool {
    ((a as i64) << 16 >> 16) as u64 == a
}

/// #SS for the stack segment, #GP otherwise.
pub fn seg_fault(seg: usize, code: u32) -> Fault {
    if seg == SS {
        Fault::Exc(SSF, Some(code))
    } else {
        gp(code)
    }
}

/// # Safety
/// `p` must be valid for reading `size` bytes.
#[inline(always)]
unsafe fn load(p: *const u8, size: u64) -> u64 {
    // SAFETY: the caller guarantees `size` readable bytes; unaligned reads are allowed.
    unsafe {
        match size {
            1 => u64::from(*p),
            2 => u64::from((p as *const u16).read_unaligned()),
            4 => u64::from((p as *const u32).read_unaligned()),
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// # Safety
/// `p` must be valid for writing `size` bytes.
#[inline(always)]
unsafe fn store(p: *mut u8, size: u64, v: u64) {
    // SAFETY: the caller guarantees `size` writable bytes; unaligned writes are allowed.
    unsafe {
        match size {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}

/// # Safety
/// `p` must be valid, aligned to `size` and point into shared guest RAM.
unsafe fn atomic_update(p: *mut u8, size: u64, f: &mut dyn FnMut(u64) -> u64) -> u64 {
    use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering::SeqCst};
    macro_rules! cas {
        ($a:ty, $t:ty) => {{
            // SAFETY: caller guarantees alignment and validity.
            let a = unsafe { &*(p as *const $a) };
            let mut old = a.load(SeqCst);
            loop {
                let new = f(old as u64) as $t;
                match a.compare_exchange(old, new, SeqCst, SeqCst) {
                    Ok(_) => return old as u64,
                    Err(cur) => old = cur,
                }
            }
        }};
    }
    match size {
        1 => cas!(AtomicU8, u8),
        2 => cas!(AtomicU16, u16),
        4 => cas!(AtomicU32, u32),
        _ => cas!(AtomicU64, u64),
    }
}
