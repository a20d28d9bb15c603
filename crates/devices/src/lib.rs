//! Device classes, registered under their Palacios names. Each is behind a Cargo feature of the
//! same name (all on by default).

pub mod ext;
pub mod pc;

use palacios_vmm::Registry;

/// Register every device class compiled in.
#[allow(unused_variables)]
pub fn register_all(r: &mut Registry) {
    #[cfg(feature = "serial")]
    r.register(Box::new(pc::serial::SerialClass));
    #[cfg(feature = "char-stream")]
    r.register(Box::new(pc::char_stream::CharStreamClass));
    #[cfg(feature = "bochs-debug")]
    r.register(Box::new(pc::bochs_debug::BochsDebugClass));
    #[cfg(feature = "os-debug")]
    r.register(Box::new(pc::os_debug::OsDebugClass));
    #[cfg(feature = "generic")]
    r.register(Box::new(pc::generic::GenericClass));
    #[cfg(feature = "debug-exit")]
    r.register(Box::new(pc::debug_exit::DebugExitClass));
    #[cfg(feature = "pic")]
    r.register(Box::new(pc::pic_dev::PicClass));
    #[cfg(feature = "pit")]
    r.register(Box::new(pc::pit_dev::PitClass));
    #[cfg(feature = "apic")]
    r.register(Box::new(pc::apic_dev::LapicClass));
    #[cfg(feature = "apic")]
    r.register(Box::new(pc::ioapic_dev::IoapicClass));
    #[cfg(feature = "nvram")]
    r.register(Box::new(pc::nvram_dev::NvramClass));
    #[cfg(feature = "keyboard")]
    r.register(Box::new(pc::keyboard_dev::KeyboardClass));
    #[cfg(feature = "fw-cfg")]
    r.register(Box::new(pc::fw_cfg_dev::FwCfgClass));
    #[cfg(feature = "testdev")]
    r.register(Box::new(pc::testdev_dev::TestDevClass));
    #[cfg(feature = "mptable")]
    r.register(Box::new(pc::mptable_dev::MpTableClass));
    #[cfg(feature = "pm-timer")]
    r.register(Box::new(pc::pm_timer_dev::PmTimerClass));
    #[cfg(feature = "acpi")]
    r.register(Box::new(pc::acpi_dev::AcpiClass));
    #[cfg(feature = "pci")]
    {
        r.register(Box::new(pc::pci_dev::PciClass));
        r.register(Box::new(pc::pci_dev::I440fxClass));
        r.register(Box::new(pc::pci_dev::Piix3Class));
    }
}

/// Register every extension class compiled in.
#[allow(unused_variables)]
pub fn register_extensions(r: &mut Registry) {
    #[cfg(feature = "ext-mtrrs")]
    r.register_extension(Box::new(ext::mtrrs::MtrrsClass));
    #[cfg(feature = "ext-vmware")]
    r.register_extension(Box::new(ext::vmware::VmwareClass));
    #[cfg(feature = "ext-inspector")]
    r.register_extension(Box::new(ext::inspector::InspectorClass));
}

/// A registry holding every compiled-in class.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    register_all(&mut r);
    register_extensions(&mut r);
    r
}
