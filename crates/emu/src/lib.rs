//! The emulator backend: a software x86 CPU that behaves like a hardware virtualization
//! extension. It runs guest code until something needs the VMM (port I/O, an access to
//! memory that is not RAM, HLT, a trapped MSR, an interrupt window, a kick) and reports the
//! same [`Exit`] values as the KVM backend, so devices, loaders and tools are shared.
//!
//! Guest code is decoded with iced-x86 once per basic block ([`block`]); each instruction
//! record carries the handler chosen for it at decode time ([`exec`]). Memory goes through
//! segmentation, a software TLB and page walks ([`machine`], [`paging`]).

pub mod block;
pub mod cpu;
pub mod debug;
pub mod exec;
pub mod fpu;
pub mod jit;
pub mod machine;
pub mod model;
pub mod paging;
pub mod phys;
pub mod trace;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use palacios_vmm::GuestMem;
use palacios_vmm::backend::{
    Backend, BackendError, DebugRegs, Exit, FpuState, IoData, SAVED_MSRS, Vcpu, VcpuEvents,
    VcpuState,
};
use palacios_vmm::intercept::{Intercepted, Intercepts, space_of};
use palacios_vmm::time::DEFAULT_TSC_HZ;
use palacios_x86::{Regs, SRegs};

use crate::block::BlockCache;
use crate::cpu::fl;
use crate::exec::interrupt::{self, Raised, Source};
use crate::machine::{Fault, Machine};
use crate::model::CpuModel;
use crate::phys::PhysMem;

/// Instructions a `run()` executes at most before returning [`Exit::Interrupted`].
const SLICE: u64 = 50_000_000;

/// Options of the emulator backend.
#[derive(Clone, Debug, Default)]
pub struct EmuOptions {
    /// Write a per-instruction trace here (see [`trace`]).
    pub trace: Option<std::path::PathBuf>,
    /// Write a sampled guest-RIP profile here when the core is dropped (see
    /// [`trace::Profile`]).
    pub profile: Option<std::path::PathBuf>,
    /// Run everything through the interpreter (no block translation; see [`jit`]).
    pub no_jit: bool,
    /// Executions before a block is translated (default [`jit::THRESHOLD`]; tests use 1 to
    /// translate everything at once).
    pub jit_threshold: Option<u32>,
}

/// The emulator as a [`Backend`].
pub struct EmuBackend {
    phys: Mutex<Option<PhysMem>>,
    trapped: Mutex<Arc<Vec<(u32, u32)>>>,
    model: Mutex<Arc<CpuModel>>,
    cores: Arc<AtomicU32>,
    clock: Mutex<Arc<dyn Fn() -> u64 + Send + Sync>>,
    tsc_hz: std::sync::atomic::AtomicU64,
    options: EmuOptions,
    deterministic: AtomicBool,
}

impl EmuBackend {
    pub fn new(options: EmuOptions) -> Self {
        let clock = tsc_clock(DEFAULT_TSC_HZ, 1);
        EmuBackend {
            tsc_hz: std::sync::atomic::AtomicU64::new(DEFAULT_TSC_HZ),
            phys: Mutex::new(None),
            trapped: Mutex::new(Arc::new(Vec::new())),
            model: Mutex::new(Arc::new(CpuModel::emulated())),
            cores: Arc::new(AtomicU32::new(0)),
            clock: Mutex::new(clock),
            options,
            deterministic: AtomicBool::new(false),
        }
    }
}

/// The TSC from the host clock: `hz` ticks per second of guest time, which runs at
/// 1/`dilation` of host time.
fn tsc_clock(hz: u64, dilation: u32) -> Arc<dyn Fn() -> u64 + Send + Sync> {
    let start = Instant::now();
    let d = u128::from(dilation.max(1));
    Arc::new(move || {
        let ns = start.elapsed().as_nanos() / d;
        (ns * u128::from(hz) / 1_000_000_000) as u64
    })
}

