//! Palacios-rs as a library: compose a VM from a config (or the standard PC platform), load a
//! guest and run it. The `v3` binary is a thin command line over this crate.

pub mod concord_api;
pub mod concord_cli;
pub mod control_api;
pub mod gears_api;
pub mod gears_cli;
pub mod launch;
pub mod platform;
pub mod progress;
pub mod sched_api;
pub mod session;
pub mod status;
pub mod sym_api;

pub use palacios_boot as boot;
pub use palacios_devices as devices;
pub use palacios_kvm as kvm;
pub use palacios_vmm as vmm;

/// The guests built with this `v3` (from guests/, by build.rs) and compiled into it, by file
/// name; configs and `--kernel` name them as `guest:NAME`. Empty where gcc/as/ld were missing
/// when `v3` was compiled.
pub fn bundled_guests() -> palacios_vmm::host::Bundled {
    #[cfg(palacios_demo)]
    {
        macro_rules! guests {
            ($($name:literal),* $(,)?) => {
                &[$(($name, include_bytes!(concat!(env!("PALACIOS_GUEST_DIR"), "/", $name)))),*]
            };
        }
        guests!(
            "demo.elf",
            "mbtest.elf",
            "pctest.elf",
            "elf64test.elf",
            "emubench.elf",
            "emubench64.elf",
            "flat16.bin",
            "mbaout.bin",
            "countdown.elf",
            "dirtier.elf",
            "concord.elf",
            "virtio.elf",
        )
    }
    #[cfg(not(palacios_demo))]
    {
        &[]
    }
}

/// The bundled demo guest (a Multiboot kernel built from guests/demo), if it could be built.
pub fn demo_guest() -> Option<&'static [u8]> {
    bundled_guests()
        .iter()
        .find(|(n, _)| *n == "demo.elf")
        .map(|(_, d)| *d)
}

/// Every device class compiled into `v3`: the PC platform's and the virtio devices with their
/// disk backends.
pub fn registry() -> palacios_vmm::Registry {
    let mut r = palacios_devices::registry();
    palacios_virtio::classes::register_all(&mut r);
    palacios_gears::register(&mut r);
    palacios_concord::register(&mut r);
    r
}
