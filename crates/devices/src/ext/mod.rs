//! Extensions shipped with Palacios-rs, registered under their Palacios names. Each is behind
//! a Cargo feature (on by default).

#[cfg(feature = "ext-inspector")]
pub mod inspector;
#[cfg(feature = "ext-mtrrs")]
pub mod mtrrs;
#[cfg(feature = "ext-vmware")]
pub mod vmware;