impl Default for EmuBackend {
    fn default() -> Self {
        Self::new(EmuOptions::default())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backend for EmuBackend {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn map_memory(&self, mem: &GuestMem) -> Result<(), BackendError> {
        *lock(&self.phys) = Some(PhysMem::new(mem));
        Ok(())
    }

    fn tsc_hz(&self) -> Option<u64> {
        Some(self.tsc_hz.load(Ordering::Relaxed))
    }

    fn set_time_scale(&self, tsc_hz: Option<u64>, dilation: u32) -> Result<(), BackendError> {
        let hz = tsc_hz.unwrap_or(DEFAULT_TSC_HZ);
        self.tsc_hz.store(hz, Ordering::Relaxed);
        *lock(&self.clock) = tsc_clock(hz, dilation);
        Ok(())
    }

    fn traps_vmcall(&self) -> bool {
        true
    }

    fn set_cpuid_leaves(&self, leaves: &[(u32, u32, [u32; 4])]) -> Result<(), BackendError> {
        let mut model = (**lock(&self.model)).clone();
        for &(leaf, sub, regs) in leaves {
            model.set_leaf(leaf, sub, regs);
        }
        *lock(&self.model) = Arc::new(model);
        Ok(())
    }

    fn trap_msrs(&self, ranges: &[(u32, u32)]) -> Result<(), BackendError> {
        *lock(&self.trapped) = Arc::new(ranges.to_vec());
        Ok(())
    }

    fn hide_cpu_features(&self, names: &[String]) -> Result<(), BackendError> {
        let mut model = (**lock(&self.model)).clone();
        for n in names {
            if !model.hide(n) {
                return Err(BackendError::Unhandled {
                    vcpu: 0,
                    rip: 0,
                    what: format!("unknown CPU feature '{n}'"),
                });
            }
        }
        *lock(&self.model) = Arc::new(model);
        Ok(())
    }

    fn set_dirty_log(
        &self,
        log: Option<Arc<palacios_vmm::dirty::DirtyLog>>,
    ) -> Result<(), BackendError> {
        let phys = lock(&self.phys)
            .clone()
            .ok_or_else(|| BackendError::Unhandled {
                vcpu: 0,
                rip: 0,
                what: "dirty tracking before guest memory was mapped".into(),
            })?;
        if let Some(l) = log {
            let _ = phys.dirty.set(l);
        }
        // Write translations granted so far were not marked: drop them everywhere.
        phys.code.bump_epoch();
        Ok(())
    }

    fn collect_dirty(&self, _log: &palacios_vmm::dirty::DirtyLog) -> Result<(), BackendError> {
        // The marks are in the log already; make every core's next write to any page mark
        // it again (each core drops its write translations at its next sync).
        if let Some(phys) = lock(&self.phys).as_ref() {
            phys.code.bump_epoch();
        }
        Ok(())
    }

    fn restrict_cpu_features(&self, keep: &[(u32, u32, [u32; 4])]) -> Result<(), BackendError> {
        let mut model = (**lock(&self.model)).clone();
        model.restrict(keep);
        *lock(&self.model) = Arc::new(model);
        Ok(())
    }

    fn enable_virtual_time(&self) -> bool {
        self.deterministic.store(true, Ordering::Release);
        true
    }

    fn cpuid_features(&self) -> Vec<(u32, u32, [u32; 4])> {
        let model = lock(&self.model).clone();
        palacios_vmm::backend::FEATURE_LEAVES
            .iter()
            .map(|&(leaf, sub, _)| (leaf, sub, model.cpuid(leaf, sub, 0, 1)))
            .collect()
    }

    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>, BackendError> {
        let phys = lock(&self.phys)
            .clone()
            .ok_or_else(|| BackendError::Unhandled {
                vcpu: index,
                rip: 0,
                what: "vCPU created before guest memory was mapped".into(),
            })?;
        self.cores.fetch_add(1, Ordering::AcqRel);
        let model = lock(&self.model).clone();
        let mut m = Machine::new(phys, model, lock(&self.clock).clone());
        m.vcpu = index;
        m.deterministic = self.deterministic.load(Ordering::Acquire);
        m.cores_shared = self.cores.clone();
        m.trapped_msrs = lock(&self.trapped).clone();
        m.cpu.apic_base = 0xfee0_0000 | (1 << 11) | if index == 0 { 1 << 8 } else { 0 };
        let tracer = match &self.options.trace {
            Some(p) => Some(
                trace::Tracer::create(p, index).map_err(|e| BackendError::Host {
                    op: "open the instruction trace",
                    source: e,
                })?,
            ),
            None => None,
        };
        let profile = self
            .options
            .profile
            .as_ref()
            .map(|p| trace::Profile::new(p, index));
        Ok(Box::new(EmuVcpu {
            sample_at: if profile.is_some() { 0 } else { u64::MAX },
            profile,
            m,
            cache: BlockCache::with_threshold(self.options.jit_threshold.unwrap_or(jit::THRESHOLD)),
            kick: Arc::new(AtomicBool::new(false)),
            window: false,
            deadline: u64::MAX,
            nmi_pending: false,
            last_read: None,
            tracer,
            jit: !self.options.no_jit,
        }))
    }
}

/// INT n, INT3, INTO and INT1 (ICEBP).
fn is_software_interrupt(i: &iced_x86::Instruction) -> bool {
    use iced_x86::Mnemonic;
    matches!(
        i.mnemonic(),
        Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Into | Mnemonic::Int1
    )
}

/// MOV SS or POP SS.
fn loads_ss(i: &iced_x86::Instruction) -> bool {
    i.op0_kind() == iced_x86::OpKind::Register && i.op0_register() == iced_x86::Register::SS
}

/// Emulator state beyond the neutral vCPU state: the instruction count (deterministic time)
/// and the exits and VMM answers in flight for the current instruction.
#[derive(serde::Serialize, serde::Deserialize)]
struct EmuExtras {
    icount: u64,
    skipped: u64,
    exits: Vec<Exit>,
    io_answer: Option<IoData>,
    msr_answer: Option<Option<u64>>,
    msr_write_answer: Option<bool>,
    mmio_answers: Vec<(u64, IoData)>,
    last_read: Option<Exit>,
}

/// One emulated core.
pub struct EmuVcpu {
    pub m: Machine,
    cache: BlockCache,
    kick: Arc<AtomicBool>,
    window: bool,
    /// Deterministic time: return when guest time reaches this.
    deadline: u64,
    nmi_pending: bool,
    /// The read exit the next `complete_read` answers.
    last_read: Option<Exit>,
    tracer: Option<trace::Tracer>,
    profile: Option<trace::Profile>,
    /// Instruction count of the next profile sample (u64::MAX: not profiling).
    sample_at: u64,
    /// Translate hot blocks to host code.
    jit: bool,
}

impl EmuVcpu {
    fn fail(&self, what: impl Into<String>) -> BackendError {
        BackendError::Unhandled {
            vcpu: self.m.vcpu,
            rip: self.m.cpu.rip,
            what: what.into(),
        }
    }

    /// Raise an exception; Ok(Some(exit)) for a triple fault.
    fn raise(&mut self, f: Fault) -> Result<Option<Exit>, BackendError> {
        if self.m.fault_intercepted() {
            let stop = match f {
                Fault::Exc(vector, code) => Some((vector, code, 0)),
                Fault::Pf(lin, code) => Some((14, Some(code), lin)),
                _ => None,
            };
            if let Some((vector, code, cr2)) = stop {
                let code = if interrupt::has_error_code(vector) {
                    Some(code.unwrap_or(0))
                } else {
                    None
                };
                return Ok(Some(Exit::Intercept(Intercepted::UserFault {
                    vector,
                    code,
                    cr2,
                })));
            }
        }
        match interrupt::deliver_exception(&mut self.m, f) {
            Raised::Delivered => Ok(None),
            Raised::Shutdown => Ok(Some(Exit::Shutdown)),
            Raised::Fatal(s) => Err(self.fail(s)),
        }
    }

    fn interrupts_open(&self) -> bool {
        self.m.cpu.flags & fl::IF != 0 && !self.m.cpu.shadow
    }

    fn answers_pending(&self) -> bool {
        self.m.io_answer.is_some()
            || !self.m.mmio_answers.is_empty()
            || self.m.msr_answer.is_some()
            || self.m.msr_write_answer.is_some()
    }

    /// Execute until an exit.
    fn execute(&mut self) -> Result<Exit, BackendError> {
        let start = self.m.icount;
        // Running before the first look at the code epoch (the loop's first step).
        self.m.ack.set_running(true);
        let r = self.execute_inner(start);
        self.m.ack.set_running(false);
        self.m.stats.instructions = self.m.icount;
        r
    }

    fn execute_inner(&mut self, start: u64) -> Result<Exit, BackendError> {
        loop {
            if let Some(e) = self.m.exits.pop_front() {
                return Ok(e);
            }
            if self.nmi_pending && !self.m.cpu.nmi_blocked && !self.answers_pending() {
                self.nmi_pending = false;
                self.m.cpu.nmi_blocked = true;
                if let Err(f) = interrupt::deliver(&mut self.m, 2, Source::External, None)
                    && let Some(e) = self.raise(f)?
                {
                    return Ok(e);
                }
            }
            if (self.kick.load(Ordering::Relaxed) && self.kick.swap(false, Ordering::AcqRel))
                || self.m.icount - start >= SLICE
                || (self.m.deterministic && self.m.virtual_ns() >= self.deadline)
            {
                return Ok(Exit::Interrupted);
            }
            if self.window && self.interrupts_open() && !self.answers_pending() {
                self.window = false;
                return Ok(Exit::IrqWindowOpen);
            }
            self.m.sync_code_epoch();
            // RF lasts one instruction (an IRET's target): it suppresses that instruction's
            // breakpoint. Once checked, clearing it before the next block is the same as
            // after its first instruction for everything a guest can see.
            let rf = self.m.cpu.flags & cpu::fl::RF != 0;
            self.m.cpu.flags &= !cpu::fl::RF;
            let dbg = self.m.dbg.armed;
            if dbg && !rf && !self.answers_pending() {
                // Instruction breakpoints come before the instruction is fetched; the #DB
                // is a fault (RIP at the instruction; the handler sets RF to go past it).
                let hits = block::code_linear(&self.m, self.m.cpu.rip, 1)
                    .map_or(0, |lin| self.m.dbg.exec_hits(lin));
                if hits != 0 {
                    self.m.cpu.dr[6] = (self.m.cpu.dr[6] & !debug::DR6_B) | u64::from(hits);
                    if let Some(e) = self.raise(Fault::Exc(machine::DB, None))? {
                        return Ok(e);
                    }
                    continue;
                }
            }
            let idx = match self.cache.lookup(&mut self.m) {
                Ok(i) => i,
                Err(Fault::Exit(e)) => {
                    return Err(self.fail(format!("unexpected exit while fetching code: {e:?}")));
                }
                Err(Fault::Fatal(s)) => return Err(self.fail(*s)),
                Err(f) => {
                    if let Some(e) = self.raise(f)? {
                        return Ok(e);
                    }
                    continue;
                }
            };
            // One instruction at a time while an answer from the VMM is pending (it belongs to
            // the first instruction), in an interrupt shadow, or single-stepping.
            let answering = self.answers_pending();
            let single = self.m.cpu.shadow || self.m.cpu.flags & fl::TF != 0 || answering || dbg;
            if dbg {
                self.m.dbg.hits = 0;
            }
            let shadow = self.m.cpu.shadow;
            let trap = self.m.cpu.flags & fl::TF != 0;
            // Chain blocks without the checks above while nothing needs them.
            let chain = !single && self.tracer.is_none() && !self.window && !self.nmi_pending;
            let limit = if self.m.deterministic {
                (start + SLICE).min(
                    self.deadline
                        .saturating_sub(self.m.skipped)
                        .div_ceil(machine::NS_PER_INSN),
                )
            } else {
                start + SLICE
            };
            let Self {
                m,
                cache,
                tracer,
                kick,
                profile,
                sample_at,
                jit,
                ..
            } = self;
            let mut idx = idx;
            let mut fault = None;
            loop {
                m.brk = false;
                m.tf_after = false;
                let epoch = cache.link_epoch();
                let mut slot = std::ptr::null_mut();
                let translated = if *jit && !single && tracer.is_none() {
                    let budget = if chain {
                        limit.saturating_sub(m.icount)
                    } else {
                        0
                    };
                    cache.run_jit(idx, m, budget, kick)
                } else {
                    None
                };
                let (done, f) = match translated {
                    Some(r) => {
                        slot = r.slot;
                        (r.done, r.fault)
                    }
                    None => {
                        let block = &cache.blocks[idx as usize];
                        match tracer.as_mut() {
                            Some(t) => {
                                run_block(m, &block.insns, single, |m, insn| t.record(m, insn))
                            }
                            None => run_block(m, &block.insns, single, |_, _| {}),
                        }
                    }
                };
                m.icount += done;
                if m.icount >= *sample_at
                    && let Some(p) = profile.as_mut()
                {
                    p.sample(m.cpu.rip);
                    *sample_at = m.icount + trace::Profile::PERIOD;
                }
                // Answers belong to the instruction being re-executed: keep them while it
                // still asks for more (an operand wider than one exit, or one that crosses
                // into a second MMIO page).
                if answering
                    && !matches!(&f, Some(Fault::Exit(e)) if matches!(**e, Exit::MmioRead { .. }))
                {
                    m.mmio_answers.clear();
                }
                if f.is_some() {
                    fault = f;
                    break;
                }
                if !chain
                    || m.brk
                    || m.cpu.shadow
                    || m.cpu.flags & fl::TF != 0
                    || m.icount >= limit
                    || kick.load(Ordering::Relaxed)
                {
                    break;
                }
                idx = match cache.next(m, idx) {
                    Ok(i) => i,
                    Err(f) => {
                        fault = Some(f);
                        break;
                    }
                };
                cache.link(slot, epoch, idx, m);
            }
            if shadow {
                m.cpu.shadow = false;
            }
            // MOV SS / POP SS hold the single-step trap back until after the next instruction.
            let ss_load = single
                && fault.is_none()
                && m.cpu.shadow
                && loads_ss(&cache.blocks[idx as usize].insns[0].i);
            // INT n / INT3 / INTO that entered a handler took TF away with the interrupt
            // (it is in the pushed RFLAGS): no single-step trap at the handler's first
            // instruction; the next one comes after the handler returns (SDM Vol. 3 17.3.1.4).
            let into_handler = single
                && m.cpu.flags & fl::TF == 0
                && is_software_interrupt(&cache.blocks[idx as usize].insns[0].i);
            match fault {
                None => {
                    // SYSCALL and SYSRET trap on the TF they leave, not the one they found
                    // (as QEMU does): FMASK can keep the trap out of the kernel, and a
                    // single-stepped program traps right after its system call returns.
                    let step = if m.tf_after {
                        m.cpu.flags & fl::TF != 0
                    } else {
                        trap && single && !ss_load && !into_handler
                    };
                    // Data and I/O breakpoints met by the instruction (held back by MOV SS
                    // like the single-step trap).
                    let mut hits = 0;
                    if dbg {
                        hits = std::mem::take(&mut m.dbg.hits);
                        if ss_load {
                            m.dbg.deferred |= hits;
                            hits = 0;
                        } else {
                            hits |= std::mem::take(&mut m.dbg.deferred);
                        }
                    }
                    if step || hits != 0 {
                        // Single-step or breakpoint trap after the instruction.
                        if hits != 0 {
                            m.cpu.dr[6] = (m.cpu.dr[6] & !debug::DR6_B) | u64::from(hits);
                        }
                        if step {
                            m.cpu.dr[6] |= debug::DR6_BS;
                        }
                        if let Some(e) = self.raise(Fault::Exc(machine::DB, None))? {
                            return Ok(e);
                        }
                    }
                }
                Some(Fault::Exit(e)) => {
                    self.last_read = Some(*e);
                    return Ok(*e);
                }
                Some(Fault::Fatal(s)) => return Err(self.fail(*s)),
                Some(f) => {
                    if let Some(e) = self.raise(f)? {
                        return Ok(e);
                    }
                }
            }
        }
    }
}

/// Execute a block's instructions until its end, a fault, or `brk` (after one instruction when
/// `single`). Returns how many retired and the fault, if any.
#[inline(always)]
fn run_block(
    m: &mut Machine,
    insns: &[block::Insn],
    single: bool,
    mut trace: impl FnMut(&Machine, &block::Insn),
) -> (u64, Option<Fault>) {
    let mut done = 0u64;
    for insn in insns {
        trace(m, insn);
        let ip = m.cpu.rip;
        m.cpu.rip = insn.next;
        if let Err(f) = (insn.h)(m, insn) {
            m.cpu.rip = ip;
            return (done, Some(f));
        }
        done += 1;
        if m.brk || single {
            break;
        }
    }
    (done, None)
}

impl Vcpu for EmuVcpu {
    fn index(&self) -> u32 {
        self.m.vcpu
    }

    fn run(&mut self) -> Result<Exit, BackendError> {
        self.execute()
    }

    fn complete_read(&mut self, data: &[u8]) {
        // The instruction that exited runs again and picks the answer up.
        match self.last_read.take() {
            Some(Exit::MmioRead { addr, .. }) => {
                self.m.mmio_answers.push((addr, IoData::new(data)))
            }
            _ => self.m.io_answer = Some(IoData::new(data)),
        }
    }

    fn regs(&self) -> Result<Regs, BackendError> {
        Ok(self.m.cpu.regs())
    }
    fn set_aside_pending(&mut self) -> Result<palacios_vmm::backend::PendingIo, BackendError> {
        Ok(palacios_vmm::backend::PendingIo {
            io: self.m.io_answer.take(),
            mmio: std::mem::take(&mut self.m.mmio_answers),
        })
    }
    fn restore_pending(&mut self, p: palacios_vmm::backend::PendingIo) {
        self.m.io_answer = p.io;
        self.m.mmio_answers = p.mmio;
    }
    fn set_regs(&mut self, regs: &Regs) -> Result<(), BackendError> {
        self.m.cpu.set_regs(regs);
        Ok(())
    }
    fn sregs(&self) -> Result<SRegs, BackendError> {
        Ok(self.m.cpu.sregs())
    }
    fn set_sregs(&mut self, sregs: &SRegs) -> Result<(), BackendError> {
        self.m.cpu.set_sregs(sregs);
        self.m.tlb.flush_all();
        Ok(())
    }
    fn fpu(&self) -> Result<FpuState, BackendError> {
        Ok(self.m.cpu.fpu.to_state())
    }
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<(), BackendError> {
        self.m.cpu.fpu.set_state(fpu);
        Ok(())
    }
    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, BackendError> {
        Ok(indices
            .iter()
            .filter_map(|&i| exec::read_msr(&self.m, i).map(|v| (i, v)))
            .collect())
    }
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<(), BackendError> {
        for &(i, v) in msrs {
            if !exec::write_msr(&mut self.m, i, v) {
                return Err(self.fail(format!("cannot set MSR {i:#x} to {v:#x}")));
            }
        }
        Ok(())
    }

    fn save_state(&mut self) -> Result<VcpuState, BackendError> {
        let m = &self.m;
        // The machine-check MSRs are the emulator's own (KVM skips them on a restore there).
        let mut msrs: Vec<(u32, u64)> = SAVED_MSRS
            .iter()
            .chain(cpu::MCE_MSRS.iter())
            .filter_map(|&i| exec::read_msr(m, i).map(|v| (i, v)))
            .collect();
        msrs.sort_by_key(|&(i, _)| i);
        let extras = EmuExtras {
            icount: m.icount,
            skipped: m.skipped,
            exits: m.exits.iter().copied().collect(),
            io_answer: m.io_answer,
            msr_answer: m.msr_answer,
            msr_write_answer: m.msr_write_answer,
            mmio_answers: m.mmio_answers.clone(),
            last_read: self.last_read,
        };
        Ok(VcpuState {
            regs: m.cpu.regs(),
            sregs: m.cpu.sregs(),
            fpu: m.cpu.fpu.to_state(),
            xcr0: 1,
            debug: DebugRegs {
                dr: [m.cpu.dr[0], m.cpu.dr[1], m.cpu.dr[2], m.cpu.dr[3]],
                dr6: m.cpu.dr[6],
                dr7: m.cpu.dr[7],
            },
            events: VcpuEvents {
                interrupt_shadow: m.cpu.shadow,
                nmi_blocked: m.cpu.nmi_blocked,
                nmi_pending: self.nmi_pending,
                irq_window: self.window,
            },
            msrs,
            mode: palacios_vmm::backend::CoreMode::Running,
            pending_start: None,
            backend: Some((
                "emu".into(),
                serde_json::to_value(&extras).map_err(|e| self.fail(e.to_string()))?,
            )),
        })
    }

    fn restore_state(&mut self, s: &VcpuState) -> Result<(), BackendError> {
        let extras: Option<EmuExtras> = match &s.backend {
            Some((name, v)) if name == "emu" => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| self.fail(format!("malformed emulator state: {e}")))?,
            ),
            _ => None,
        };
        if s.xcr0 & !1 != 0 {
            return Err(self.fail(format!(
                "the saved core uses XSAVE state components (XCR0 {:#x}) this emulator does not have",
                s.xcr0
            )));
        }
        // Instruction count first: deterministic guest time (and so the TSC) follows it.
        if let Some(x) = &extras {
            self.m.icount = x.icount;
            self.m.stats.instructions = x.icount;
            self.m.skipped = x.skipped;
        }
        self.m.cpu.set_sregs(&s.sregs);
        self.m.cpu.set_regs(&s.regs);
        self.m.cpu.fpu.set_state(&s.fpu);
        self.m.tlb.flush_all();
        for &(i, v) in &s.msrs {
            if !SAVED_MSRS.contains(&i) && !cpu::MCE_MSRS.contains(&i) {
                continue;
            }
            if !exec::write_msr(&mut self.m, i, v) {
                tracing::debug!("emulator: MSR {i:#x} = {v:#x} not restored (refused)");
            }
        }
        self.m.cpu.dr[..4].copy_from_slice(&s.debug.dr);
        self.m.cpu.dr[6] = s.debug.dr6;
        self.m.cpu.dr[7] = s.debug.dr7;
        self.m.debug_changed();
        self.m.cpu.shadow = s.events.interrupt_shadow;
        self.m.cpu.nmi_blocked = s.events.nmi_blocked;
        self.nmi_pending = s.events.nmi_pending;
        self.window = s.events.irq_window;
        self.m.cpu.update_mode();
        match extras {
            Some(x) => {
                self.m.exits = x.exits.into_iter().collect();
                self.m.io_answer = x.io_answer;
                self.m.msr_answer = x.msr_answer;
                self.m.msr_write_answer = x.msr_write_answer;
                self.m.mmio_answers = x.mmio_answers;
                self.last_read = x.last_read;
            }
            None => {
                self.m.exits.clear();
                self.m.io_answer = None;
                self.m.msr_answer = None;
                self.m.msr_write_answer = None;
                self.m.mmio_answers.clear();
                self.last_read = None;
            }
        }
        Ok(())
    }

