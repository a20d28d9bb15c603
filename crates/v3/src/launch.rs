//! Choosing a backend, building the VM, loading the guest and running it.

use std::path::Path;
use std::sync::Arc;

use palacios_boot::{BootParams, Module};
use palacios_vmm::config::{BackendChoice, BootConfig, VmConfig};
use palacios_vmm::host::Host;
use palacios_vmm::vm::RunReport;
use palacios_vmm::{Backend, BackendError, LinuxHost, Vm, VmError, VmHandle};

use crate::status;

/// Backends compiled into this build, for messages.
pub const AVAILABLE: &str = "kvm (needs a usable /dev/kvm), emu (the software x86 emulator)";

/// A failure before the VM runs, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    NoBackend(String),
    #[error("{0}")]
    Vm(String),
}

impl LaunchError {
    pub fn status(&self) -> u8 {
        match self {
            LaunchError::Config(_) => status::CONFIG_ERROR,
            LaunchError::NoBackend(_) => status::NO_BACKEND,
            LaunchError::Vm(_) => status::VM_FAILURE,
        }
    }
}

impl From<VmError> for LaunchError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Config(c) => LaunchError::Config(c.to_string()),
            VmError::Backend(b @ BackendError::Unavailable { .. }) => {
                LaunchError::NoBackend(b.to_string())
            }
            other => LaunchError::Vm(other.to_string()),
        }
    }
}

/// Create the backend the config asks for.
pub fn backend(choice: BackendChoice) -> Result<Box<dyn Backend>, LaunchError> {
    match choice {
        BackendChoice::Kvm => palacios_kvm::KvmBackend::new(AVAILABLE)
            .map(|b| Box::new(b) as Box<dyn Backend>)
            .map_err(|e| LaunchError::NoBackend(e.to_string())),
        BackendChoice::Emu => Ok(Box::new(palacios_emu::EmuBackend::new(emu_options()))),
        BackendChoice::Auto => match palacios_kvm::KvmBackend::new(AVAILABLE) {
            Ok(b) => Ok(Box::new(b)),
            Err(e) => {
                tracing::info!("{e}; using the emulator backend");
                Ok(Box::new(palacios_emu::EmuBackend::new(emu_options())))
            }
        },
    }
}

/// Emulator options from the environment: `PALACIOS_EMU_TRACE=FILE` writes an instruction
/// trace, `PALACIOS_EMU_PROFILE=FILE` a sampled profile of guest RIPs, `PALACIOS_EMU_JIT=0`
/// turns block translation off (everything is interpreted).
fn emu_options() -> palacios_emu::EmuOptions {
    palacios_emu::EmuOptions {
        trace: std::env::var_os("PALACIOS_EMU_TRACE").map(Into::into),
        profile: std::env::var_os("PALACIOS_EMU_PROFILE").map(Into::into),
        no_jit: std::env::var("PALACIOS_EMU_JIT").is_ok_and(|v| v == "0"),
        jit_threshold: None,
    }
}

/// The guest image: from the config's `<boot>` or given directly (the demo).
#[derive(Clone)]
pub enum Image<'a> {
    FromConfig,
    Bytes {
        data: &'a [u8],
        cmdline: &'a str,
        modules: Vec<(&'a [u8], &'a str)>,
    },
}

/// A VM that is built and loaded, ready to run.
pub struct Prepared {
    pub vm: Vm,
}

fn read(host: &dyn Host, what: &str, p: &Path) -> Result<Vec<u8>, LaunchError> {
    host.read_file(p)
        .map_err(|e| LaunchError::Config(format!("cannot read {what} {}: {e}", p.display())))
}

/// Build the VM and load the guest into it.
pub fn prepare(
    cfg: &VmConfig,
    image: Image,
    backend: Box<dyn Backend>,
    host: Arc<dyn Host>,
) -> Result<Prepared, LaunchError> {
    let registry = crate::registry();
    // Read and check the guest files before building anything (clear errors, nothing started).
    let files = match (&image, &cfg.boot) {
        (Image::FromConfig, Some(b)) => {
            let kernel = read(host.as_ref(), "kernel", &b.kernel)?;
            let mods = b
                .modules
                .iter()
                .map(|m| read(host.as_ref(), "module", &m.path))
                .collect::<Result<Vec<_>, _>>()?;
            Some((kernel, mods))
        }
        (Image::FromConfig, None) => {
            return Err(LaunchError::Config(
                "the config has no <boot> section: nothing to run (or use --kernel FILE)".into(),
            ));
        }
        _ => None,
    };
    let mut vm = Vm::build(cfg, &registry, backend, host)?;
    let params = match (&image, &files, &cfg.boot) {
        (
            Image::Bytes {
                data,
                cmdline,
                modules,
            },
            _,
            _,
        ) => BootParams {
            format: palacios_vmm::config::BootFormat::Auto,
            image: data,
            load_addr: None,
            entry: None,
            cmdline,
            modules: modules
                .iter()
                .map(|(d, c)| Module {
                    data: d,
                    cmdline: c,
                })
                .collect(),
        },
        (_, Some((kernel, mods)), Some(b)) => boot_params(b, kernel, mods),
        _ => unreachable!("checked above"),
    };
    let what = cfg
        .boot
        .as_ref()
        .map(|b| b.kernel.display().to_string())
        .unwrap_or_else(|| "the guest".into());
    let state = palacios_boot::load(vm.memory(), vm.memory_map(), &params)
        .map_err(|e| LaunchError::Config(format!("cannot load {what}: {e}")))?;
    vm.set_boot_state(state);
    Ok(Prepared { vm })
}

