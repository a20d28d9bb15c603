//! Palacios-rs as a library: compose a VM from a config (or the standard PC platform), load a
//! guest and run it. The `v3` binary is a thin command line over this crate.

pub mod launch;
pub mod platform;
pub mod status;

pub use palacios_boot as boot;
pub use palacios_devices as devices;
pub use palacios_kvm as kvm;
pub use palacios_vmm as vmm;

/// The bundled demo guest (a Multiboot kernel built from guests/demo), if it could be built.
pub fn demo_guest() -> Option<&'static [u8]> {
    #[cfg(palacios_demo)]
    {
        Some(include_bytes!(concat!(
            env!("PALACIOS_GUEST_DIR"),
            "/demo.elf"
        )))
    }
    #[cfg(not(palacios_demo))]
    {
        None
    }
}
