//! `PM_TIMER`: the ACPI power-management timer, a 24-bit counter at 3.579545 MHz, at port 0x608
//! (where QEMU's PIIX4 puts it; without ACPI tables a guest must be told the port).

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::time::GuestClock;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

pub struct PmTimerClass;

const OPTIONS: &[DeviceOption] = &[DeviceOption {
    name: "port",
    help: "I/O port (default 0x608)",
}];

impl DeviceClass for PmTimerClass {
    fn name(&self) -> &'static str {
        "PM_TIMER"
    }
    fn help(&self) -> &'static str {
        "ACPI PM timer: 24-bit counter at 3.579545 MHz (default port 0x608)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        OPTIONS
    }
    // The counter is a pure function of guest time (restored by the VM) and writes are
    // ignored.
    fn stateless(&self) -> bool {
        true
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let port = dev.node.num("port")?.unwrap_or(0x608);
        if port > 0xfffc {
            return Err(dev
                .node
                .val_err("port", format!("port {port:#x} is out of range")));
        }
        ctx.add_ports(
            port as u16,
            4,
            &dev.id,
            Arc::new(Mutex::new(PmTimer(ctx.clock.clone()))),
        )
        .map_err(|e| dev.node.err(e.msg))
    }
}

struct PmTimer(Arc<GuestClock>);

impl BusDevice for PmTimer {
    fn read(&mut self, _addr: u64, data: &mut [u8]) {
        let v = super::chips::pm_timer::read(self.0.now()).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v[..n]);
    }
    fn write(&mut self, _addr: u64, _data: &[u8]) {}
}
