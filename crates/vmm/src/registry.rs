//! Device classes registered by their Palacios names, and the context they are built in.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::KernelIrqchip;
use crate::bus::{Bus, BusDevice};
use crate::config::{ConfigError, ConfigNode, DeviceConfig, ExtensionConfig};
use crate::control::VmHandle;
use crate::extension::{ExtensionClass, Extensions};
use crate::host::{Host, HostStream, HostThread};
use crate::hypercall::Hypercalls;
use crate::irq::InterruptController;
use crate::irq::{IrqLine, UnconnectedLine};
use crate::memory::{GuestMem, MemoryMap};
use crate::msr::MsrBus;
use crate::state::{DeviceState, Stateful};
use crate::time::GuestClock;
use crate::timer::TimerQueue;

/// One option a device class understands (for `v3 devices` and for validation).
#[derive(Clone, Copy, Debug)]
pub struct DeviceOption {
    pub name: &'static str,
    pub help: &'static str,
}

/// A kind of device, created by name from the config.
pub trait DeviceClass: Send + Sync {
    /// The Palacios class name, for example `SERIAL`.
    fn name(&self) -> &'static str;
    fn help(&self) -> &'static str;
    /// Options besides `class` and `id`.
    fn options(&self) -> &'static [DeviceOption];
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError>;
    /// True for a class whose devices keep no state a checkpoint needs (everything they hold
    /// is derived from the config, guest memory or guest time). A stateful class registers
    /// its state in [`DeviceClass::create`] with [`BuildCtx::register_state`]; one that does
    /// neither is reported by [`crate::Vm::devices_without_state`].
    fn stateless(&self) -> bool {
        false
    }
}

/// The classes available to a VM.
#[derive(Default)]
pub struct Registry {
    classes: BTreeMap<&'static str, Box<dyn DeviceClass>>,
    extensions: BTreeMap<&'static str, Box<dyn ExtensionClass>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a class; a second class with the same name replaces the first.
    pub fn register(&mut self, class: Box<dyn DeviceClass>) {
        self.classes.insert(class.name(), class);
    }

    pub fn get(&self, name: &str) -> Option<&dyn DeviceClass> {
        self.classes.get(name).map(|b| b.as_ref())
    }

    pub fn classes(&self) -> impl Iterator<Item = &dyn DeviceClass> {
        self.classes.values().map(|b| b.as_ref())
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.classes.keys().copied().collect()
    }

    /// Register an extension class; a second one with the same name replaces the first.
    pub fn register_extension(&mut self, class: Box<dyn ExtensionClass>) {
        self.extensions.insert(class.name(), class);
    }

    pub fn extension_classes(&self) -> impl Iterator<Item = &dyn ExtensionClass> {
        self.extensions.values().map(|b| b.as_ref())
    }

