//! Intel 8254 programmable interval timer (ports 0x40-0x43) plus the PC's
//! "system control port B" at 0x61 (channel 2 gate and speaker).
//!
//! The counters are not stepped: every channel records when its counting
//! element was loaded (in guest [`Ns`]) and derives the count and the OUT level
//! from the guest time passed to each call. The count decrements at
//! [`PIT_HZ`]: the number of input clocks in an interval `d` is
//! `floor(d * PIT_HZ / 1e9)`. The count is taken to be loaded at the instant
//! the (last byte of the) count is written; the extra load clock of the real
//! part is not modelled.
//!
//! Channel gates: channels 0 and 1 have their gate tied high, channel 2's gate
//! is bit 0 of port 0x61. Port 0x61 reads back bits 0-3 as written, bit 4 as
//! the DRAM-refresh toggle (flips every 15.085 us of guest time), bit 5 as OUT2
//! and bits 6-7 as 0.
//!
//! Power-on state (undefined in the datasheet; chosen here): every channel is
//! idle in mode 3, binary, lobyte/hibyte access, with no count loaded; OUT is
//! high, the counter reads 0 and nothing ticks until the guest (or BIOS)
//! writes a count. Port 0x61 is 0, so channel 2's gate is low.
//!
//! Simplifications, all documented on the code that implements them:
//! * a count of 1 in modes 2 and 3 (illegal on the 8254) behaves like 2;
//! * in mode 3 a count written while counting takes effect at the end of the
//!   current full period (the chip switches at the end of a half period);
//! * BCD counts with digits above 9 are accepted and counted as their
//!   weighted digit sum; the counter reads back the value modulo 10000.
//!
//! # Lost-tick policy for IRQ 0
//!
//! The VMM drives IRQ 0 with [`Pit::next_irq0`]: it arms a host timer for the
//! returned guest time `T`; when the timer fires at guest time `t >= T` it
//! raises exactly **one** IRQ 0 edge (`set_irq(0, true)` then
//! `set_irq(0, false)` on the PIC) and re-arms with `next_irq0(t)`. Because
//! `next_irq0` returns the first rising edge *strictly after* the time given,
//! every edge that fell in `(T, t]` is dropped: when the VMM is late, missed
//! ticks are coalesced into the single edge it delivers and are never replayed.
//! Edges stay on the grid fixed by the moment the count was loaded, so lateness
//! never accumulates drift: the next deadline is the next grid point. Guests
//! that keep time by counting ticks may fall behind; guests that read the
//! counter, TSC or another clock source (as Linux does) are unaffected.
//! OUT transitions caused directly by a port write (for example a control word
//! forcing OUT high) are not rising edges reported by `next_irq0`; the VMM
//! should simply re-arm after any guest write to ports 0x40-0x43.

use palacios_vmm::time::Ns;
use serde::{Deserialize, Serialize};

/// Input clock of the 8254 on a PC, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

const NS_PER_SEC: u128 = 1_000_000_000;
/// Half period of the port 0x61 bit 4 refresh toggle, in ns.
const REFRESH_NS: u64 = 15_085;

/// Whole PIT clocks in `d` nanoseconds.
fn ticks_in(d: Ns) -> u64 {
    u64::try_from(u128::from(d) * u128::from(PIT_HZ) / NS_PER_SEC).unwrap_or(u64::MAX)
}

/// The shortest time in which `k` whole PIT clocks elapse (inverse of
/// [`ticks_in`]: `ticks_in(ns_for_ticks(k)) == k`).
fn ns_for_ticks(k: u64) -> u128 {
    (u128::from(k) * NS_PER_SEC).div_ceil(u128::from(PIT_HZ))
}

/// Period in clocks of modes 2 and 3 for initial count `n`. A count of 1 is
/// illegal there; it is treated as 2 so the channel stays well-behaved.
fn period(n: u32) -> u64 {
    u64::from(n.max(2))
}

/// Value of a (possibly malformed) BCD word: weighted sum of its digits.
fn bcd_to_bin(v: u16) -> u32 {
    (0..4).fold(0, |acc, i| acc * 10 + u32::from((v >> (12 - 4 * i)) & 0xf))
}

