//! A composed VM and its exit loop (one thread per core).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use palacios_x86::{CpuState, msr, rflags};

use crate::backend::{Backend, BackendError, CoreMode, Exit, Vcpu, VcpuState};
use crate::bus::Bus;
use crate::config::{ConfigError, IrqchipMode, VmConfig};
use crate::control::{Outcome, VmHandle};
use crate::host::Host;
use crate::irq::InterruptController;
use crate::memory::{GuestMem, MemoryMap};
use crate::msr::MsrBus;
use crate::registry::{BuildCtx, Registry, Worker};
use crate::state::DeviceState;
use crate::telemetry::{CoreStats, Telemetry};
use crate::time::GuestClock;
use crate::timer::TimerQueue;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error("{what}: {source}")]
    Host {
        what: String,
        source: std::io::Error,
    },
}

/// A VM built from a config, ready to load a guest into and run.
pub struct Vm {
    map: MemoryMap,
    mem: GuestMem,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    msrs: Arc<MsrBus>,
    handle: VmHandle,
    host: Arc<dyn Host>,
    vcpus: Vec<Box<dyn Vcpu>>,
    workers: Vec<Worker>,
    irq: Option<Arc<dyn InterruptController>>,
    clock: Arc<GuestClock>,
    timers: Arc<TimerQueue>,
    boot: Option<CpuState>,
    telemetry: bool,
    /// The backend emulates the interrupt controllers, including INIT/SIPI.
    kernel_irqchip: bool,
    device_states: Vec<DeviceState>,
    without_state: Vec<String>,
}

/// What [`Vm::validate`] found besides errors.
#[derive(Debug, Default)]
pub struct Validated {
    /// (id, class) of every device that registered its state.
    pub stateful: Vec<(String, String)>,
    /// Devices of stateful classes that registered no state.
    pub without_state: Vec<String>,
}

/// Create every configured device into `ctx`, attributing errors to their `<device>`.
fn create_devices(
    cfg: &VmConfig,
    registry: &Registry,
    ctx: &mut BuildCtx,
) -> Result<(), ConfigError> {
    let src = cfg.source.as_deref();
    ctx.base_dir = src.and_then(|p| p.parent()).map(|p| p.to_path_buf());
    ctx.files = cfg.files.clone();
    ctx.boot_cmdline = cfg
        .boot
        .as_ref()
        .map(|b| b.cmdline.clone())
        .unwrap_or_default();
    for dev in &cfg.devices {
        registry.create(ctx, dev).map_err(|e| {
            let e = if e.pos.is_none() {
                ConfigError {
                    pos: dev.node.pos,
                    ..e
                }
            } else {
                e
            };
            e.in_file(src)
        })?;
    }
    ctx.finish().map_err(|e| e.in_file(src))
}

impl Vm {
    /// Build the VM: memory, backend, every configured device, then the vCPUs.
    pub fn build(
        cfg: &VmConfig,
        registry: &Registry,
        backend: Box<dyn Backend>,
        host: Arc<dyn Host>,
    ) -> Result<Vm, VmError> {
        Self::build_with_memory(cfg, registry, backend, host, None)
    }

