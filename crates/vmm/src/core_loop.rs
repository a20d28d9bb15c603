//! The exit loop of one core: runs the guest, handles its exits, serves commands, pauses,
//! hypercalls, extension hooks and SymCalls. Written once for every backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use palacios_x86::{msr, rflags};

use crate::backend::{BackendError, CoreMode, Exit, Vcpu};
use crate::bus::Bus;
use crate::control::{Outcome, VmHandle};
use crate::extension::{CoreCtx, CoreHooks, Extensions, run_exit_hooks};
use crate::hypercall::{DOORBELL_PORT, HcallCtx, Hypercalls, err, id};
use crate::intercept::Intercepted;
use crate::irq::InterruptController;
use crate::memory::GuestMem;
use crate::msr::MsrBus;
use crate::symbiotic::Symbiotic;
use crate::telemetry::CoreStats;
use crate::time::GuestClock;
use crate::timer::TimerQueue;

/// What the loop does after an exit was handled.
pub(crate) enum Flow {
    Next,
    Hlt,
    Shutdown,
    /// SYMCALL_RET inside a SymCall: status and results.
    SymRet(u64, [u64; 4]),
    /// SYMCALL_ERR inside a SymCall: the guest's error code.
    SymErr(u64),
}

pub(crate) struct CoreLoop {
    pub cpu: u32,
    pub handle: VmHandle,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub msrs: Arc<MsrBus>,
    pub irq: Option<Arc<dyn InterruptController>>,
    pub clock: Arc<GuestClock>,
    pub timers: Arc<TimerQueue>,
    pub mem: GuestMem,
    pub hypercalls: Arc<Hypercalls>,
    pub extensions: Arc<Extensions>,
    pub sym: Arc<Symbiotic>,
    pub sched: Arc<crate::sched::VSched>,
    /// `<schedule_hz>`: yield to the host at least this often.
    pub schedule_hz: Option<u32>,
    /// `<perftune>`: what the core does while the guest idles.
    pub yield_policy: crate::sched::YieldPolicy,
    /// Started cores that have not halted for good.
    pub running: Arc<AtomicU32>,
    pub kernel_irqchip: bool,
}

impl CoreLoop {
    fn fail(&self, e: BackendError) {
        self.handle.stop(Outcome::Failed(e.to_string()));
    }