/// BCD encoding of `v % 10000`.
fn bin_to_bcd(v: u64) -> u16 {
    let v = v % 10_000;
    ((v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)) as u16
}

/// Read/write access mode of a channel (control word RW bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Access {
    LoByte,
    HiByte,
    Word,
}

/// One counter of the 8254.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Channel {
    /// Mode bits as written (0-7); reported in the status byte.
    raw_mode: u8,
    /// Effective mode 0-5 (6 and 7 alias 2 and 3).
    mode: u8,
    bcd: bool,
    access: Access,
    gate: bool,
    /// Count register: the last complete count written.
    cr: u16,
    /// A count has been written since the last control word.
    armed: bool,
    /// Null count flag (CR written but not yet moved to the counting element).
    null_count: bool,
    /// Write flip-flop: low byte waiting for its high byte (word access).
    write_lo: Option<u8>,
    /// Read flip-flop for unlatched word reads: next byte is the high one.
    read_hi: bool,
    /// Output latch (counter latch / read-back) and its own byte flip-flop.
    latched_count: Option<u16>,
    latch_hi: bool,
    /// Status latched by a read-back command.
    latched_status: Option<u8>,
    /// The counting element holds a count and the timeline below is valid.
    counting: bool,
    /// Clocks counted before `start` (accumulated across gate pauses).
    base: u64,
    /// Guest time since which clocks are being counted (when `running`).
    start: Ns,
    /// Clocks are currently being counted (gate permits it).
    running: bool,
    /// Initial count of the current cycle, 1..=65536 (10000 in BCD).
    n: u32,
    /// Elapsed clock at which the current cycle began.
    origin: u64,
    /// Modes 2/3: a new count that replaces `n` at elapsed clock `.0`.
    pending: Option<(u64, u32)>,
    /// Counter contents shown while not counting.
    idle_value: u16,
    /// OUT level while not counting.
    idle_out: bool,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            raw_mode: 3,
            mode: 3,
            bcd: false,
            access: Access::Word,
            gate,
            cr: 0,
            armed: false,
            null_count: false,
            write_lo: None,
            read_hi: false,
            latched_count: None,
            latch_hi: false,
            latched_status: None,
            counting: false,
            base: 0,
            start: 0,
            running: false,
            n: 65_536,
            origin: 0,
            pending: None,
            idle_value: 0,
            idle_out: true,
        }
    }

    /// Count modulus: 65536 in binary, 10000 in BCD.
    fn modulus(&self) -> u64 {
        if self.bcd { 10_000 } else { 65_536 }
    }

    /// Initial count represented by count register value `cr` (0 = maximum).
    fn decode(&self, cr: u16) -> u32 {
        let v = if self.bcd {
            bcd_to_bin(cr)
        } else {
            u32::from(cr)
        };
        if v == 0 { self.modulus() as u32 } else { v }
    }

    /// Clocks counted since the counting element was loaded.
    fn elapsed(&self, now: Ns) -> u64 {
        if self.running {
            self.base
                .saturating_add(ticks_in(now.saturating_sub(self.start)))
        } else {
            self.base
        }
    }

    /// Start (in elapsed clocks) and initial count of the cycle in effect at
    /// elapsed clock `e`, taking a not yet applied pending count into account.
    fn cycle_at(&self, e: u64) -> (u64, u32) {
        match self.pending {
            Some((sw, n)) if e >= sw => (sw, n),
            _ => (self.origin, self.n),
        }
    }

    /// Applies a pending count whose switch point has passed.
    fn normalize(&mut self, now: Ns) {
        if let Some((sw, n)) = self.pending
            && self.elapsed(now) >= sw
        {
            self.origin = sw;
            self.n = n;
            self.pending = None;
        }
    }

    /// Contents of the counting element at `now` as the 16-bit image (binary
    /// or BCD) that a read returns.
    fn raw_count(&self, now: Ns) -> u16 {
        if !self.counting {
            return self.idle_value;
        }
        let e = self.elapsed(now);
        let (org, n) = self.cycle_at(e);
        let e = e.saturating_sub(org);
        let p = period(n);
        let n = u64::from(n);
        let v = match self.mode {
            2 => p - e % p,
            3 => {
                // Decrements by two; an odd count first loses 1 (high half)
                // or 3 (low half), giving ceil(p/2) high and floor(p/2) low.
                let high = p.div_ceil(2);
                let ph = e % p;
                let odd = p % 2 == 1;
                if ph < high {
                    if odd && ph > 0 {
                        p + 1 - 2 * ph
                    } else {
                        p - 2 * ph
                    }
                } else {
                    let q = ph - high;
                    if odd && q > 0 {
                        p - 1 - 2 * q
                    } else {
                        p - 2 * q
                    }
                }
            }
            _ => {
                let m = self.modulus();
                (n % m + m - e % m) % m
            }
        };
        if self.bcd { bin_to_bcd(v) } else { v as u16 }
    }

    /// OUT pin level at `now`.
    fn out(&self, now: Ns) -> bool {
        if !self.counting {
            return self.idle_out;
        }
        let e = self.elapsed(now);
        let (org, n) = self.cycle_at(e);
        let e = e.saturating_sub(org);
        let p = period(n);
        let n = u64::from(n);
        match self.mode {
            0 | 1 => e >= n,
            // Gate low forces OUT high in modes 2 and 3.
            2 => !self.gate || e % p != p - 1,
            3 => !self.gate || e % p < p.div_ceil(2),
            _ => e != n,
        }
    }

    /// Null count as reported in the status byte.
    fn null_flag(&self, now: Ns) -> bool {
        self.null_count || matches!(self.pending, Some((sw, _)) if self.elapsed(now) < sw)
    }

    /// Status byte: OUT, null count, RW, mode, BCD.
    fn status(&self, now: Ns) -> u8 {
        let rw = match self.access {
            Access::LoByte => 1,
            Access::HiByte => 2,
            Access::Word => 3,
        };
        u8::from(self.out(now)) << 7
            | u8::from(self.null_flag(now)) << 6
            | rw << 4
            | (self.raw_mode & 7) << 1
            | u8::from(self.bcd)
    }

    /// Time of the first rising edge of OUT strictly after `now`.
    fn next_rise(&self, now: Ns) -> Option<Ns> {
        if !self.counting || !self.running {
            return None;
        }
        let e = self.elapsed(now);
        let target = match self.mode {
            0 | 1 => u64::from(self.n),
            4 | 5 => u64::from(self.n) + 1,
            _ => {
                let (org, n) = self.cycle_at(e);
                let p = period(n);
                let done = e.saturating_sub(org) / p;
                org.checked_add(done.checked_add(1)?.checked_mul(p)?)?
            }
        };
        if target <= e {
            return None;
        }
        let t = u128::from(self.start) + ns_for_ticks(target.checked_sub(self.base)?);
        u64::try_from(t).ok().filter(|&t| t > now)
    }

    /// Freezes the counting element (gate low in modes 0, 2, 3, 4).
    fn pause(&mut self, now: Ns) {
        if self.counting && self.running {
            self.base = self.elapsed(now);
            self.running = false;
        }
    }

    /// Loads `n` into the counting element and starts a new timeline at `now`.
    fn restart(&mut self, now: Ns, n: u32) {
        self.counting = true;
        self.null_count = false;
        self.n = n;
        self.base = 0;
        self.origin = 0;
        self.start = now;
        self.pending = None;
        self.running = self.gate || matches!(self.mode, 1 | 5);
    }

    /// Stops counting, freezing the counter contents and setting OUT to `out`.
    fn stop(&mut self, now: Ns, out: bool) {
        self.normalize(now);
        self.idle_value = self.raw_count(now);
        self.counting = false;
        self.running = false;
        self.pending = None;
        self.idle_out = out;
    }

    /// Gate input change (only channel 2's gate ever changes).
    fn set_gate(&mut self, gate: bool, now: Ns) {
        if gate == self.gate {
            return;
        }
        self.normalize(now);
        self.gate = gate;
        match (self.mode, gate) {
            (0 | 2 | 3 | 4, false) => self.pause(now),
            (0 | 4, true) if self.counting => {
                self.start = now;
                self.running = true;
            }
            // Rising gate reloads modes 2/3 and triggers modes 1/5.
            (2 | 3, true) if self.counting => self.restart(now, self.decode(self.cr)),
            (1 | 5, true) if self.armed => self.restart(now, self.decode(self.cr)),
            _ => {}
        }
    }

    /// Control word with RW != 0: new mode, access and BCD setting.
    fn program(&mut self, rw: u8, mode: u8, bcd: bool, now: Ns) {
        self.stop(now, mode != 0);
        self.access = match rw {
            1 => Access::LoByte,
            2 => Access::HiByte,
            _ => Access::Word,
        };
        self.raw_mode = mode & 7;
        self.mode = if self.raw_mode >= 6 {
            self.raw_mode - 4
        } else {
            self.raw_mode
        };
        self.bcd = bcd;
        self.armed = false;
        self.null_count = true;
        self.write_lo = None;
        self.read_hi = false;
        self.latched_count = None;
        self.latch_hi = false;
        self.latched_status = None;
    }

    /// A complete count has been written to the count register.
    fn load(&mut self, cr: u16, now: Ns) {
        self.normalize(now);
        self.cr = cr;
        self.armed = true;
        let n = self.decode(cr);
        match self.mode {
            // Modes 0 and 4 restart immediately (mode 0 drives OUT low).
            0 | 4 => self.restart(now, n),
            // Modes 2/3 keep the current cycle; the new count starts with the
            // next period (the next rising edge of OUT).
            2 | 3 if self.counting => {
                let e = self.elapsed(now);
                let p = period(self.n);
                let done = e.saturating_sub(self.origin) / p;
                let sw = self
                    .origin
                    .saturating_add(done.saturating_add(1).saturating_mul(p));
                self.pending = Some((sw, n));
                // Null count is reported from `pending` until the switch.
                self.null_count = false;
            }
            2 | 3 => self.restart(now, n),
            // Modes 1/5 wait for a gate trigger.
            _ => self.null_count = true,
        }
    }

    /// Write to the counter's data port.
    fn write_data(&mut self, v: u8, now: Ns) {
        match self.access {
            Access::LoByte => self.load(u16::from(v), now),
            Access::HiByte => self.load(u16::from(v) << 8, now),
            Access::Word => match self.write_lo.take() {
                Some(lo) => self.load(u16::from_le_bytes([lo, v]), now),
                None => {
                    self.write_lo = Some(v);
                    self.null_count = true;
                    if self.mode == 0 {
                        // Mode 0: the first byte stops counting, OUT goes low.
                        self.stop(now, false);
                    }
                }
            },
        }
    }

    /// Read of the counter's data port.
    fn read_data(&mut self, now: Ns) -> u8 {
        self.normalize(now);
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        if let Some(c) = self.latched_count {
            let [lo, hi] = c.to_le_bytes();
            return match self.access {
                Access::LoByte => {
                    self.latched_count = None;
                    lo
                }
                Access::HiByte => {
                    self.latched_count = None;
                    hi
                }
                Access::Word if self.latch_hi => {
                    self.latched_count = None;
                    self.latch_hi = false;
                    hi
                }
                Access::Word => {
                    self.latch_hi = true;
                    lo
                }
            };
        }
        let [lo, hi] = self.raw_count(now).to_le_bytes();
        match self.access {
            Access::LoByte => lo,
            Access::HiByte => hi,
            Access::Word => {
                self.read_hi = !self.read_hi;
                if self.read_hi { lo } else { hi }
            }
        }
    }

    /// Counter latch command (ignored while a latched count is unread).
    fn latch_count(&mut self, now: Ns) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.raw_count(now));
            self.latch_hi = false;
        }
    }

    /// Status latch (read-back); ignored while a latched status is unread.
    fn latch_status(&mut self, now: Ns) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(now));
        }
    }
}

