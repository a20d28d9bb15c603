//! `PC_TESTDEV`: QEMU's pc-testdev, so that test kernels written for QEMU run unchanged: 0xE0
//! 32-bit scratch, 0xE4 flush-page (accepted, no effect: guest RAM is ordinary memory), one byte
//! per ISA IRQ line at 0x2000-0x2017 setting its level, and 64 KiB of MMIO scratch at 0xFF000000.

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::IrqLine;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::chips::testdev::TestDev;

pub const MMIO_BASE: u64 = 0xff00_0000;

pub struct TestDevClass;

impl DeviceClass for TestDevClass {
    fn name(&self) -> &'static str {
        "PC_TESTDEV"
    }
    fn help(&self) -> &'static str {
        "QEMU pc-testdev: 0xe0 scratch, 0xe4 flush-page, 0x2000-0x2017 IRQ line levels, 64 KiB MMIO scratch at 0xff000000"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let lines = (0..24).map(|n| ctx.irq_line(n)).collect();
        let d = Arc::new(Mutex::new(TestDevice {
            dev: TestDev::new(),
            lines,
        }));
        let (d1, d2) = (d.clone(), d.clone());
        ctx.register_state(state_fn(
            1,
            move || lock(&d1).dev.clone(),
            move |t: TestDev| {
                t.check()?;
                // The lines are not driven again: their levels are restored with the interrupt
                // controllers (and the IRQ router), and driving one here would be a no-op, or
                // an edge on a line another device drove last.
                lock(&d2).dev = t;
                Ok(())
            },
        ));
        ctx.add_ports(0xe0, 8, &dev.id, d.clone())
            .map_err(|e| dev.node.err(e.msg))?;
        ctx.add_ports(0x2000, 24, &dev.id, d.clone())
            .map_err(|e| dev.node.err(e.msg))?;
        ctx.add_mmio(MMIO_BASE, 0x1_0000, &dev.id, d)
            .map_err(|e| dev.node.err(e.msg))
    }
}

fn lock(d: &Mutex<TestDevice>) -> std::sync::MutexGuard<'_, TestDevice> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

struct TestDevice {
    dev: TestDev,
    lines: Vec<Arc<dyn IrqLine>>,
}

impl BusDevice for TestDevice {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let v = if addr >= MMIO_BASE {
            self.dev.mmio_read(addr - MMIO_BASE, data.len())
        } else {
            self.dev.io_read(addr as u16, data.len())
        };
        let b = v.to_le_bytes();
        data.copy_from_slice(&b[..data.len().min(8)]);
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        let v = super::le_value(data);
        if addr >= MMIO_BASE {
            self.dev.mmio_write(addr - MMIO_BASE, v, data.len());
            return;
        }
        for (irq, level) in self.dev.io_write(addr as u16, v, data.len()) {
            if let Some(l) = self.lines.get(usize::from(irq)) {
                l.set_level(level);
            }
        }
    }
}
