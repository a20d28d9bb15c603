//! The standard PC platform that the quick form (`v3 run --kernel ...`) and the demo build.

use std::path::PathBuf;

use palacios_vmm::ConfigNode;
use palacios_vmm::config::{BackendChoice, BootConfig, DeviceConfig, VmConfig};

fn device(class: &str, id: &str) -> DeviceConfig {
    DeviceConfig {
        class: class.into(),
        id: id.into(),
        node: ConfigNode::new("device")
            .with_attr("class", class)
            .with_attr("id", id),
    }
}

/// The devices of the standard PC: the PIC pair, PIT, LAPICs, IOAPIC, MP table, CMOS/RTC,
/// i8042, fw_cfg, pc-testdev, PM timer, ACPI tables and PM1 registers, COM1–COM4 (COM1 on the console), the
/// Bochs and OS debug ports, and the debug-exit port at 0xf4.
pub fn standard_devices() -> Vec<DeviceConfig> {
    vec![
        device("8259A", "pic"),
        device("8254_PIT", "pit"),
        device("LAPIC", "lapic"),
        device("IOAPIC", "ioapic"),
        device("MPTABLE", "mptable"),
        device("NVRAM", "nvram"),
        device("KEYBOARD", "keyboard"),
        device("FW_CFG", "fw_cfg"),
        device("PC_TESTDEV", "pc_testdev"),
        device("PM_TIMER", "pm_timer"),
        device("ACPI", "acpi"),
        device("SERIAL", "serial"),
        device("BOCHS_DEBUG", "bochs_debug"),
        device("OS_DEBUG", "os_debug"),
        device("DEBUG_EXIT", "debug_exit"),
    ]
}

/// A standard PC with `mem_mib` MiB and `cores` cores booting `boot`.
pub fn standard_pc(
    mem_mib: u64,
    cores: u32,
    backend: BackendChoice,
    boot: Option<BootConfig>,
) -> VmConfig {
    VmConfig {
        mem_mib,
        cores,
        backend,
        devices: standard_devices(),
        boot,
        ..Default::default()
    }
}

/// Boot settings for a kernel file.
pub fn boot(kernel: PathBuf) -> BootConfig {
    BootConfig {
        kernel,
        ..Default::default()
    }
}