/// The 8254 timer with its three channels and port 0x61. Its serde form is the checkpoint
/// state (guest-time stamps included); check a deserialized value with [`Pit::check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as last written.
    port61: u8,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// Power-on state: all channels idle (see the module documentation).
    pub fn new() -> Self {
        Pit {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
        }
    }

    /// Refuses a state the timer cannot be in (a restored checkpoint).
    pub fn check(&self) -> Result<(), String> {
        if self.port61 & !0x0f != 0 {
            return Err(format!(
                "PIT: port 0x61 bits {:#04x} beyond 0-3",
                self.port61
            ));
        }
        for (i, c) in self.channels.iter().enumerate() {
            let effective = if c.raw_mode >= 6 {
                c.raw_mode.wrapping_sub(4)
            } else {
                c.raw_mode
            };
            if c.raw_mode > 7 || c.mode != effective {
                return Err(format!(
                    "PIT channel {i}: mode {} does not match control-word mode {}",
                    c.mode, c.raw_mode
                ));
            }
            if !(1..=65_536).contains(&c.n) {
                return Err(format!(
                    "PIT channel {i}: initial count {} out of range",
                    c.n
                ));
            }
            if let Some((_, n)) = c.pending
                && !(1..=65_536).contains(&n)
            {
                return Err(format!("PIT channel {i}: pending count {n} out of range"));
            }
            let gate = if i == 2 { self.port61 & 1 != 0 } else { true };
            if c.gate != gate {
                return Err(format!(
                    "PIT channel {i}: gate {} but its input is {gate}",
                    c.gate
                ));
            }
        }
        Ok(())
    }

    /// Reads ports 0x40-0x42 (counters), 0x43 (reads 0xff) and 0x61. Any
    /// other port reads 0xff.
    pub fn read(&mut self, port: u16, now: Ns) -> u8 {
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].read_data(now),
            0x61 => {
                let refresh = (now / REFRESH_NS) & 1 != 0;
                (self.port61 & 0x0f) | u8::from(refresh) << 4 | u8::from(self.out(2, now)) << 5
            }
            _ => 0xff,
        }
    }

    /// Writes ports 0x40-0x42 (counts), 0x43 (control word) and 0x61 (bit 0:
    /// channel 2 gate, bit 1: speaker data, bits 2-3 stored). Other ports are
    /// ignored.
    pub fn write(&mut self, port: u16, value: u8, now: Ns) {
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].write_data(value, now),
            0x43 => self.control(value, now),
            0x61 => {
                self.port61 = value & 0x0f;
                self.channels[2].set_gate(value & 1 != 0, now);
            }
            _ => {}
        }
    }

    /// Control word: counter latch, mode programming or read-back.
    fn control(&mut self, v: u8, now: Ns) {
        let select = usize::from(v >> 6);
        if select == 3 {
            // Read-back: bit 5 low latches counts, bit 4 low latches status,
            // bits 1-3 select channels 0-2.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if v & (2 << i) != 0 {
                    if v & 0x10 == 0 {
                        ch.latch_status(now);
                    }
                    if v & 0x20 == 0 {
                        ch.latch_count(now);
                    }
                }
            }
            return;
        }
        let ch = &mut self.channels[select];
        match (v >> 4) & 3 {
            0 => ch.latch_count(now),
            rw => ch.program(rw, (v >> 1) & 7, v & 1 != 0, now),
        }
    }

    /// Level of channel `channel`'s OUT pin at `now` (false for channel > 2).
    pub fn out(&self, channel: usize, now: Ns) -> bool {
        self.channels.get(channel).is_some_and(|c| c.out(now))
    }

    /// Time of the next rising edge of channel 0's OUT strictly after `now`,
    /// if one will come. See the module documentation for the lost-tick
    /// policy built on this.
    pub fn next_irq0(&self, now: Ns) -> Option<Ns> {
        self.channels[0].next_rise(now)
    }
}

#[cfg(test)]
mod tests;
