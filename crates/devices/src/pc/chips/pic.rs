//! Intel 8259A programmable interrupt controller, modelled as the cascaded
//! master/slave pair of a PC together with the PIIX edge/level control
//! registers (ELCR).
//!
//! Wiring (fixed, as on a PC/AT):
//! * master: ports 0x20 (command) / 0x21 (data), ISA IRQ 0-7;
//! * slave: ports 0xa0 / 0xa1, ISA IRQ 8-15, its INT output drives master IR2;
//! * ELCR: 0x4d0 (IRQ 0-7) and 0x4d1 (IRQ 8-15). Bits for IRQ 0, 1, 2, 8 and
//!   13 are hardwired to 0 (edge), as on the PIIX.
//!
//! Power-on state (the datasheet leaves it undefined; this model picks a
//! quiescent one): both chips are *uninitialised but idle*: IMR = 0xff (all
//! masked, so nothing is delivered until the guest or BIOS programs the chip),
//! IRR = ISR = 0, vector base 0, IR7 lowest priority, cascade mode with the
//! master's ICW3 = 0x04 and the slave ID = 2, no AEOI, no SFNM, OCW3 reads the
//! IRR. Data-port writes are OCW1 (IMR) until an ICW1 is written.
//!
//! Triggering: an input is level-triggered when LTIM was set in ICW1 or its
//! ELCR bit is set; its IRR bit then simply follows the line. Otherwise it is
//! edge-triggered: a rising edge latches the IRR bit, which stays set until
//! the request is acknowledged (or ICW1 resets the edge-sense logic), even if
//! the line drops again. This deliberately differs from the datasheet (which
//! also drops an edge request whose line falls before INTA) so that devices
//! may signal an interrupt as a short pulse (`set_irq(n, true)` then
//! `set_irq(n, false)`). A request can still vanish before INTA (a level line
//! dropping, or the guest masking it), in which case [`PicPair::acknowledge`]
//! returns the spurious vector exactly like the hardware's default IR7.

/// Master input the slave's INT output is wired to.
const CASCADE_IRQ: u8 = 2;
/// ELCR bits that can be written on the master (IRQ 0, 1, 2 are read-only 0).
const ELCR_MASTER_WRITABLE: u8 = 0xf8;
/// ELCR bits that can be written on the slave (IRQ 8 and 13 are read-only 0).
const ELCR_SLAVE_WRITABLE: u8 = 0xde;

use serde::{Deserialize, Serialize};

/// Position in the ICW initialisation sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum InitStep {
    /// Initialised (or never initialised): data port writes are OCW1.
    Ready,
    /// ICW1 seen; next data write is ICW2.
    Icw2,
    /// Next data write is ICW3 (cascade mode only).
    Icw3,
    /// Next data write is ICW4 (only when ICW1 had IC4 set).
    Icw4,
}

/// One 8259A chip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Chip {
    /// True for the master (the chip whose inputs may be slave inputs).
    is_master: bool,
    /// Current level of the eight IR input lines.
    lines: u8,
    /// Edge-sense latches: requests from rising edges on edge-triggered inputs.
    edge_latch: u8,
    /// In-service register.
    isr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// Edge/level control register (1 = level).
    elcr: u8,
    /// Vector base from ICW2 (low three bits always zero).
    base: u8,
    /// Input with the lowest priority; the next one (mod 8) has the highest.
    lowest: u8,
    step: InitStep,
    /// ICW1 IC4: an ICW4 follows.
    want_icw4: bool,
    /// ICW1 SNGL: no cascading, ICW3 skipped.
    single: bool,
    /// ICW1 LTIM: all inputs level-triggered.
    ltim: bool,
    /// ICW3: slave inputs (master) or slave ID (slave).
    icw3: u8,
    /// ICW4 AEOI: automatic end of interrupt.
    aeoi: bool,
    /// ICW4 SFNM: special fully nested mode.
    sfnm: bool,
    /// OCW2 "rotate in automatic EOI mode".
    rotate_aeoi: bool,
    /// OCW3: command-port reads return ISR instead of IRR.
    read_isr: bool,
    /// OCW3 special mask mode.
    special_mask: bool,
    /// OCW3 poll command issued: the next read is a poll.
    poll: bool,
}

