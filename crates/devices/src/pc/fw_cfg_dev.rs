//! `FW_CFG`: QEMU's fw_cfg I/O interface (selector 0x510, data 0x511). Keys: signature (0x0000,
//! "QEMU"), ID (0x0001), RAM size (0x0003), CPU count (0x0005), max CPUs (0x000f), command line
//! size and data (0x0014, 0x0015), file directory (0x0019). See [`super::chips::fw_cfg`].

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::chips::fw_cfg::FwCfg;

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
        ctx.add_ports(0x510, 2, &dev.id, Arc::new(Mutex::new(FwCfgPorts(fw))))
            .map_err(|e| dev.node.err(e.msg))
    }
}

struct FwCfgPorts(FwCfg);

impl BusDevice for FwCfgPorts {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let v = self.0.read(addr as u16, data.len()).to_le_bytes();
        data.copy_from_slice(&v[..data.len().min(8)]);
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        self.0.write(addr as u16, super::le_value(data), data.len());
    }
}
