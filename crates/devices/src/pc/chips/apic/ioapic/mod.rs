//! An 82093AA-style I/O APIC with 24 redirection entries.
//!
//! Memory map (relative to the base, normally `0xFEC00000`): IOREGSEL at
//! 0x00 selects an indirect register, IOWIN at 0x10 reads/writes it. Other
//! offsets read 0 and ignore writes.
//!
//! Indirect registers:
//!
//! | index | register |
//! |-------|----------|
//! | 0x00  | ID (bits 24-27, read/write) |
//! | 0x01  | version `0x0017_0011` (24 entries, version 0x11), read-only |
//! | 0x02  | arbitration ID (bits 24-27), read-only; loaded from the ID on ID writes |
//! | 0x10 + 2n, 0x11 + 2n | redirection entry *n*, low and high halves |
//!
//! Delivery is instantaneous, so the delivery-status bit always reads 0.
//! Remote IRR is set when a level-triggered fixed/lowest-priority message
//! is sent and cleared by a matching [`Ioapic::eoi`] or by reprogramming
//! the entry to edge trigger (which Linux relies on for version 0x11
//! parts). NMI, SMI, INIT and ExtINT entries are always edge-sensitive.

#[cfg(test)]
mod tests;

use crate::pc::chips::apic::msg::{DeliveryMode, Interrupt, Shorthand};
use serde::{Deserialize, Serialize};

/// Default guest-physical base of the I/O APIC.
pub const DEFAULT_BASE: u64 = 0xfec0_0000;
/// Number of redirection entries (input pins).
pub const PINS: usize = 24;
/// Version register: max redirection entry 23, version 0x11.
pub const VERSION: u32 = 0x0017_0011;
/// MMIO offset of IOREGSEL.
pub const IOREGSEL: u64 = 0x00;
/// MMIO offset of IOWIN.
pub const IOWIN: u64 = 0x10;

/// Redirection entry: mask bit.
pub const RTE_MASKED: u64 = 1 << 16;
/// Redirection entry: trigger mode level.
pub const RTE_LEVEL: u64 = 1 << 15;
/// Redirection entry: remote IRR (read-only).
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Redirection entry: polarity active low.
pub const RTE_ACTIVE_LOW: u64 = 1 << 13;
/// Redirection entry: logical destination mode.
pub const RTE_LOGICAL: u64 = 1 << 11;
/// Writable bits of a redirection entry: vector, delivery mode, destination
/// mode, polarity, trigger mode, mask, destination (bits 56-63).
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An I/O APIC. Its serde form is the checkpoint state; check a deserialized value with
/// [`Ioapic::check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ioapic {
    id: u8,
    arb_id: u8,
    regsel: u8,
    redir: [u64; PINS],
    /// Electrical level of each input pin.
    lines: [bool; PINS],
}

impl Ioapic {
    /// An I/O APIC after reset: every redirection entry masked (other
    /// fields 0), IOREGSEL 0. The ID register holds 4 bits: `id & 0x0f`.
    pub fn new(id: u8) -> Self {
        Self {
            id: id & 0x0f,
            arb_id: id & 0x0f,
            regsel: 0,
            redir: [RTE_MASKED; PINS],
            lines: [false; PINS],
        }
    }

    /// Resets the registers (pin levels are external and kept).
    pub fn reset(&mut self) {
        self.regsel = 0;
        self.arb_id = self.id;
        self.redir = [RTE_MASKED; PINS];
    }

    /// Refuses a state the I/O APIC cannot be in (a restored checkpoint).
    pub fn check(&self) -> Result<(), String> {
        if self.id > 0x0f || self.arb_id > 0x0f {
            return Err(format!(
                "IOAPIC: ID {:#x} / arbitration ID {:#x} wider than 4 bits",
                self.id, self.arb_id
            ));
        }
        for (pin, &e) in self.redir.iter().enumerate() {
            if e & !(RTE_WRITABLE | RTE_REMOTE_IRR) != 0 {
                return Err(format!(
                    "IOAPIC: redirection entry {pin} {e:#x} sets reserved bits"
                ));
            }
        }
        Ok(())
    }

    /// The I/O APIC ID (4 bits).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Redirection entry of `pin` (64 bits, as the guest reads it), or
    /// `None` for an out-of-range pin.
    pub fn entry(&self, pin: u32) -> Option<u64> {
        self.redir.get(pin as usize).copied()
    }

    /// Electrical level last reported for `pin`.
    pub fn line(&self, pin: u32) -> bool {
        self.lines.get(pin as usize).copied().unwrap_or(false)
    }