    fn sync_dirty(&mut self) {
        self.m.sync_code_epoch();
    }

    fn can_inject(&mut self) -> bool {
        self.interrupts_open() && !self.answers_pending() && self.m.exits.is_empty()
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), BackendError> {
        if let Err(f) = interrupt::deliver(&mut self.m, vector, Source::External, None)
            && let Some(Exit::Shutdown) = self.raise(f)?
        {
            self.m.exits.push_back(Exit::Shutdown);
        }
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.window = on;
    }

    fn inject_nmi(&mut self) -> Result<(), BackendError> {
        self.nmi_pending = true;
        Ok(())
    }

    fn complete_msr_read(&mut self, value: Option<u64>) {
        self.m.msr_answer = Some(value);
    }

    fn complete_msr_write(&mut self, ok: bool) {
        self.m.msr_write_answer = Some(ok);
    }

    fn kick_flag(&self) -> Option<Arc<AtomicBool>> {
        Some(self.kick.clone())
    }

    fn virtual_ns(&self) -> Option<u64> {
        self.m.deterministic.then(|| self.m.virtual_ns())
    }

    fn set_virtual_deadline(&mut self, ns: u64) {
        self.deadline = ns;
    }

    fn skip_to(&mut self, ns: u64) {
        if self.m.deterministic && ns > self.m.virtual_ns() {
            self.m.skipped += ns - self.m.virtual_ns();
        }
    }