    /// Look the extension up, check its options, and create it into `ctx.extensions`.
    pub fn create_extension(
        &self,
        ctx: &mut BuildCtx,
        cfg: &ExtensionConfig,
    ) -> Result<(), ConfigError> {
        let class = self.extensions.get(cfg.name.as_str()).ok_or_else(|| {
            let known: Vec<&str> = self.extensions.keys().copied().collect();
            cfg.node.val_err(
                "name",
                format!(
                    "unknown extension '{}' (known: {})",
                    cfg.name,
                    if known.is_empty() {
                        "none in this build".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })?;
        let mut allowed: Vec<&str> = vec!["name"];
        allowed.extend(class.options().iter().map(|o| o.name));
        cfg.node
            .check_options(&format!("extension {}", class.name()), &allowed)?;
        ctx.current = Some((format!("extension:{}", cfg.name), class.name().to_string()));
        let r = class.create(ctx, cfg);
        ctx.current = None;
        let ext = r.map_err(|e| {
            if e.pos.is_none() {
                ConfigError {
                    pos: cfg.node.pos,
                    ..e
                }
            } else {
                e
            }
        })?;
        ctx.extensions.list.push((cfg.name.clone(), ext));
        Ok(())
    }

    /// Look the class up, check the device's options, and create it.
    pub fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let class = self.get(&dev.class).ok_or_else(|| {
            dev.node.val_err(
                "class",
                format!(
                    "unknown device class '{}' (known: {})",
                    dev.class,
                    self.names().join(", ")
                ),
            )
        })?;
        let mut allowed: Vec<&str> = vec!["class", "id"];
        allowed.extend(class.options().iter().map(|o| o.name));
        dev.node
            .check_options(&format!("device class {}", class.name()), &allowed)?;
        ctx.current = Some((dev.id.clone(), class.name().to_string()));
        let before = ctx.device_states.len();
        let r = class.create(ctx, dev);
        ctx.current = None;
        r?;
        if !class.stateless() && ctx.device_states.len() == before && !ctx.state_in_backend {
            ctx.without_state
                .push(format!("{} (class {})", dev.id, class.name()));
        }
        ctx.state_in_backend = false;
        Ok(())
    }
}

/// Input into a character frontend (a UART's receive side).
pub trait CharInput: Send + Sync {
    /// Offer bytes; returns how many were taken (0 when the frontend's buffer is full).
    fn push(&self, bytes: &[u8]) -> usize;
}

/// A device that can be connected to a character backend (Palacios' char frontend).
pub trait CharFrontend: Send + Sync {
    /// Connect a backend: guest output goes to `output`; the returned handle feeds input.
    /// `cfg` is the `<frontend>` subtree (for example naming the COM port).
    fn connect(
        &self,
        cfg: &ConfigNode,
        output: Box<dyn Write + Send>,
    ) -> Result<Arc<dyn CharInput>, ConfigError>;
}

/// A line into the backend's in-kernel irqchip.
struct KernelLine {
    chip: Arc<dyn KernelIrqchip>,
    gsi: u32,
}

impl IrqLine for KernelLine {
    fn set_level(&self, high: bool) {
        self.chip.set_irq(self.gsi, high);
    }
}

/// A helper thread owned by the VM (stream pumps); stopped and joined when the VM ends.
pub struct Worker {
    pub name: String,
    pub stop: Arc<AtomicBool>,
    pub thread: Box<dyn HostThread>,
}

type Finisher = Box<dyn FnOnce(&mut BuildCtx) -> Result<(), ConfigError>>;
type IrqProvider = Box<dyn Fn(u32) -> Arc<dyn IrqLine> + Send + Sync>;

/// Everything a device class may touch while it is created.
pub struct BuildCtx {
    pub host: Arc<dyn Host>,
    pub mem: GuestMem,
    pub map: MemoryMap,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub vm: VmHandle,
    pub cores: u32,
    /// The guest's command line (fw_cfg exposes it).
    pub boot_cmdline: String,
    /// Directory of the config file (relative paths resolve against it).
    pub base_dir: Option<std::path::PathBuf>,
    /// `<files>`: id → path (a RAMDISK names its image by id).
    pub files: BTreeMap<String, std::path::PathBuf>,
    /// Char frontends by device id.
    pub char_frontends: HashMap<String, Arc<dyn CharFrontend>>,
    pub workers: Vec<Worker>,
    /// Guest time and device timers.
    pub clock: Arc<GuestClock>,
    pub timers: Arc<TimerQueue>,
    /// MSRs emulated by devices (trapped by the backend).
    pub msrs: MsrBus,
    /// What the exit loop asks for pending interrupts (set by the platform's controllers).
    pub interrupt_controller: Option<Arc<dyn InterruptController>>,
    /// The backend's own irqchip when `<irqchip>kernel</irqchip>`.
    pub kernel_irqchip: Option<Arc<dyn KernelIrqchip>>,
    /// The backend's ioeventfd support (KVM), for virtio notifications.
    pub io_events: Option<Arc<dyn crate::backend::IoEvents>>,
    /// Where devices send MSI messages (connected by the interrupt controller).
    pub msi: Arc<crate::irq::MsiRouter>,
    /// Hypercall handlers by id (devices and extensions register theirs).
    pub hypercalls: Arc<Hypercalls>,
    /// CPUID leaves devices and extensions add or replace: (leaf, subleaf, [eax, ebx, ecx, edx]).
    pub cpuid: Vec<(u32, u32, [u32; 4])>,
    /// The extensions created so far.
    pub extensions: Extensions,
    services: HashMap<std::any::TypeId, Arc<dyn std::any::Any + Send + Sync>>,
    finishers: Vec<Finisher>,
    irq_provider: IrqProvider,
    /// The state of every device that registered one, in creation order.
    pub device_states: Vec<DeviceState>,
    /// Devices of stateful classes that registered no state (`id (class C)`).
    pub without_state: Vec<String>,
    /// The device being created (id, class), for [`BuildCtx::register_state`].
    current: Option<(String, String)>,
    /// The device being created keeps its state in the backend (in-kernel irqchip).
    state_in_backend: bool,
}

impl BuildCtx {
    pub fn new(
        host: Arc<dyn Host>,
        mem: GuestMem,
        map: MemoryMap,
        vm: VmHandle,
        cores: u32,
    ) -> Self {
        let clock = Arc::new(GuestClock::new(crate::time::DEFAULT_TSC_HZ));
        BuildCtx {
            timers: TimerQueue::new(clock.clone()),
            clock,
            msrs: MsrBus::default(),
            interrupt_controller: None,
            kernel_irqchip: None,
            msi: Arc::new(crate::irq::MsiRouter::default()),
            io_events: None,
            services: HashMap::new(),
            hypercalls: Arc::new(Hypercalls::default()),
            cpuid: Vec::new(),
            extensions: Extensions::default(),
            host,
            mem,
            map,
            pio: Arc::new(Bus::new("port")),
            mmio: Arc::new(Bus::new("mmio")),
            vm,
            cores,
            base_dir: None,
            files: BTreeMap::new(),
            boot_cmdline: String::new(),
            char_frontends: HashMap::new(),
            workers: Vec::new(),
            finishers: Vec::new(),
            irq_provider: Box::new(|_| Arc::new(UnconnectedLine::default())),
            device_states: Vec::new(),
            without_state: Vec::new(),
            current: None,
            state_in_backend: false,
        }
    }

    /// Register the state of the device being created (kept under its config id). A device
    /// registers once; parts it has several of (one LAPIC per core) go in one value.
    pub fn register_state(&mut self, state: Arc<dyn Stateful>) {
        let Some((id, class)) = self.current.clone() else {
            tracing::error!("register_state called outside a device's creation");
            return;
        };
        if self.device_states.iter().any(|d| d.id == id) {
            tracing::error!("device '{id}' registered its state twice; the second is ignored");
            return;
        }
        self.device_states.push(DeviceState { id, class, state });
    }

    /// Add (or replace) a CPUID leaf the guest sees.
    pub fn set_cpuid_leaf(&mut self, leaf: u32, subleaf: u32, regs: [u32; 4]) {
        self.cpuid.retain(|(l, s, _)| (*l, *s) != (leaf, subleaf));
        self.cpuid.push((leaf, subleaf, regs));
    }

    /// Register a hypercall handler (an id already taken is a config error).
    pub fn add_hypercall(
        &mut self,
        id: u32,
        f: impl Fn(&mut crate::hypercall::HcallCtx) + Send + Sync + 'static,
    ) -> Result<(), ConfigError> {
        let owner = self
            .current
            .as_ref()
            .map(|(id, class)| format!("{id} ({class})"))
            .unwrap_or_else(|| "the core".into());
        self.hypercalls
            .register(id, &owner, f)
            .map_err(|e| ConfigError::new(None, e))
    }

    /// Register the state of a part of the core (not a device): `id` should start with
    /// `core:`, so that a checkpoint from a build without that part still restores.
    pub fn register_core_state(&mut self, id: &str, class: &str, state: Arc<dyn Stateful>) {
        let prev = self.current.replace((id.to_string(), class.to_string()));
        self.register_state(state);
        self.current = prev;
    }

    /// A path from the config: relative paths are relative to the config file's directory.
    pub fn resolve_path(&self, p: &str) -> std::path::PathBuf {
        let path = std::path::Path::new(p);
        match &self.base_dir {
            Some(d) if path.is_relative() => d.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// The device being created is emulated by the backend (KVM's in-kernel irqchip and PIT),
    /// whose state the backend saves.
    pub fn state_in_backend(&mut self) {
        self.state_in_backend = true;
    }

    /// Register a device on port range `[start, start+len)`.
    pub fn add_ports(
        &mut self,
        start: u16,
        len: u16,
        name: &str,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), ConfigError> {
        self.pio
            .insert(u64::from(start), u64::from(len), name, dev)
            .map_err(|e| ConfigError::new(None, e.to_string()))
    }

    /// Register a device on MMIO range `[start, start+len)`.
    pub fn add_mmio(
        &mut self,
        start: u64,
        len: u64,
        name: &str,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), ConfigError> {
        if (0..len)
            .step_by(4096)
            .any(|o| self.map.is_backed(start + o, 1))
        {
            return Err(ConfigError::new(
                None,
                format!("MMIO range {start:#x}+{len:#x} of '{name}' overlaps guest RAM"),
            ));
        }
        self.mmio
            .insert(start, len, name, dev)
            .map_err(|e| ConfigError::new(None, e.to_string()))
    }

    /// The interrupt line for ISA IRQ / GSI `n`.
    pub fn irq_line(&self, n: u32) -> Arc<dyn IrqLine> {
        match &self.kernel_irqchip {
            Some(chip) => Arc::new(KernelLine {
                chip: chip.clone(),
                gsi: n,
            }),
            None => (self.irq_provider)(n),
        }
    }

    /// Share a typed part with later devices (for example the PIC with the APIC bus).
    pub fn provide<T: Send + Sync + 'static>(&mut self, part: Arc<T>) {
        self.services.insert(std::any::TypeId::of::<T>(), part);
    }

    /// A part an earlier device provided.
    pub fn service<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.services
            .get(&std::any::TypeId::of::<T>())
            .cloned()
            .and_then(|a| a.downcast::<T>().ok())
    }

    /// The part of type `T` provided so far, or a new default one (provided now).
    pub fn service_or_default<T: Default + Send + Sync + 'static>(&mut self) -> Arc<T> {
        if let Some(s) = self.service::<T>() {
            return s;
        }
        let s = Arc::new(T::default());
        self.provide(s.clone());
        s
    }

    /// Route [`BuildCtx::irq_line`] to an interrupt controller (done by the platform).
    pub fn set_irq_provider(&mut self, p: IrqProvider) {
        self.irq_provider = p;
    }

    /// Run `f` after every device is created (to apply defaults that depend on later devices).
    pub fn on_finish(
        &mut self,
        f: impl FnOnce(&mut BuildCtx) -> Result<(), ConfigError> + 'static,
    ) {
        self.finishers.push(Box::new(f));
    }

    /// Run the finishers registered so far (and any they register).
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        while !self.finishers.is_empty() {
            let fs = std::mem::take(&mut self.finishers);
            for f in fs {
                f(self)?;
            }
        }
        Ok(())
    }