impl Chip {
    /// Power-on state (see the module documentation).
    fn new(is_master: bool) -> Self {
        Chip {
            is_master,
            lines: 0,
            edge_latch: 0,
            isr: 0,
            imr: 0xff,
            elcr: 0,
            base: 0,
            lowest: 7,
            step: InitStep::Ready,
            want_icw4: false,
            single: false,
            ltim: false,
            icw3: if is_master {
                1 << CASCADE_IRQ
            } else {
                CASCADE_IRQ
            },
            aeoi: false,
            sfnm: false,
            rotate_aeoi: false,
            read_isr: false,
            special_mask: false,
            poll: false,
        }
    }

    /// Inputs that are currently level-triggered.
    fn level_mask(&self) -> u8 {
        if self.ltim { 0xff } else { self.elcr }
    }

    /// Interrupt request register as seen by the priority resolver.
    fn irr(&self) -> u8 {
        let level = self.level_mask();
        (self.edge_latch & !level) | (self.lines & level)
    }

    /// Drives input line `bit` (0..=7) to `level`.
    fn set_line(&mut self, bit: u8, level: bool) {
        let m = 1u8 << (bit & 7);
        let was_high = self.lines & m != 0;
        if level {
            self.lines |= m;
            if !was_high && self.level_mask() & m == 0 {
                self.edge_latch |= m;
            }
        } else {
            self.lines &= !m;
        }
    }

