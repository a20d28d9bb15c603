//! Local APIC and I/O APIC models for Palacios-rs.
//!
//! The crate is a set of pure state machines:
//!
//! * [`Lapic`] — one per virtual core: xAPIC (MMIO) and x2APIC (MSR)
//!   register interfaces, priority logic, IPIs, local vector table, timer
//!   (one-shot, periodic, TSC-deadline).
//! * [`Ioapic`] — an 82093AA-style I/O APIC with 24 redirection entries.
//! * [`Interrupt`] — a message on the (virtual) APIC bus, produced by an
//!   I/O APIC pin or an ICR write and consumed by [`Lapic::accept`].
//! * [`bus::deliver`] — an optional helper that routes one message to a set
//!   of local APICs (destination matching, lowest-priority arbitration).
//!
//! Nothing here reads a clock: time is passed in as guest nanoseconds
//! ([`Ns`]) and, for the TSC-deadline timer, as guest TSC values. No guest
//! input (register, value or ordering) can make these models panic or loop
//! without bound, and the crate contains no `unsafe` code.
//!
//! # Example: a level-triggered device interrupt, end to end
//!
//! ```
//! use palacios_devices::pc::chips::apic::{Action, Ioapic, Lapic, bus};
//!
//! let mut cpus = vec![Lapic::new(0, true, 2_000_000_000)];
//! cpus[0].mmio_write(0xf0, 0x1ff, 0); // SVR: software enable
//! let mut io = Ioapic::new(1);
//! // Pin 10: vector 0x41, fixed, physical, level, unmasked, to APIC 0.
//! io.mmio_write(0x00, 0x10 + 2 * 10);
//! io.mmio_write(0x10, 0x0000_8041);
//!
//! for msg in io.set_irq(10, true) {
//!     bus::deliver(&mut cpus, &msg);
//! }
//! assert_eq!(cpus[0].pending_vector(), Some(0x41));
//! cpus[0].acknowledge(0x41);
//! // The handler writes EOI; the level vector's EOI goes to the I/O APIC,
//! // which re-delivers because the line is still high.
//! let acts = cpus[0].mmio_write(0xb0, 0, 0);
//! assert_eq!(acts, vec![Action::Eoi { vector: 0x41 }]);
//! let again = io.eoi(0x41);
//! assert_eq!(again.len(), 1);
//! ```

pub mod bus;
pub mod ioapic;
pub mod lapic;
pub mod msg;

pub use ioapic::Ioapic;
pub use lapic::{Action, Fault, Lapic, LvtSource};
pub use msg::{DeliveryMode, Interrupt, LapicIdent, Shorthand, dest_matches, matches};

/// Guest time in nanoseconds.
pub type Ns = u64;