    /// Connect a host stream to the char frontend `frontend` (a device id): output is written
    /// to the stream and a pump thread feeds the stream's input to the frontend.
    pub fn connect_char(
        &mut self,
        frontend: &str,
        cfg: &ConfigNode,
        stream: HostStream,
    ) -> Result<(), ConfigError> {
        let fe =
            self.char_frontends.get(frontend).cloned().ok_or_else(|| {
                cfg.err(format!("device '{frontend}' is not a character frontend"))
            })?;
        let HostStream {
            name,
            output,
            input,
        } = stream;
        let sink = fe.connect(cfg, output)?;
        if let Some(mut input) = input {
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let vm = self.vm.clone();
            let pump = move || {
                let mut buf = [0u8; 64];
                'outer: while !stop2.load(Ordering::Acquire) {
                    // A VM that is not running yet (a restore may still replace the device's
                    // state) or is paused takes no input: it stays in the host stream.
                    if !vm.has_started() || vm.is_paused() {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    match input.read_timeout(&mut buf, Duration::from_millis(50)) {
                        Ok(None) => continue,
                        Ok(Some(0)) | Err(_) => break,
                        Ok(Some(n)) => {
                            let mut off = 0;
                            while off < n {
                                if stop2.load(Ordering::Acquire) {
                                    break 'outer;
                                }
                                // Paused meanwhile (a save, a migration's last copy): keep
                                // the bytes until the VM runs again.
                                if vm.is_paused() {
                                    std::thread::sleep(Duration::from_millis(1));
                                    continue;
                                }
                                let took = sink.push(&buf[off..n]);
                                off += took;
                                if took == 0 {
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                            }
                        }
                    }
                }
            };
            let tname = format!("input-{name}");
            let thread = self.host.spawn(&tname, Box::new(pump)).map_err(|e| {
                cfg.err(format!(
                    "cannot start the input thread of stream '{name}': {e}"
                ))
            })?;
            self.workers.push(Worker {
                name: tname,
                stop,
                thread,
            });
        }
        Ok(())
    }
}