/// Build the VM a checkpoint describes and restore it (guest memory is mapped from the
/// checkpoint copy-on-write; nothing is loaded).
pub fn prepare_restore(
    cfg: &VmConfig,
    ck: &palacios_checkpoint::Opened,
    backend: Box<dyn Backend>,
    host: Arc<dyn Host>,
) -> Result<Prepared, LaunchError> {
    let registry = crate::registry();
    let mem = palacios_vmm::snapshot::memory_of(ck, cfg)
        .map_err(|e| LaunchError::Config(format!("cannot restore {}: {e}", ck.path.display())))?;
    let mut vm = Vm::build_with_memory(cfg, &registry, backend, host, Some(mem))?;
    palacios_vmm::snapshot::restore(&mut vm, ck)
        .map_err(|e| LaunchError::Config(format!("cannot restore {}: {e}", ck.path.display())))?;
    Ok(Prepared { vm })
}

/// Build the VM a migration's Hello describes and receive it (memory, then state); the
/// source is told the outcome either way.
pub fn prepare_incoming(
    cfg: &VmConfig,
    conn: &mut std::net::TcpStream,
    hello: &palacios_vmm::migrate::wire::Hello,
    backend: Box<dyn Backend>,
    host: Arc<dyn Host>,
) -> Result<Prepared, LaunchError> {
    use palacios_vmm::migrate::wire;
    let registry = crate::registry();
    let mut vm = match Vm::build(cfg, &registry, backend, host) {
        Ok(vm) => vm,
        Err(e) => {
            let msg = format!("the destination cannot build the VM: {e}");
            let _ = wire::write_frame(conn, wire::Kind::Refuse, &wire::refuse_payload(&msg));
            return Err(LaunchError::Config(msg));
        }
    };
    let mut progress = crate::progress::Progress::new("receiving");
    let total = hello.regions.iter().map(|r| r.1 / 4096).sum::<u64>();
    palacios_vmm::migrate::receive(conn, hello, &mut vm, &mut |pages| {
        progress.update(pages * 4096, total * 4096)
    })
    .map_err(|e| LaunchError::Config(format!("incoming migration failed: {e}")))?;
    progress.finish();
    Ok(Prepared { vm })
}

/// What the loader needs from a `<boot>` section and the files it names.
fn boot_params<'a>(b: &'a BootConfig, kernel: &'a [u8], mods: &'a [Vec<u8>]) -> BootParams<'a> {
    BootParams {
        format: b.format,
        image: kernel,
        load_addr: b.load_addr,
        entry: b.entry,
        cmdline: &b.cmdline,
        modules: mods
            .iter()
            .zip(&b.modules)
            .map(|(d, m)| Module {
                data: d,
                cmdline: &m.cmdline,
            })
            .collect(),
    }
}

/// Validate a config without running anything: the XML, every device's class and options,
/// and the guest image (loaded into scratch memory).
pub fn check(cfg: &VmConfig) -> Result<(), LaunchError> {
    let registry = crate::registry();
    let _ = Vm::validate(cfg, &registry, Arc::new(palacios_vmm::host::DryRunHost))?;
    if let Some(b) = &cfg.boot {
        let host = LinuxHost::new(false).with_bundled(crate::bundled_guests());
        let kernel = read(&host, "kernel", &b.kernel)?;
        let mods = b
            .modules
            .iter()
            .map(|m| read(&host, "module", &m.path))
            .collect::<Result<Vec<_>, _>>()?;
        let map = palacios_vmm::MemoryMap::pc(cfg.mem_mib << 20);
        let mem = map
            .create_memory()
            .map_err(|e| LaunchError::Vm(format!("cannot allocate guest memory: {e}")))?;
        let params = boot_params(b, &kernel, &mods);
        palacios_boot::load(&mem, &map, &params)
            .map_err(|e| LaunchError::Config(format!("cannot load {}: {e}", b.kernel.display())))?;
    }
    Ok(())
}

/// Run a prepared VM to its end; `on_start` receives the control handle (for signal handling).
pub fn run(p: Prepared, stats: bool, on_start: impl FnOnce(VmHandle)) -> RunReport {
    let mut vm = p.vm;
    vm.enable_telemetry(stats);
    on_start(vm.handle());
    vm.run()
}