    fn set_intercepts(&mut self, i: &Intercepts) -> Result<(), BackendError> {
        if i.is_empty() {
            self.m.intercepts = None;
            return Ok(());
        }
        self.m.intercepts = Some(Box::new(i.clone()));
        // Already in user mode in the watched space: stop before running on.
        if self.m.cpu.cpl == 3
            && i.user_entry == Some(space_of(self.m.cpu.cr3))
            && !self.answers_pending()
        {
            self.m
                .exits
                .push_back(Exit::Intercept(Intercepted::UserEntry));
        }
        Ok(())
    }

    fn intercept_pass(&mut self) {
        self.m.intercept_pass = Some((self.m.cpu.rip, space_of(self.m.cpu.cr3)));
    }

    fn inject_exception(
        &mut self,
        vector: u8,
        code: Option<u32>,
        cr2: u64,
    ) -> Result<(), BackendError> {
        let f = if vector == 14 {
            Fault::Pf(cr2, code.unwrap_or(0))
        } else {
            Fault::Exc(vector, code)
        };
        match interrupt::deliver_exception(&mut self.m, f) {
            Raised::Delivered => Ok(()),
            Raised::Shutdown => {
                self.m.exits.push_back(Exit::Shutdown);
                Ok(())
            }
            Raised::Fatal(s) => Err(self.fail(s)),
        }
    }

    fn flush_tlb(&mut self) {
        self.m.tlb.flush_all();
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let s = &self.m.stats;
        let mut v = vec![
            ("emu instructions".to_string(), s.instructions),
            ("emu blocks decoded".to_string(), s.blocks_decoded),
            ("emu code-page writes".to_string(), s.smc_invalidations),
            ("emu blocks translated".to_string(), s.blocks_translated),
            ("emu blocks provisional".to_string(), s.blocks_provisional),
            ("emu provisional checks".to_string(), s.provisional_checks),
            ("emu blocks cross-modified".to_string(), s.cross_modified),
            ("emu block cache bytes".to_string(), self.cache.bytes as u64),
            (
                "emu block cache bytes limit".to_string(),
                block::MAX_CACHE_BYTES as u64,
            ),
            ("emu block cache drops".to_string(), self.cache.drops),
        ];
        for (name, n) in &s.unimplemented {
            v.push((format!("emu unimplemented {name} (#UD)"), *n));
        }
        v
    }
}
