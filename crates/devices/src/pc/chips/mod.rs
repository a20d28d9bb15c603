//! Pure models of the PC's chips: state machines driven by port/MMIO accesses and guest time,
//! with no knowledge of buses, threads or backends (the device classes around them provide
//! that). Guest-facing and unit-tested on their own.

pub mod apic;
pub mod civil;
pub mod fw_cfg;
pub mod i8042;
pub mod mptable;
pub mod pic;
pub mod pit;
pub mod pm_timer;
pub mod rtc;
pub mod testdev;

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;
