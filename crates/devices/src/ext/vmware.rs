//! `VMWARE_IFACE`: VMware's hypervisor interface as far as guests use it to learn the time
//! base: CPUID 0x40000000 ("VMwareVMware") and 0x40000010 (TSC and LAPIC timer kHz), and
//! the backdoor port 0x5658 (`in` with EAX = magic: GETVERSION, GETHZ). Linux reads the TSC
//! frequency from it instead of calibrating.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use palacios_vmm::config::ExtensionConfig;
use palacios_vmm::extension::{CoreCtx, CoreHooks, ExitAction, Extension, ExtensionClass};
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption, Exit};

pub const PORT: u16 = 0x5658;
pub const MAGIC: u32 = 0x564d_5868;
pub const CMD_GETVERSION: u32 = 10;
pub const CMD_GETHZ: u32 = 45;
/// The LAPIC timer's input clock (the LAPIC model's bus clock).
const APIC_BUS_HZ: u64 = 1_000_000_000;

pub struct VmwareIface {
    clock: Arc<palacios_vmm::time::GuestClock>,
    calls: Arc<AtomicU64>,
}

impl Extension for VmwareIface {
    fn core(&self, _cpu: u32) -> Option<Box<dyn CoreHooks>> {
        Some(Box::new(Backdoor {
            tsc_hz: self.clock.tsc_hz(),
            calls: self.calls.clone(),
        }))
    }
    fn inspect(&self) -> serde_json::Value {
        serde_json::json!({
            "backdoor_calls": self.calls.load(Ordering::Relaxed),
            "tsc_hz": self.clock.tsc_hz(),
        })
    }
}

struct Backdoor {
    tsc_hz: u64,
    calls: Arc<AtomicU64>,
}

impl CoreHooks for Backdoor {
    fn on_exit(&mut self, core: &mut CoreCtx, exit: &Exit) -> ExitAction {
        let Exit::IoIn { port: PORT, size } = *exit else {
            return ExitAction::Continue;
        };
        let Ok(mut r) = core.vcpu.regs() else {
            return ExitAction::Continue;
        };
        // The answer in EAX comes from the `in` itself; other registers are set after it.
        let (eax, rest) = if r.rax as u32 != MAGIC {
            (u32::MAX, None)
        } else {
            self.calls.fetch_add(1, Ordering::Relaxed);
            match r.rcx as u32 {
                CMD_GETVERSION => (6, Some((u64::from(MAGIC), 2u64))),
                CMD_GETHZ => (self.tsc_hz as u32, Some((self.tsc_hz >> 32, APIC_BUS_HZ))),
                _ => (u32::MAX, None),
            }
        };
        let data = eax.to_le_bytes();
        core.vcpu
            .complete_read(&data[..usize::from(size.clamp(1, 4))]);
        if let Some((ebx, ecx)) = rest {
            // KVM finishes the `in` when the registers are read (EAX then holds the answer).
            if let Ok(now) = core.vcpu.regs() {
                r = now;
            }
            r.rbx = ebx;
            r.rcx = ecx;
            let _ = core.vcpu.set_regs(&r);
        }
        ExitAction::Handled
    }
}

pub struct VmwareClass;

impl ExtensionClass for VmwareClass {
    fn name(&self) -> &'static str {
        "VMWARE_IFACE"
    }
    fn help(&self) -> &'static str {
        "VMware's time interface: CPUID 0x40000000/0x40000010 and the backdoor port 0x5658 (GETVERSION, GETHZ)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(
        &self,
        ctx: &mut BuildCtx,
        _cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError> {
        let sig = |s: &[u8; 4]| u32::from_le_bytes(*s);
        ctx.set_cpuid_leaf(
            0x4000_0000,
            0,
            [0x4000_0010, sig(b"VMwa"), sig(b"reVM"), sig(b"ware")],
        );
        let khz = (ctx.clock.tsc_hz() / 1000) as u32;
        ctx.set_cpuid_leaf(0x4000_0010, 0, [khz, (APIC_BUS_HZ / 1000) as u32, 0, 0]);
        Ok(Arc::new(VmwareIface {
            clock: ctx.clock.clone(),
            calls: Arc::new(AtomicU64::new(0)),
        }))
    }
}