    /// [`Vm::build`] with guest RAM made by the caller (for [`MemoryMap::pc`] of the config's
    /// size, for example mapped from a checkpoint); `None` allocates fresh RAM.
    pub fn build_with_memory(
        cfg: &VmConfig,
        registry: &Registry,
        backend: Box<dyn Backend>,
        host: Arc<dyn Host>,
        mem: Option<GuestMem>,
    ) -> Result<Vm, VmError> {
        let map = MemoryMap::pc(cfg.mem_mib << 20);
        let mem_from_file = mem.is_some();
        let mem = match mem {
            Some(m) => m,
            None => map.create_memory().map_err(|e| VmError::Memory {
                mib: cfg.mem_mib,
                reason: e.to_string(),
            })?,
        };
        let backend: Arc<dyn Backend> = Arc::from(backend);
        backend.map_memory(&mem)?;
        let dirty = Arc::new(crate::dirty::DirtyLog::new(&mem));
        crate::write_watch::attach_dirty_log(&mem, dirty.clone());
        let handle = VmHandle::new(cfg.cores);
        let mut ctx = BuildCtx::new(
            host.clone(),
            mem.clone(),
            map.clone(),
            handle.clone(),
            cfg.cores,
        );
        if let Some(hz) = backend.tsc_hz() {
            ctx.clock.set_tsc_hz(hz);
        }
        if cfg.deterministic {
            if cfg.cores != 1 {
                return Err(ConfigError::new(
                    None,
                    "<clock>deterministic</clock> supports one core (cores run on separate threads)",
                )
                .in_file(cfg.source.as_deref())
                .into());
            }
            if !backend.enable_virtual_time() {
                return Err(ConfigError::new(
                    None,
                    format!(
                        "<clock>deterministic</clock> needs the emulator backend (this is '{}')",
                        backend.name()
                    ),
                )
                .in_file(cfg.source.as_deref())
                .into());
            }
            ctx.clock = Arc::new(GuestClock::new_virtual(ctx.clock.tsc_hz()));
            ctx.timers = TimerQueue::new(ctx.clock.clone());
        }
        ctx.io_events = backend.io_events();
        if cfg.irqchip == IrqchipMode::Kernel {
            let chip = backend.create_kernel_irqchip()?;
            ctx.msi.connect(Arc::new(KernelMsi(chip.clone())));
            ctx.kernel_irqchip = Some(chip);
        }
        create_devices(cfg, registry, &mut ctx)?;
        handle.add_quiesce(Arc::new(TimeQuiesce {
            clock: ctx.clock.clone(),
            timers: ctx.timers.clone(),
        }));
        backend.trap_msrs(&ctx.msrs.ranges())?;
        if cfg.cpu_portable {
            backend.restrict_cpu_features(crate::backend::PORTABLE_FEATURES)?;
        }
        backend.hide_cpu_features(&cfg.cpu_hide)?;
        let vcpus = (0..cfg.cores)
            .map(|i| backend.create_vcpu(i))
            .collect::<Result<Vec<_>, _>>()?;
        handle.set_parts(Arc::new(crate::snapshot::VmParts {
            config: cfg.clone(),
            mem: mem.clone(),
            clock: ctx.clock.clone(),
            devices: ctx.device_states.clone(),
            without_state: ctx.without_state.clone(),
            irqchip: ctx.kernel_irqchip.clone(),
            backend: backend.name(),
            cpuid: backend.cpuid_features(),
            save_lock: std::sync::Mutex::new(()),
            mem_from_file,
            backend_obj: backend.clone(),
            dirty,
        }));
        tracing::debug!(
            "VM built: {} MiB, {} cores, {} devices, backend {}",
            cfg.mem_mib,
            cfg.cores,
            cfg.devices.len(),
            backend.name()
        );
        Ok(Vm {
            map,
            mem,
            pio: ctx.pio,
            mmio: ctx.mmio,
            msrs: Arc::new(ctx.msrs),
            handle,
            host,
            vcpus,
            workers: ctx.workers,
            irq: ctx.interrupt_controller,
            kernel_irqchip: ctx.kernel_irqchip.is_some(),
            clock: ctx.clock,
            timers: ctx.timers,
            boot: None,
            telemetry: cfg.telemetry,
            device_states: ctx.device_states,
            without_state: ctx.without_state,
        })
    }

    /// Create every configured device against scratch memory and `host` (use
    /// [`crate::host::DryRunHost`] to open nothing), without a backend: the config check.
    pub fn validate(
        cfg: &VmConfig,
        registry: &Registry,
        host: Arc<dyn Host>,
    ) -> Result<Validated, VmError> {
        let map = MemoryMap::pc(cfg.mem_mib << 20);
        let mem = map.create_memory().map_err(|e| VmError::Memory {
            mib: cfg.mem_mib,
            reason: e.to_string(),
        })?;
        let mut ctx = BuildCtx::new(host, mem, map, VmHandle::new(cfg.cores), cfg.cores);
        let r = create_devices(cfg, registry, &mut ctx);
        // Drop the devices now (worker threads, disk connections), not at exit.
        ctx.pio.clear();
        ctx.mmio.clear();
        r?;
        Ok(Validated {
            stateful: ctx
                .device_states
                .iter()
                .map(|d| (d.id.clone(), d.class.clone()))
                .collect(),
            without_state: ctx.without_state,
        })
    }

    /// The state of every device that registered one.
    pub fn device_states(&self) -> &[DeviceState] {
        &self.device_states
    }