    /// Priority rank of `irq`: 0 is the highest, 7 the lowest.
    fn rank(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.lowest).wrapping_sub(1) & 7
    }

    /// Highest-priority input among the set bits of `bits`.
    fn highest(&self, bits: u8) -> Option<u8> {
        (1..=8u8)
            .map(|k| self.lowest.wrapping_add(k) & 7)
            .find(|&irq| bits & (1 << irq) != 0)
    }

    /// True when input `irq` of the master is programmed as a slave input.
    fn is_slave_input(&self, irq: u8) -> bool {
        self.is_master && !self.single && self.icw3 & (1 << (irq & 7)) != 0
    }

    /// The request that would be signalled on INT right now, if any: the
    /// highest-priority unmasked request with strictly higher priority than
    /// the highest in-service level (masked in-service levels are ignored in
    /// special mask mode; in SFNM a slave input may nest on itself).
    fn pending(&self) -> Option<u8> {
        let best = self.highest(self.irr() & !self.imr)?;
        let mut blocking = self.isr;
        if self.special_mask {
            blocking &= !self.imr;
        }
        match self.highest(blocking) {
            None => Some(best),
            Some(top) if self.rank(best) < self.rank(top) => Some(best),
            Some(top) if top == best && self.sfnm && self.is_slave_input(best) => Some(best),
            _ => None,
        }
    }

    /// Acknowledges request `irq` (INTA or poll): clears the edge latch and
    /// sets the ISR bit, or with AEOI leaves ISR clear (rotating if enabled).
    fn ack(&mut self, irq: u8) {
        let m = 1u8 << (irq & 7);
        self.edge_latch &= !m;
        if self.aeoi {
            if self.rotate_aeoi {
                self.lowest = irq & 7;
            }
        } else {
            self.isr |= m;
        }
    }

    /// Poll read: acknowledges the pending request and reports it.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.pending() {
            Some(irq) => {
                self.ack(irq);
                0x80 | irq
            }
            None => 0,
        }
    }

    /// The level a non-specific EOI clears: highest-priority in-service level
    /// (in special mask mode, masked levels are left alone).
    fn eoi_target(&self) -> Option<u8> {
        let mut bits = self.isr;
        if self.special_mask {
            bits &= !self.imr;
        }
        self.highest(bits)
    }

    /// Read of the command port (A0 = 0).
    fn read_command(&mut self) -> u8 {
        if self.poll {
            self.poll_read()
        } else if self.read_isr {
            self.isr
        } else {
            self.irr()
        }
    }

    /// Read of the data port (A0 = 1).
    fn read_data(&mut self) -> u8 {
        if self.poll {
            self.poll_read()
        } else {
            self.imr
        }
    }

    /// Write to the command port: ICW1, OCW2 or OCW3.
    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            self.icw1(v);
        } else if v & 0x08 != 0 {
            self.ocw3(v);
        } else {
            self.ocw2(v);
        }
    }

    /// ICW1: starts initialisation and resets the chip's state.
    fn icw1(&mut self, v: u8) {
        self.want_icw4 = v & 0x01 != 0;
        self.single = v & 0x02 != 0;
        self.ltim = v & 0x08 != 0;
        // Edge-sense circuits reset: an edge input needs a new low-to-high
        // transition. ISR is cleared too so a re-initialisation starts clean.
        self.edge_latch = 0;
        self.isr = 0;
        self.imr = 0;
        self.lowest = 7;
        self.aeoi = false;
        self.sfnm = false;
        self.rotate_aeoi = false;
        self.read_isr = false;
        self.special_mask = false;
        self.poll = false;
        self.step = InitStep::Icw2;
    }

    /// OCW2: EOI and priority rotation commands.
    fn ocw2(&mut self, v: u8) {
        let level = v & 7;
        match v >> 5 {
            0b001 => {
                if let Some(irq) = self.eoi_target() {
                    self.isr &= !(1 << irq);
                }
            }
            0b011 => self.isr &= !(1 << level),
            0b101 => {
                if let Some(irq) = self.eoi_target() {
                    self.isr &= !(1 << irq);
                    self.lowest = irq;
                }
            }
            0b100 => self.rotate_aeoi = true,
            0b000 => self.rotate_aeoi = false,
            0b111 => {
                self.isr &= !(1 << level);
                self.lowest = level;
            }
            0b110 => self.lowest = level,
            _ => {} // 0b010: no operation
        }
    }

    /// OCW3: register read select, poll, special mask mode.
    fn ocw3(&mut self, v: u8) {
        if v & 0x40 != 0 {
            self.special_mask = v & 0x20 != 0;
        }
        if v & 0x02 != 0 {
            self.read_isr = v & 0x01 != 0;
        }
        if v & 0x04 != 0 {
            self.poll = true;
        }
    }

    /// Write to the data port: ICW2-4 during initialisation, else OCW1.
    fn write_data(&mut self, v: u8) {
        match self.step {
            InitStep::Ready => self.imr = v,
            InitStep::Icw2 => {
                self.base = v & 0xf8;
                self.step = if !self.single {
                    InitStep::Icw3
                } else if self.want_icw4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw3 => {
                self.icw3 = v;
                self.step = if self.want_icw4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw4 => {
                // Bit 0 (uPM) is assumed 8086 mode; bits 2-3 (buffered mode)
                // have no effect on a PC.
                self.aeoi = v & 0x02 != 0;
                self.sfnm = v & 0x10 != 0;
                self.step = InitStep::Ready;
            }
        }
    }
}

/// The PC's cascaded 8259A pair plus the ELCR registers. Its serde form is the checkpoint
/// state; check a deserialized value with [`PicPair::check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicPair {
    master: Chip,
    slave: Chip,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// Power-on state: both chips uninitialised with every input masked
    /// (IMR = 0xff), all inputs edge-triggered (ELCR = 0). See the module
    /// documentation for details.
    pub fn new() -> Self {
        PicPair {
            master: Chip::new(true),
            slave: Chip::new(false),
        }
    }

    /// Propagates the slave's INT output to master input IR2.
    fn sync_cascade(&mut self) {
        let out = self.slave.pending().is_some();
        self.master.set_line(CASCADE_IRQ, out);
    }

    /// Sets the level of ISA interrupt line `irq` (0..=15). Lines above 15
    /// are ignored, as is IRQ 2: that master input is wired to the slave.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => {}
            0..=7 => self.master.set_line(irq, level),
            8..=15 => {
                self.slave.set_line(irq - 8, level);
                self.sync_cascade();
            }
            _ => {}
        }
    }

    /// Level of the master's INT pin: true when some unmasked request has a
    /// higher priority than every level in service (including requests that
    /// reach the master through the slave on IR2).
    pub fn output(&self) -> bool {
        self.master.pending().is_some()
    }

    /// Performs an interrupt acknowledge cycle and returns the vector.
    ///
    /// The winning request moves from IRR to ISR (ISR is left alone in AEOI
    /// mode). If the master's winner is its slave input IR2, the slave
    /// supplies the vector. When the request went away before INTA the
    /// hardware's default IR7 is reported: the master's `base + 7` with no
    /// ISR bit set, or, if the master did see IR2 but the slave has nothing,
    /// the slave's `base + 7` (IRQ15) with the master's ISR bit 2 set.
    pub fn acknowledge(&mut self) -> u8 {
        let Some(irq) = self.master.pending() else {
            return self.master.base | 7;
        };
        self.master.ack(irq);
        let vector = if irq == CASCADE_IRQ && self.master.is_slave_input(irq) {
            let v = match self.slave.pending() {
                Some(s) => {
                    self.slave.ack(s);
                    self.slave.base | s
                }
                None => self.slave.base | 7,
            };
            // The slave's INT is released during INTA; if it is still
            // requesting afterwards that is a fresh edge on IR2.
            self.master.set_line(CASCADE_IRQ, false);
            v
        } else {
            self.master.base | irq
        };
        self.sync_cascade();
        vector
    }

    /// Reads an I/O port. Ports other than 0x20, 0x21, 0xa0, 0xa1, 0x4d0 and
    /// 0x4d1 read as 0xff. A read after an OCW3 poll command is a poll.
    pub fn read(&mut self, port: u16) -> u8 {
        let v = match port {
            0x20 => self.master.read_command(),
            0x21 => self.master.read_data(),
            0xa0 | 0xa1 => {
                let was_poll = self.slave.poll;
                let v = if port == 0xa0 {
                    self.slave.read_command()
                } else {
                    self.slave.read_data()
                };
                if was_poll {
                    // A poll read is an acknowledge for the slave.
                    self.master.set_line(CASCADE_IRQ, false);
                }
                v
            }
            0x4d0 => self.master.elcr,
            0x4d1 => self.slave.elcr,
            _ => return 0xff,
        };
        self.sync_cascade();
        v
    }

    /// Writes an I/O port; writes to unknown ports are ignored.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            0x20 => self.master.write_command(value),
            0x21 => self.master.write_data(value),
            0xa0 => self.slave.write_command(value),
            0xa1 => self.slave.write_data(value),
            0x4d0 => self.master.elcr = value & ELCR_MASTER_WRITABLE,
            0x4d1 => self.slave.elcr = value & ELCR_SLAVE_WRITABLE,
            _ => return,
        }
        self.sync_cascade();
    }

    /// Refuses a state the chips cannot be in (a restored checkpoint).
    pub fn check(&self) -> Result<(), String> {
        for (c, name, master, writable) in [
            (&self.master, "master", true, ELCR_MASTER_WRITABLE),
            (&self.slave, "slave", false, ELCR_SLAVE_WRITABLE),
        ] {
            if c.is_master != master {
                return Err(format!("PIC {name}: is_master must be {master}"));
            }
            if c.elcr & !writable != 0 {
                return Err(format!(
                    "PIC {name}: ELCR {:#04x} sets read-only bits",
                    c.elcr
                ));
            }
            if c.base & 7 != 0 {
                return Err(format!(
                    "PIC {name}: vector base {:#04x} is not a multiple of 8",
                    c.base
                ));
            }
            if c.lowest > 7 {
                return Err(format!("PIC {name}: lowest priority {} > 7", c.lowest));
            }
        }
        Ok(())
    }

    /// Edge/level control for IRQ 0-15 (bit n = IRQ n is level-triggered).
    pub fn elcr(&self) -> u16 {
        u16::from(self.master.elcr) | (u16::from(self.slave.elcr) << 8)
    }
}

#[cfg(test)]
mod tests;
