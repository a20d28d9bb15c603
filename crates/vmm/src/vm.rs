//! A composed VM and its exit loop (one thread per core).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use palacios_x86::CpuState;

use crate::backend::{Backend, BackendError, CoreMode, Vcpu, VcpuState};
use crate::bus::Bus;
use crate::config::{ConfigError, IrqchipMode, VmConfig};
use crate::control::{Outcome, VmHandle};
use crate::core_loop::CoreLoop;
use crate::extension::Extensions;
use crate::host::Host;
use crate::hypercall::Hypercalls;
use crate::irq::InterruptController;
use crate::memory::{GuestMem, MemoryMap};
use crate::msr::MsrBus;
use crate::registry::{BuildCtx, Registry, Worker};
use crate::state::DeviceState;
use crate::symbiotic::Symbiotic;
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
    hypercalls: Arc<Hypercalls>,
    extensions: Arc<Extensions>,
    sym: Arc<Symbiotic>,
    /// VSched reservations (crate::sched).
    sched: Arc<crate::sched::VSched>,
    schedule_hz: Option<u32>,
    yield_policy: crate::sched::YieldPolicy,
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
    ctx.finish().map_err(|e| e.in_file(src))?;
    for ext in &cfg.extensions {
        registry
            .create_extension(ctx, ext)
            .map_err(|e| e.in_file(src))?;
    }
    ctx.finish().map_err(|e| e.in_file(src))
}

/// The facts GUEST_INFO and SymSpy give the guest, as `key=value` lines.
fn vmm_info(
    cfg: &VmConfig,
    backend: &str,
    clock: &Arc<GuestClock>,
) -> Arc<dyn Fn() -> String + Send + Sync> {
    let vm = cfg
        .source
        .as_deref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unnamed".into());
    let fixed = format!(
        "vmm=palacios-rs\nversion={}\nbackend={backend}\ncores={}\nvm={vm}\ndilation={}\n",
        env!("CARGO_PKG_VERSION"),
        cfg.cores,
        cfg.time.dilation,
    );
    let clock = clock.clone();
    Arc::new(move || format!("{fixed}tsc_khz={}\n", clock.tsc_hz() / 1000))
}

/// The core's symbiotic interfaces and hypercalls, before the devices.
fn attach_core_services(
    cfg: &VmConfig,
    backend: &str,
    ctx: &mut BuildCtx,
) -> Result<Arc<Symbiotic>, ConfigError> {
    let info = vmm_info(cfg, backend, &ctx.clock);
    let sym = Arc::new(Symbiotic::new(ctx.mem.clone(), cfg.cores, info.clone()));
    let e = |m: String| ConfigError::new(None, m);
    sym.attach(ctx).map_err(e)?;
    let clock = ctx.clock.clone();
    crate::hypercall::register_core(
        &ctx.hypercalls,
        info,
        Arc::new(move || clock.tsc_hz() / 1000),
    )
    .map_err(e)?;
    let (s1, s2) = (sym.clone(), sym.clone());
    ctx.register_core_state(
        "core:symbiotic",
        "symbiotic",
        crate::state::state_fn(1, move || s1.save(), move |st| s2.restore(st)),
    );
    Ok(sym)
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
        backend
            .set_time_scale(cfg.time.tsc_khz.map(|k| k * 1000), cfg.time.dilation)
            .map_err(|e| {
                ConfigError::new(None, format!("<time>: {e}")).in_file(cfg.source.as_deref())
            })?;
        if let Some(hz) = backend.tsc_hz() {
            ctx.clock.set_tsc_hz(hz);
        }
        ctx.clock.set_dilation(cfg.time.dilation);
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
        let sym = attach_core_services(cfg, backend.name(), &mut ctx)
            .map_err(|e| e.in_file(cfg.source.as_deref()))?;
        create_devices(cfg, registry, &mut ctx)?;
        let mut leaves = crate::hypercall::cpuid_leaves(
            backend.traps_vmcall(),
            (ctx.clock.tsc_hz() / 1000).min(u64::from(u32::MAX)) as u32,
        );
        leaves.extend(ctx.cpuid.iter().copied());
        backend.set_cpuid_leaves(&leaves)?;
        handle.add_control(&sym);
        let mut reservations = cfg.sched.clone();
        reservations.resize(cfg.cores as usize, None);
        let sched = Arc::new(crate::sched::VSched::new(reservations));
        handle.add_control(&sched);
        let extensions = Arc::new(std::mem::take(&mut ctx.extensions));
        handle.add_control(&extensions);
        handle.add_control(&ctx.hypercalls);
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
            hypercalls: ctx.hypercalls,
            extensions,
            sym,
            sched,
            schedule_hz: cfg.schedule_hz,
            yield_policy: cfg.yield_policy,
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
        let r = attach_core_services(cfg, "none", &mut ctx)
            .and_then(|_| create_devices(cfg, registry, &mut ctx));
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
        // <schedule_hz>: every core comes back to its loop (and yields) at least this often.
        let tick_thread = self.schedule_hz.and_then(|hz| {
            let h = self.handle.clone();
            let every = Duration::from_nanos(1_000_000_000 / u64::from(hz));
            let f = Box::new(move || {
                while !h.is_stopping() {
                    std::thread::sleep(every);
                    for cpu in 0..h.wakers().cores() {
                        h.wakers().kick(cpu);
                    }
                }
            });
            match self.host.spawn("sched-tick", f) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("<schedule_hz> is not applied: no thread for it: {e}");
                    None
                }
            }
        });
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
                mem: self.mem.clone(),
                hypercalls: self.hypercalls.clone(),
                extensions: self.extensions.clone(),
                sym: self.sym.clone(),
                sched: self.sched.clone(),
                schedule_hz: self.schedule_hz,
                yield_policy: self.yield_policy,
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let cpu = core.cpu;
            let flag = vcpu.kick_flag();
            let f = Box::new(move || {
                let handle = core.handle.clone();
                let cpu = core.cpu;
                // A panic on a vCPU thread (a bug in a handler, a hook or a device) ends the
                // VM with a failure instead of leaving it waiting for this core forever.
                let stats =
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.run(vcpu)))
                    {
                        Ok(s) => s,
                        Err(p) => {
                            let what = p
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| p.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "unknown panic".into());
                            handle.stop(Outcome::Failed(format!(
                            "internal error on vCPU {cpu} (a bug, not the guest's doing): {what}"
                        )));
                            CoreStats::new(cpu)
                        }
                    };
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
        if let Some(t) = tick_thread
            && let Err(p) = t.join()
        {
            tracing::error!("sched-tick thread panicked: {p}");
        }
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
