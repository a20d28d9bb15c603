//! Pure models of the PC's chips: state machines driven by port/MMIO accesses and guest time,
//! with no knowledge of buses, threads or backends (the device classes around them provide
//! that). Guest-facing and unit-tested on their own.

pub mod apic;
pub mod pic;
pub mod pit;
