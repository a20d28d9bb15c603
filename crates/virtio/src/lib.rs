//! virtio 1.x over PCI for Palacios-rs: the transitional PCI transport ([`transport`]) with
//! rust-vmm's virtio-queue for the split rings, and the device types: block ([`blk`]),
//! entropy ([`rng`]), console ([`console`]), network ([`net`]) and memory balloon
//! ([`balloon`]). The Palacios device classes (`LNX_VIRTIO_*`) that put them in a VM are in
//! [`classes`].

pub mod balloon;
pub mod blk;
pub mod blk_req;
pub mod classes;
pub mod console;
pub mod device;
pub mod net;
pub mod rng;
pub mod tap;
pub mod transport;

pub use device::VirtioDevice;
pub use transport::VirtioPci;