    /// Wait for a start state (core 0 has one at once; the others wait for INIT/SIPI).
    fn await_start(&self, vcpu: &mut dyn Vcpu) -> bool {
        if self.kernel_irqchip && self.cpu != 0 {
            // The backend holds application processors in wait-for-SIPI itself.
            self.running.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        loop {
            if self.handle.is_stopping() {
                return false;
            }
            if let Some(mut state) = self.handle.take_start(self.cpu) {
                // The guest's TSC follows guest time (see crate::time).
                state.msrs.push((msr::IA32_TSC, self.clock.tsc()));
                if let Err(e) = vcpu.set_state(&state) {
                    self.fail(e);
                    return false;
                }
                self.reanchor_tsc(vcpu);
                self.running.fetch_add(1, Ordering::AcqRel);
                return true;
            }
            self.handle.run_commands(self.cpu, vcpu);
            if self.handle.is_paused() {
                self.handle.park(self.cpu, vcpu, None);
                continue;
            }
            self.handle.wakers().wait(self.cpu, None);
        }
    }

    /// Some backends ignore TSC writes (this project's software KVM): then the TSC the core
    /// has is the truth, and guest time's TSC mapping (TSC-deadline timers) follows it. Done
    /// by core 0 when it starts, resumes or continues from a checkpoint.
    fn reanchor_tsc(&self, vcpu: &mut dyn Vcpu) {
        if self.cpu != 0 {
            return;
        }
        // Guest time on both sides of the read: a thread descheduled in between must not
        // pass for a TSC that differs.
        let before = self.clock.now();
        if let Ok(v) = vcpu.msrs(&[msr::IA32_TSC]) {
            if let Some(&(_, tsc)) = v.first() {
                let after = self.clock.now();
                let now = before + (after - before) / 2;
                let want = self.clock.tsc_at(now);
                // Only a TSC that really differs moves guest time's TSC anchor: by more than
                // 50 µs beyond what the read itself could blur (a backend that ignored the
                // write, or a restore whose TSC and guest time were saved a little apart).
                // TSC-deadline timers convert through that anchor, so a smaller error would
                // make them fire early or late by as much.
                let hz = self.clock.tsc_hz();
                let blur = (u128::from(after - before) * u128::from(hz) / 1_000_000_000) as u64;
                if tsc.abs_diff(want) > hz / 20_000 + blur {
                    tracing::debug!(
                        "guest TSC {tsc:#x} differs from {want:#x}: re-anchoring guest time"
                    );
                    self.clock.anchor_tsc(tsc, now);
                }
            }
        }
    }

    /// Park for a pause: acknowledge and serve commands until resumed. The TSC is put back
    /// where it was, so the guest sees no jump (unless a command replaced the core's state).
    fn park(&self, vcpu: &mut dyn Vcpu) {
        // The TSC as it was when guest time stopped (this core parked a little later).
        let lag = self.clock.frozen_lag();
        let hz = self.clock.tsc_hz();
        let tsc = vcpu
            .msrs(&[msr::IA32_TSC])
            .ok()
            .and_then(|v| v.first().copied())
            .map(|(i, t)| {
                (
                    i,
                    t.wrapping_sub(((u128::from(lag) * u128::from(hz)) / 1_000_000_000) as u64),
                )
            });
        self.handle.take_state_replaced(self.cpu);
        self.handle.park(self.cpu, vcpu, tsc.map(|t| t.1));
        if let Some(t) = tsc
            && !self.handle.take_state_replaced(self.cpu)
            && !self.handle.is_stopping()
            && let Err(e) = vcpu.set_msrs(&[t])
        {
            tracing::debug!(
                "vCPU {}: cannot put the TSC back after a pause: {e}",
                self.cpu
            );
        }
        if !self.handle.is_stopping() {
            self.reanchor_tsc(vcpu);
        }
    }

    /// Inject what the interrupt controller has pending, or ask for a window.
    fn inject(&self, vcpu: &mut dyn Vcpu, stats: &mut CoreStats) -> Result<(), BackendError> {
        let Some(ic) = &self.irq else { return Ok(()) };
        if ic.take_nmi(self.cpu) {
            vcpu.inject_nmi()?;
        }
        if ic.has_interrupt(self.cpu) {
            if vcpu.can_inject() {
                if let Some(v) = ic.acknowledge(self.cpu) {
                    vcpu.inject_interrupt(v)?;
                    stats.injected += 1;
                }
                vcpu.request_interrupt_window(false);
            } else {
                vcpu.request_interrupt_window(true);
            }
        }
        Ok(())
    }

    pub(crate) fn run(self, mut vcpu: Box<dyn Vcpu>) -> CoreStats {
        let mut stats = CoreStats::new(self.cpu);
        crate::bus::set_current_cpu(self.cpu);
        // In HLT with interrupts enabled: the vCPU must not run again until an interrupt is due.
        let mut halted = false;
        // A restored core continues in the mode it was saved in.
        match self.handle.core_mode(self.cpu) {
            CoreMode::WaitStart => {
                if !self.await_start(vcpu.as_mut()) {
                    return stats;
                }
                self.handle.set_core_mode(self.cpu, CoreMode::Running);
            }
            CoreMode::Running => {
                self.reanchor_tsc(vcpu.as_mut());
                self.running.fetch_add(1, Ordering::AcqRel);
            }
            CoreMode::Halted => {
                self.reanchor_tsc(vcpu.as_mut());
                self.running.fetch_add(1, Ordering::AcqRel);
                halted = true;
            }
            CoreMode::Off => {
                self.off(vcpu.as_mut());
                stats.backend = vcpu.stats();
                return stats;
            }
        }
        let mut hooks = self.extensions.hooks(self.cpu);
        let virtual_time = self.clock.is_virtual();
        let mut throttle = crate::sched::CoreThrottle::new(self.cpu);
        let mut was_halted = halted;
        let mut idle_since: Option<Instant> = None;
        let yield_every = self
            .schedule_hz
            .map(|hz| Duration::from_nanos(1_000_000_000 / u64::from(hz)));
        let mut last_yield = Instant::now();
        while !self.handle.is_stopping() {
            self.handle.run_commands(self.cpu, vcpu.as_mut());
            if self.handle.is_paused() {
                self.park(vcpu.as_mut());
                // A paused core owes nothing to its reservation (no misses counted).
                was_halted = true;
                continue;
            }
            if self.sym.has_request(self.cpu) {
                self.serve_symcall(vcpu.as_mut(), &mut hooks, &mut stats);
                continue;
            }
            if halted {
                if self
                    .irq
                    .as_ref()
                    .is_some_and(|ic| ic.has_interrupt(self.cpu) || ic.nmi_pending(self.cpu))
                {
                    halted = false;
                    self.handle.set_core_mode(self.cpu, CoreMode::Running);
                } else if let Some(next) = virtual_time
                    .then(|| self.timers.run_due(self.clock.now()))
                    .flatten()
                {
                    // Deterministic time: an idle core skips ahead to the next timer.
                    vcpu.skip_to(next);
                    self.clock.advance_to(next);
                    self.timers.run_due(next);
                    continue;
                } else {
                    if !self.handle.is_paused() {
                        self.idle(&mut idle_since);
                    }
                    continue;
                }
            }
            if virtual_time {
                let next = self.timers.run_due(self.clock.now());
                vcpu.set_virtual_deadline(next.unwrap_or(u64::MAX));
            }
            if let Err(e) = self.inject(vcpu.as_mut(), &mut stats) {
                self.fail(e);
                break;
            }
            idle_since = None;
            throttle.tick(&self.sched, std::mem::take(&mut was_halted));
            if let Some(every) = yield_every
                && last_yield.elapsed() >= every
            {
                // <schedule_hz>: give the host scheduler a turn.
                std::thread::yield_now();
                last_yield = Instant::now();
            }
            let flow = self.step(vcpu.as_mut(), &mut hooks, &mut stats, false);
            match flow {
                Ok(Flow::Next) => {}
                Ok(Flow::Hlt) => {
                    halted = self.halt(vcpu.as_mut());
                    was_halted |= halted;
                    if halted {
                        self.handle.set_core_mode(self.cpu, CoreMode::Halted);
                    }
                }
                Ok(Flow::Shutdown) => {
                    self.handle.stop(Outcome::Shutdown {
                        vcpu: self.cpu,
                        rip: vcpu.rip(),
                    });
                }
                // Only inside a SymCall.
                Ok(Flow::SymRet(..) | Flow::SymErr(_)) => {}
                Err(e) => {
                    self.fail(e);
                    break;
                }
            }
        }
        stats.backend = vcpu.stats();
        stats.backend.extend(throttle.telemetry());
        stats
    }

    /// The guest is idle (HLT) with nothing due: wait as the yield policy says.
    fn idle(&self, since: &mut Option<Instant>) {
        use crate::sched::YieldStrategy;
        let p = self.yield_policy;
        let since = *since.get_or_insert_with(Instant::now);
        match p.strategy {
            YieldStrategy::Friendly => self.handle.wakers().wait(self.cpu, None),
            YieldStrategy::Greedy => std::hint::spin_loop(),
            YieldStrategy::Adaptive => {
                if since.elapsed() < Duration::from_micros(p.threshold_us) {
                    std::hint::spin_loop();
                } else {
                    self.handle
                        .wakers()
                        .wait(self.cpu, Some(Duration::from_micros(p.time_us)));
                }
            }
        }
    }

    /// Enter the guest once and handle the exit (extension hooks first).
    pub(crate) fn step(
        &self,
        vcpu: &mut dyn Vcpu,
        hooks: &mut [Box<dyn CoreHooks>],
        stats: &mut CoreStats,
        in_symcall: bool,
    ) -> Result<Flow, BackendError> {
        if !hooks.is_empty() {
            let mut ctx = self.core_ctx(vcpu);
            for h in hooks.iter_mut() {
                h.on_entry(&mut ctx);
            }
        }
        let t0 = Instant::now();
        let exit = vcpu.run()?;
        let t1 = Instant::now();
        stats.guest_time += t1 - t0;
        if self.clock.is_virtual() {
            if let Some(ns) = vcpu.virtual_ns() {
                self.clock.advance_to(ns);
            }
        }
        let flow = if !hooks.is_empty() && run_exit_hooks(hooks, &mut self.core_ctx(vcpu), &exit) {
            Flow::Next
        } else {
            self.handle_exit(vcpu, exit, in_symcall)?
        };
        stats.record(exit.kind(), t1.elapsed());
        Ok(flow)
    }

    fn core_ctx<'a>(&'a self, vcpu: &'a mut dyn Vcpu) -> CoreCtx<'a> {
        CoreCtx {
            cpu: self.cpu,
            vcpu,
            mem: &self.mem,
            vm: &self.handle,
        }
    }

    /// The core's own handling of an exit.
    fn handle_exit(
        &self,
        vcpu: &mut dyn Vcpu,
        exit: Exit,
        in_symcall: bool,
    ) -> Result<Flow, BackendError> {
        let mut buf = [0u8; 8];
        match exit {
            Exit::IoIn { port, size } => {
                let d = &mut buf[..usize::from(size.min(8))];
                self.pio.read(u64::from(port), d);
                vcpu.complete_read(d);
            }
            Exit::IoOut {
                port: DOORBELL_PORT,
                ..
            }
            | Exit::Hypercall => return self.hypercall(vcpu, in_symcall),
            Exit::IoOut { port, data } => {
                self.pio.write(u64::from(port), data.as_slice());
            }
            Exit::MmioRead { addr, size } => {
                let d = &mut buf[..usize::from(size.min(8))];
                self.mmio.read(addr, d);
                vcpu.complete_read(d);
            }
            Exit::MmioWrite { addr, data } => {
                self.mmio.write(addr, data.as_slice());
            }
            Exit::MsrRead { index } => vcpu.complete_msr_read(self.msrs.read(self.cpu, index)),
            Exit::MsrWrite { index, value } => {
                vcpu.complete_msr_write(self.msrs.write(self.cpu, index, value))
            }
            Exit::Hlt => return Ok(Flow::Hlt),
            Exit::IrqWindowOpen | Exit::Interrupted => {}
            Exit::Shutdown => return Ok(Flow::Shutdown),
            // No service took it: the guest goes on as if nothing had stopped it.
            Exit::Intercept(i) => match i {
                Intercepted::Syscall { .. } => vcpu.intercept_pass(),
                Intercepted::UserEntry => {}
                Intercepted::UserFault { vector, code, cr2 } => {
                    vcpu.inject_exception(vector, code, cr2)?
                }
            },
        }
        Ok(Flow::Next)
    }

    /// A hypercall (VMCALL/VMMCALL or the doorbell): the registers hold it.
    fn hypercall(&self, vcpu: &mut dyn Vcpu, in_symcall: bool) -> Result<Flow, BackendError> {
        // The registers are replaced with RIP unchanged, which a pending `out` (the doorbell)
        // allows on every backend; VMCALL has nothing pending.
        let regs = vcpu.regs()?;
        let mut ctx = HcallCtx::new(self.cpu, regs, vcpu, &self.mem);
        match ctx.id() {
            id::SYMCALL_RET | id::SYMCALL_ERR if in_symcall && ctx.cpl() == 0 => {
                let status = ctx.arg(0);
                if ctx.id() == id::SYMCALL_ERR {
                    return Ok(Flow::SymErr(status));
                }
                let r = [ctx.arg(1), ctx.arg(2), ctx.arg(3), ctx.arg(4)];
                return Ok(Flow::SymRet(status, r));
            }
            id::SYMCALL_RET | id::SYMCALL_ERR => ctx.ret(err::EBUSY),
            _ => self.hypercalls.dispatch(&mut ctx),
        }
        let regs = ctx.regs;
        vcpu.set_regs(&regs)?;
        Ok(Flow::Next)
    }

    /// A core halted for good: it only serves commands and pauses until the VM stops.
    fn off(&self, vcpu: &mut dyn Vcpu) {
        while !self.handle.is_stopping() {
            self.handle.run_commands(self.cpu, vcpu);
            if self.handle.is_paused() {
                self.park(vcpu);
                continue;
            }
            self.handle.wakers().wait(self.cpu, None);
        }
    }

    /// HLT: with interrupts disabled the core is done; otherwise it is halted until an
    /// interrupt is pending (returns true).
    fn halt(&self, vcpu: &mut dyn Vcpu) -> bool {
        let flags = match vcpu.regs() {
            Ok(r) => r.rflags,
            Err(e) => {
                self.fail(e);
                return false;
            }
        };
        // A HLT executed with TF set leaves its single-step #DB queued (KVM): delivered at
        // the next entry, it ends the halt at once. (Asked only then: it costs an ioctl.)
        if flags & rflags::TF != 0 && vcpu.exception_pending() {
            return false;
        }
        let iflag = flags & rflags::IF != 0;
        if !iflag {
            tracing::debug!("vCPU {} halted with interrupts disabled", self.cpu);
            self.handle.set_core_mode(self.cpu, CoreMode::Off);
            if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.handle.stop(Outcome::Halted);
            }
            self.off(vcpu);
            return false;
        }
        true
    }
}