    /// 32-bit read at `offset` from the base: IOREGSEL or IOWIN; anything
    /// else reads 0.
    pub fn mmio_read(&mut self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => self.regsel as u32,
            IOWIN => self.read_indirect(self.regsel),
            _ => 0,
        }
    }

    /// 32-bit write at `offset`: IOREGSEL (bits 0-7 kept) or IOWIN. Writes
    /// to a redirection entry may deliver an interrupt (unmasking an
    /// asserted level-triggered pin, or clearing its remote IRR).
    pub fn mmio_write(&mut self, offset: u64, v: u32) -> Vec<Interrupt> {
        match offset {
            IOREGSEL => {
                self.regsel = v as u8;
                Vec::new()
            }
            IOWIN => self.write_indirect(self.regsel, v),
            _ => Vec::new(),
        }
    }

    fn read_indirect(&self, index: u8) -> u32 {
        match index {
            0x00 => (self.id as u32) << 24,
            0x01 => VERSION,
            0x02 => (self.arb_id as u32) << 24,
            0x10..=0x3f => {
                let e = self.redir[((index - 0x10) / 2) as usize];
                if index & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_indirect(&mut self, index: u8, v: u32) -> Vec<Interrupt> {
        match index {
            0x00 => {
                self.id = ((v >> 24) & 0x0f) as u8;
                self.arb_id = self.id;
                Vec::new()
            }
            0x10..=0x3f => {
                let pin = ((index - 0x10) / 2) as usize;
                let old = self.redir[pin];
                let merged = if index & 1 == 0 {
                    (old & !0xffff_ffff) | v as u64
                } else {
                    (old & 0xffff_ffff) | ((v as u64) << 32)
                };
                let mut new = (merged & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                if new & RTE_LEVEL == 0 {
                    new &= !RTE_REMOTE_IRR;
                }
                self.redir[pin] = new;
                self.level_check(pin).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Whether `pin` is asserted, taking polarity into account.
    fn asserted(&self, pin: usize) -> bool {
        self.lines[pin] != (self.redir[pin] & RTE_ACTIVE_LOW != 0)
    }

    /// Whether `pin` is level-sensitive: level trigger mode with a fixed or
    /// lowest-priority delivery mode.
    fn is_level(&self, pin: usize) -> bool {
        let e = self.redir[pin];
        e & RTE_LEVEL != 0 && matches!((e >> 8) & 7, 0 | 1)
    }

    /// The message for `pin`'s entry (`None` for the reserved mode 011).
    fn message(&self, pin: usize) -> Option<Interrupt> {
        let e = self.redir[pin];
        let mode = DeliveryMode::from_bits((e >> 8) as u32)?;
        Some(Interrupt {
            vector: e as u8,
            mode,
            dest: (e >> 56) as u32,
            logical: e & RTE_LOGICAL != 0,
            level_triggered: self.is_level(pin),
            assert: true,
            shorthand: Shorthand::None,
            source: self.id as u32,
        })
    }

    /// Delivers a level-sensitive pin if it is unmasked, asserted and its
    /// remote IRR is clear; sets remote IRR.
    fn level_check(&mut self, pin: usize) -> Option<Interrupt> {
        let e = self.redir[pin];
        if !self.is_level(pin) || e & RTE_MASKED != 0 || e & RTE_REMOTE_IRR != 0 {
            return None;
        }
        if !self.asserted(pin) {
            return None;
        }
        let m = self.message(pin)?;
        self.redir[pin] |= RTE_REMOTE_IRR;
        Some(m)
    }

    /// Sets the electrical level of input `pin` (out-of-range pins are
    /// ignored).
    ///
    /// * Edge-sensitive entries deliver on the rising edge of the
    ///   polarity-adjusted level if unmasked; edges on masked pins are lost.
    /// * Level-sensitive entries deliver while asserted, unmasked and remote
    ///   IRR is clear, and set remote IRR.
    pub fn set_irq(&mut self, pin: u32, level: bool) -> Vec<Interrupt> {
        let pin = pin as usize;
        if pin >= PINS {
            return Vec::new();
        }
        let was = self.asserted(pin);
        self.lines[pin] = level;
        let now = self.asserted(pin);
        if self.is_level(pin) {
            return self.level_check(pin).into_iter().collect();
        }
        if now && !was && self.redir[pin] & RTE_MASKED == 0 {
            return self.message(pin).into_iter().collect();
        }
        Vec::new()
    }

    /// An EOI for `vector` was broadcast: clears remote IRR of every
    /// level-sensitive entry with that vector, and re-delivers those whose
    /// pin is still asserted (and unmasked).
    pub fn eoi(&mut self, vector: u8) -> Vec<Interrupt> {
        let mut out = Vec::new();
        for pin in 0..PINS {
            let e = self.redir[pin];
            if e as u8 == vector && e & RTE_REMOTE_IRR != 0 {
                self.redir[pin] &= !RTE_REMOTE_IRR;
                out.extend(self.level_check(pin));
            }
        }
        out
    }
}
