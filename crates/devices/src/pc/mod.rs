//! PC platform devices.

#[cfg(feature = "acpi")]
pub mod acpi_dev;
#[cfg(feature = "apic")]
pub mod apic_dev;
#[cfg(feature = "bochs-debug")]
pub mod bochs_debug;
#[cfg(feature = "char-stream")]
pub mod char_stream;
pub mod chips;
#[cfg(feature = "debug-exit")]
pub mod debug_exit;
#[cfg(feature = "fw-cfg")]
pub mod fw_cfg_dev;
#[cfg(feature = "generic")]
pub mod generic;
#[cfg(feature = "apic")]
pub mod ioapic_dev;
pub mod irq_router;
#[cfg(feature = "keyboard")]
pub mod keyboard_dev;
#[cfg(any(feature = "bochs-debug", feature = "os-debug"))]
mod linebuf;
#[cfg(feature = "mptable")]
pub mod mptable_dev;
#[cfg(feature = "nvram")]
pub mod nvram_dev;
#[cfg(feature = "os-debug")]
pub mod os_debug;
#[cfg(feature = "pci")]
pub mod pci_dev;
#[cfg(feature = "pic")]
pub mod pic_dev;
#[cfg(feature = "pit")]
pub mod pit_dev;
#[cfg(feature = "pm-timer")]
pub mod pm_timer_dev;
#[allow(dead_code)]
pub(crate) mod serde_util;
#[cfg(feature = "serial")]
pub mod serial;
#[cfg(feature = "testdev")]
pub mod testdev_dev;

/// Little-endian value of up to 8 bytes.
#[allow(dead_code)]
pub(crate) fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | (u64::from(*b) << (8 * i)))
}
