//! `MPTABLE`: writes an Intel MP 1.4 floating pointer and configuration table describing the VM
//! (its cores with APIC IDs 0..N-1, the ISA bus, the IOAPIC and ISA interrupt routing) at
//! 0x9FC00, the last KiB of base memory, where guests search for it.

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::{BuildCtx, ConfigError, DeviceClass, DeviceOption};
use vm_memory::{Bytes, GuestAddress};

use super::chips::mptable::{MpConfig, build};

pub const MP_BASE: u32 = 0x9_fc00;

pub struct MpTableClass;

impl DeviceClass for MpTableClass {
    fn name(&self) -> &'static str {
        "MPTABLE"
    }
    fn help(&self) -> &'static str {
        "Intel MP 1.4 tables at 0x9fc00 describing the cores, ISA bus, IOAPIC and IRQ routing"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    // The tables are written into guest memory at build (saved with the memory); the device
    // has no registers.
    fn stateless(&self) -> bool {
        true
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let cfg = MpConfig {
            cpus: ctx.cores,
            ioapic_id: ctx.cores.min(15) as u8,
            ioapic_addr: 0xfec0_0000,
            lapic_addr: 0xfee0_0000,
        };
        let bytes = build(&cfg, MP_BASE);
        if !ctx.map.is_backed(u64::from(MP_BASE), bytes.len() as u64) {
            return Err(dev.node.err(format!(
                "the MP table ({} bytes at {MP_BASE:#x}) does not fit in guest RAM",
                bytes.len()
            )));
        }
        ctx.mem
            .write_slice(&bytes, GuestAddress(u64::from(MP_BASE)))
            .map_err(|e| dev.node.err(format!("writing the MP table: {e}")))
    }
}
