//! A worked example of an extension (README, "Extending Palacios-rs"): `OUT_COUNTER` counts
//! each core's port writes in an `on_exit` hook and answers hypercall 0x7000 with the count.
//!
//!     cargo run --example extension -p v3
//!
//! runs a tiny real-mode guest that writes three ports, asks for the count through the
//! doorbell and leaves through the debug-exit port with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use palacios_vmm::config::{ExtensionConfig, VmConfig};
use palacios_vmm::extension::{CoreCtx, CoreHooks, ExitAction, Extension, ExtensionClass};
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption, Exit, Outcome};

/// Per-VM state: one counter per core.
pub struct OutCounter(Arc<Vec<AtomicU64>>);
/// One core's hooks (they run on that core's thread).
struct CoreCounter(Arc<Vec<AtomicU64>>, usize);

impl CoreHooks for CoreCounter {
    fn on_exit(&mut self, _core: &mut CoreCtx, exit: &Exit) -> ExitAction {
        if let Exit::IoOut { .. } = exit {
            self.0[self.1].fetch_add(1, Ordering::Relaxed);
        }
        ExitAction::Continue // the core handles the write as usual
    }
}

impl Extension for OutCounter {
    fn core(&self, cpu: u32) -> Option<Box<dyn CoreHooks>> {
        Some(Box::new(CoreCounter(self.0.clone(), cpu as usize)))
    }
    fn inspect(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
            .into()
    }
}

pub struct OutCounterClass;

impl ExtensionClass for OutCounterClass {
    fn name(&self) -> &'static str {
        "OUT_COUNTER"
    }
    fn help(&self) -> &'static str {
        "counts port writes per core; hypercall 0x7000 returns the calling core's count"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(
        &self,
        ctx: &mut BuildCtx,
        _cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError> {
        let counts = Arc::new(
            (0..ctx.cores)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>(),
        );
        let c = counts.clone();
        ctx.add_hypercall(0x7000, move |h| {
            let n = c
                .get(h.cpu as usize)
                .map_or(0, |v| v.load(Ordering::Relaxed));
            h.ret(n as i64)
        })?;
        Ok(Arc::new(OutCounter(counts)))
    }
}

/// out 0x80,al (x3); mov eax,0x7000; out 0xec,al (the doorbell); out 0xf4,eax; hlt
pub const GUEST: &[u8] = &[
    0xe6, 0x80, 0xe6, 0x80, 0xe6, 0x80, 0x66, 0xb8, 0x00, 0x70, 0x00, 0x00, 0xe6, 0xec, 0x66, 0xe7,
    0xf4, 0xf4,
];

/// Build a VM with the extension on the emulator, run [`GUEST`], return how it ended.
pub fn run() -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut registry = palacios::registry();
    registry.register_extension(Box::new(OutCounterClass));
    let cfg = VmConfig::parse(
        r#"<vm class="PC"><memory>16</memory>
             <extensions><extension name="OUT_COUNTER"/></extensions>
             <devices><device class="DEBUG_EXIT" id="exit"/></devices></vm>"#,
        std::path::Path::new("."),
    )?;
    let host: Arc<dyn palacios_vmm::Host> = Arc::new(palacios_vmm::LinuxHost::default());
    let backend = Box::new(palacios_emu::EmuBackend::default());
    let mut vm = palacios_vmm::Vm::build(&cfg, &registry, backend, host)?;
    vm_memory::Bytes::write_slice(vm.memory(), GUEST, vm_memory::GuestAddress(0x7c00))?;
    vm.set_boot_state(palacios_x86::CpuState::real_mode_at(0x7c00));
    Ok(vm.run().outcome)
}

#[allow(dead_code)]
fn main() {
    match run() {
        // Three writes and the doorbell's own `out` had been counted when it asked.
        Ok(o) => println!("{o}"),
        Err(e) => {
            eprintln!("extension example: {e}");
            std::process::exit(1);
        }
    }
}