    /// Devices of stateful classes that registered no state (a checkpoint refuses them).
    pub fn devices_without_state(&self) -> &[String] {
        &self.without_state
    }

    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }
    pub fn memory_map(&self) -> &MemoryMap {
        &self.map
    }
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }
    pub fn port_bus(&self) -> &Bus {
        &self.pio
    }
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }
    pub fn clock(&self) -> &Arc<GuestClock> {
        &self.clock
    }
    pub fn cores(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Restore core `cpu`'s complete state before the VM runs (a checkpoint): the core
    /// continues in the saved mode instead of waiting for a start state.
    pub fn restore_core(&mut self, cpu: u32, state: &VcpuState) -> Result<(), VmError> {
        let vcpu = self
            .vcpus
            .iter_mut()
            .find(|v| v.index() == cpu)
            .ok_or_else(|| ConfigError::new(None, format!("no core {cpu} in this VM")))?;
        vcpu.restore_state(state)?;
        self.handle.set_core_mode(cpu, state.mode);
        if let Some(start) = &state.pending_start {
            self.handle.start_core(cpu, start.clone());
        }
        Ok(())
    }

    /// The guest clock and timer queue (a restore sets guest time before the VM runs).
    pub fn timers(&self) -> &Arc<TimerQueue> {
        &self.timers
    }

    /// The state the boot core starts in (from a loader).
    pub fn set_boot_state(&mut self, state: CpuState) {
        self.boot = Some(state);
    }

    /// The controller the exit loop asks for pending interrupts (replaces the platform's).
    pub fn set_interrupt_controller(&mut self, ic: Arc<dyn InterruptController>) {
        self.irq = Some(ic);
    }

    /// Force telemetry on (`--stats`).
    pub fn enable_telemetry(&mut self, on: bool) {
        self.telemetry |= on;
    }

    /// Run until the VM ends; every thread is joined before this returns.
    pub fn run(mut self) -> RunReport {
        let started = Instant::now();
        if self.handle.core_mode(0) == CoreMode::WaitStart {
            let boot = self.boot.take().unwrap_or_else(CpuState::reset);
            self.handle.start_core(0, boot);
        }
        let timers = self.timers.clone();
        let timer_thread = match self.host.spawn("timers", Box::new(move || timers.run())) {
            Ok(t) => Some(t),
            Err(e) => {
                self.handle.stop(Outcome::Failed(format!(
                    "cannot start the timer thread: {e}"
                )));
                None
            }
        };
        let running = Arc::new(AtomicU32::new(0));
        let mut threads = Vec::new();
        // Cores the VM ended before starting still get a (zero) line in the telemetry.
        let mut not_started = Vec::new();
        self.handle.expect_cores(self.vcpus.len() as u32);
        for vcpu in std::mem::take(&mut self.vcpus) {
            if self.handle.is_stopping() {
                not_started.push(vcpu.index());
                self.handle.core_exited();
                continue;
            }
            let core = CoreLoop {
                cpu: vcpu.index(),
                handle: self.handle.clone(),
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                msrs: self.msrs.clone(),
                irq: self.irq.clone(),
                clock: self.clock.clone(),
                timers: self.timers.clone(),
                running: running.clone(),
                kernel_irqchip: self.kernel_irqchip,
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let cpu = core.cpu;
            let flag = vcpu.kick_flag();
            let f = Box::new(move || {
                let handle = core.handle.clone();
                let cpu = core.cpu;
                let stats = core.run(vcpu);
                handle.drop_commands(cpu);
                handle.core_exited();
                let _ = tx.send(stats);
            });
            match self.host.spawn(&format!("vcpu{cpu}"), f) {
                Ok(t) => {
                    let k: Arc<dyn crate::control::Kick> = match flag.clone() {
                        Some(f) => Arc::new(FlagKick {
                            signal: t.kicker(),
                            flag: f,
                        }),
                        None => t.kicker(),
                    };
                    self.handle.wakers().set_kicker(cpu, Some(k));
                    threads.push((cpu, t, rx, flag));
                }
                Err(e) => {
                    self.handle.core_exited();
                    self.handle.stop(Outcome::Failed(format!(
                        "cannot start the thread of vCPU {cpu}: {e}"
                    )));
                    break;
                }
            }
        }
        let outcome = self.handle.wait(None).unwrap_or(Outcome::Stopped);
        // Kick every core until its thread has left the backend and finished.
        let mut cores = Vec::new();
        for (cpu, t, rx, flag) in threads {
            let k = t.kicker();
            while !t.is_finished() {
                k.kick();
                if let Some(f) = &flag {
                    f.store(true, Ordering::Release);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            self.handle.wakers().set_kicker(cpu, None);
            if let Err(p) = t.join() {
                tracing::error!("vCPU {cpu} thread panicked: {p}");
            }
            cores.push(rx.try_recv().unwrap_or_else(|_| CoreStats::new(cpu)));
        }
        cores.extend(not_started.into_iter().map(CoreStats::new));
        cores.sort_by_key(|c| c.core);
        self.timers.shutdown();
        if let Some(t) = timer_thread {
            if let Err(p) = t.join() {
                tracing::error!("timer thread panicked: {p}");
            }
        }
        for w in self.workers.drain(..) {
            w.stop.store(true, Ordering::Release);
            if let Err(p) = w.thread.join() {
                tracing::error!("worker {} panicked: {p}", w.name);
            }
        }
        let telemetry = Telemetry {
            cores,
            unclaimed_ports: self.pio.unclaimed(),
            unclaimed_mmio: self.mmio.unclaimed(),
            wall: started.elapsed(),
        };
        RunReport {
            outcome,
            telemetry,
            print_telemetry: self.telemetry,
        }
    }
}

/// Pause stops guest time and the timer thread.
struct TimeQuiesce {
    clock: Arc<GuestClock>,
    timers: Arc<TimerQueue>,
}

impl crate::control::Quiesce for TimeQuiesce {
    fn quiesce(&self, stop: bool) {
        if stop {
            self.clock.freeze();
            self.timers.set_paused(true);
        } else {
            self.clock.thaw();
            self.timers.set_paused(false);
        }
    }
}

/// Kicks a core whose backend polls a flag, and signals its thread too (to end a wait).
struct FlagKick {
    signal: Arc<dyn crate::control::Kick>,
    flag: Arc<std::sync::atomic::AtomicBool>,
}

impl crate::control::Kick for FlagKick {
    fn kick(&self) {
        self.flag.store(true, Ordering::Release);
        self.signal.kick();
    }
}

/// What [`Vm::run`] returns.
pub struct RunReport {
    pub outcome: Outcome,
    pub telemetry: Telemetry,
    /// Telemetry was enabled in the config or forced on.
    pub print_telemetry: bool,
}

struct CoreLoop {
    cpu: u32,
    handle: VmHandle,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    msrs: Arc<MsrBus>,
    irq: Option<Arc<dyn InterruptController>>,
    clock: Arc<GuestClock>,
    timers: Arc<TimerQueue>,
    /// Started cores that have not halted for good.
    running: Arc<AtomicU32>,
    kernel_irqchip: bool,
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
                // Only a TSC that really differs (a backend that ignored the write; more than
                // 10 ms) moves guest time's TSC anchor.
                if tsc.abs_diff(want) > self.clock.tsc_hz() / 100 + (after - before) {
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

    fn run(self, mut vcpu: Box<dyn Vcpu>) -> CoreStats {
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
        let mut buf = [0u8; 8];
        let virtual_time = self.clock.is_virtual();
        while !self.handle.is_stopping() {
            self.handle.run_commands(self.cpu, vcpu.as_mut());
            if self.handle.is_paused() {
                self.park(vcpu.as_mut());
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
                        self.handle.wakers().wait(self.cpu, None);
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
            let t0 = Instant::now();
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            };
            let t1 = Instant::now();
            stats.guest_time += t1 - t0;
            if virtual_time {
                if let Some(ns) = vcpu.virtual_ns() {
                    self.clock.advance_to(ns);
                }
            }
            match exit {
                Exit::IoIn { port, size } => {
                    let d = &mut buf[..usize::from(size.min(8))];
                    self.pio.read(u64::from(port), d);
                    vcpu.complete_read(d);
                }
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
                Exit::Hlt => {
                    halted = self.halt(vcpu.as_mut());
                    if halted {
                        self.handle.set_core_mode(self.cpu, CoreMode::Halted);
                    }
                }
                Exit::IrqWindowOpen | Exit::Interrupted => {}
                Exit::Shutdown => {
                    self.handle.stop(Outcome::Shutdown {
                        vcpu: self.cpu,
                        rip: vcpu.rip(),
                    });
                }
            }
            stats.record(exit.kind(), t1.elapsed());
        }
        stats.backend = vcpu.stats();
        stats
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
        let iflag = match vcpu.regs() {
            Ok(r) => r.rflags & rflags::IF != 0,
            Err(e) => {
                self.fail(e);
                return false;
            }
        };
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

/// MSI messages into the backend's in-kernel LAPICs.
struct KernelMsi(Arc<dyn crate::backend::KernelIrqchip>);

impl crate::irq::MsiController for KernelMsi {
    fn send_msi(&self, msg: crate::irq::MsiMessage) {
        if !self.0.signal_msi(msg) {
            tracing::debug!("MSI {msg:x?}: the in-kernel irqchip did not take it");
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Devices that hold the bus they sit on (the PCI host bridge) are dropped with it.
        self.pio.clear();
        self.mmio.clear();
    }
}
