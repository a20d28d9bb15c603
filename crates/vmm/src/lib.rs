//! The Palacios-rs core.
//!
//! A VM is composed from a [`config::VmConfig`] (parsed from Palacios-style XML or built in
//! code) by looking device classes up by name in a [`registry::Registry`]. The core owns the
//! guest memory map, the port-I/O and MMIO buses, the per-core exit loop (written once for every
//! [`backend::Backend`]), the control channel and telemetry. It reaches the outside world only
//! through the [`host::Host`] trait.

pub mod backend;
pub mod bus;
pub mod config;
pub mod control;
mod core_loop;
pub mod dirty;
pub mod extension;
pub mod guest_va;
pub mod host;
pub mod hypercall;
pub mod intercept;
pub mod irq;
pub mod memory;
pub mod migrate;
pub mod msr;
pub mod registry;
pub mod sched;
pub mod snapshot;
pub mod state;
pub mod symbiotic;
mod symcall_run;
pub mod telemetry;
pub mod test_support;
pub mod time;
pub mod timer;
pub mod vm;
pub mod write_watch;

pub use backend::{Backend, BackendError, Exit, IoData, Vcpu};
pub use bus::{Bus, BusDevice, BusError};
pub use config::{ConfigError, ConfigNode, VmConfig};
pub use control::{Outcome, VmHandle};
pub use host::{Host, LinuxHost};
pub use memory::{GuestMem, MemoryMap};
pub use registry::{BuildCtx, DeviceClass, DeviceOption, Registry};
pub use vm::{Vm, VmError};
