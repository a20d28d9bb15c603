//! `FW_CFG`: QEMU's fw_cfg I/O interface (selector 0x510, data 0x511). Keys: signature (0x0000,
//! "QEMU"), ID (0x0001), RAM size (0x0003), CPU count (0x0005), max CPUs (0x000f), command line
//! size and data (0x0014, 0x0015), file directory (0x0019). See [`super::chips::fw_cfg`].

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::chips::fw_cfg::FwCfg;
use serde::{Deserialize, Serialize};

/// The checkpoint state: what the guest selected and how far it has read. The items themselves
/// follow from the configuration (cores, RAM, command line) and are rebuilt with the VM.
#[derive(Serialize, Deserialize)]
struct FwCfgState {
    selected: u16,
    offset: u64,
}

pub struct FwCfgClass;

impl DeviceClass for FwCfgClass {
    fn name(&self) -> &'static str {
        "FW_CFG"
    }
    fn help(&self) -> &'static str {
        "QEMU-compatible fw_cfg (0x510 selector, 0x511 data): signature, CPU count, RAM size, command line"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let fw = FwCfg::new(
            ctx.cores.min(u32::from(u16::MAX)) as u16,
            ctx.map.ram_bytes(),
            &ctx.boot_cmdline,
        );
        let ports = Arc::new(Mutex::new(FwCfgPorts(fw)));
        let (p1, p2) = (ports.clone(), ports.clone());
        ctx.register_state(state_fn(
            1,
            move || {
                let (selected, offset) = lock(&p1).0.selection();
                FwCfgState {
                    selected,
                    offset: offset as u64,
                }
            },
            move |st: FwCfgState| {
                let offset = usize::try_from(st.offset)
                    .map_err(|_| format!("fw_cfg: read offset {} out of range", st.offset))?;
                lock(&p2).0.set_selection(st.selected, offset);
                Ok(())
            },
        ));
        ctx.add_ports(0x510, 2, &dev.id, ports)
            .map_err(|e| dev.node.err(e.msg))
    }
}

struct FwCfgPorts(FwCfg);

fn lock(p: &Mutex<FwCfgPorts>) -> std::sync::MutexGuard<'_, FwCfgPorts> {
    p.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for FwCfgPorts {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let v = self.0.read(addr as u16, data.len()).to_le_bytes();
        data.copy_from_slice(&v[..data.len().min(8)]);
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        self.0.write(addr as u16, super::le_value(data), data.len());
    }
}
