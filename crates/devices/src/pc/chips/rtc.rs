//! Motorola MC146818 real-time clock with CMOS RAM (PC/AT ports 0x70/0x71).
//!
//! # Programming model
//! * Port 0x70 (write only): bits 0-6 select one of the 128 CMOS bytes, bit 7
//!   masks NMI ([`Rtc::nmi_masked`]). Indices are always masked to 7 bits, so
//!   no guest value can address outside the array. Reading port 0x70 returns
//!   0xFF (the index latch is write-only on PC chipsets).
//! * Port 0x71: reads/writes the selected byte.
//!
//! | index | contents |
//! |-------|----------|
//! | 0x00/0x02/0x04 | seconds / minutes / hours (bit 7 = PM in 12-hour mode) |
//! | 0x01/0x03/0x05 | alarm seconds / minutes / hours; 0xC0-0xFF = "don't care" |
//! | 0x06/0x07/0x08/0x09 | day of week (1 = Sunday) / day of month / month / year (00-99) |
//! | 0x0A | register A: UIP (read only), DV2-0 divider, RS3-0 rate |
//! | 0x0B | register B: SET, PIE, AIE, UIE, SQWE, DM, 24/12, DSE |
//! | 0x0C | register C: IRQF, PF, AF, UF (read only, cleared by reading) |
//! | 0x0D | register D: VRT (always 0x80, read only) |
//! | 0x15-0x18, 0x30/0x31, 0x34/0x35, 0x5B-0x5D | memory size (see [`Rtc::new`]) |
//! | 0x2E/0x2F | standard AT checksum of 0x10-0x2D (computed at creation) |
//! | 0x32 | century, kept in step with the clock |
//! | everything else | plain battery-backed RAM |
//!
//! # Time keeping
//! While the clock runs, the calendar is not stored: it is computed from the
//! guest time `now` as `wall = origin + now` (nanoseconds since the Unix
//! epoch), where `origin` starts as `start_unix` seconds and is moved whenever
//! the guest sets the clock. Second boundaries ("update cycles") therefore
//! happen at fixed guest instants, and UIP is a pure function of `now`: it
//! reads 1 during the [`UIP_WINDOW_NS`] before each boundary and 0 otherwise,
//! so it can never stick.
//!
//! Setting SET (register B bit 7) or putting the divider into reset (register A
//! DV2-DV1 = 11) freezes the calendar into the time registers; the guest can
//! then write them freely. When the clock is released, the register contents
//! are decoded (in the current BCD/binary and 12/24-hour mode, out-of-range
//! fields clamped to their legal range, impossible dates such as 31 February
//! normalised into the next month) and time continues from there. Leaving SET
//! keeps the previous sub-second phase; leaving divider reset schedules the
//! first update 500 ms later, as the datasheet specifies. Writing a time
//! register while the clock runs adjusts that field immediately. The day of
//! the week is derived from the date plus a guest-settable offset, so a guest
//! that writes a "wrong" weekday reads its own value back and it advances
//! normally. Divider values other than reset (including the test modes) all
//! behave as the PC's 32.768 kHz time base. DSE and SQWE are stored but
//! ignored.
//!
//! # Interrupts
//! PF, AF and UF are set whenever their event occurs, whether or not enabled
//! (the guest may poll register C); IRQF — and the IRQ8 line — is
//! `(PF & PIE) | (AF & AIE) | (UF & UIE)`, re-evaluated on every change of
//! register B or C. Setting SET clears UIE, and while the clock is frozen no
//! update or alarm events occur. The periodic interrupt runs from the divider
//! chain, so it continues while SET is held but stops in divider reset.
//! Periodic rates follow the 32.768 kHz column of the datasheet: rate 0 is off,
//! rates 1 and 2 give 256 and 128 Hz, rates 3-15 give `32768 >> (rate - 1)` Hz.
//!
//! Every port access first calls [`Rtc::tick`] with its `now`, so flags are
//! always current; the VMM only needs to arm a timer for [`Rtc::next_event`]
//! and call `tick` when it fires, then re-query `next_event` after every port
//! access and tick. Calls with a `now` earlier than a previous one are treated
//! as "no time passed".

use super::NS_PER_SEC;
pub use super::civil::{civil_from_unix, unix_from_civil};
use palacios_vmm::time::Ns;
use serde::{Deserialize, Serialize};

/// CMOS index port.
pub const RTC_INDEX_PORT: u16 = 0x70;
/// CMOS data port.
pub const RTC_DATA_PORT: u16 = 0x71;
/// Length of the window before each second boundary in which UIP reads 1
/// (8 cycles of the 32.768 kHz time base, i.e. 244.14 µs).
pub const UIP_WINDOW_NS: u64 = 244_141;
/// Delay from releasing the divider reset to the first update cycle.
pub const DIVIDER_RESET_FIRST_UPDATE_NS: u64 = 500_000_000;

const REG_SEC: usize = 0x00;
const REG_ALARM_SEC: usize = 0x01;
const REG_MIN: usize = 0x02;
const REG_ALARM_MIN: usize = 0x03;
const REG_HOUR: usize = 0x04;
const REG_ALARM_HOUR: usize = 0x05;
const REG_WDAY: usize = 0x06;
const REG_MDAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0A;
const REG_B: usize = 0x0B;
const REG_C: usize = 0x0C;
const REG_D: usize = 0x0D;
const REG_CENTURY: usize = 0x32;

/// Register A: update in progress.
pub const A_UIP: u8 = 0x80;
const A_DV_RESET: u8 = 0x60;
const A_RS_MASK: u8 = 0x0F;
/// Register B: SET (halt updates).
pub const B_SET: u8 = 0x80;
/// Register B: periodic interrupt enable.
pub const B_PIE: u8 = 0x40;
/// Register B: alarm interrupt enable.
pub const B_AIE: u8 = 0x20;
/// Register B: update-ended interrupt enable.
pub const B_UIE: u8 = 0x10;
/// Register B: data mode, 1 = binary, 0 = BCD.
pub const B_DM: u8 = 0x04;
/// Register B: 1 = 24-hour mode, 0 = 12-hour mode.
pub const B_24H: u8 = 0x02;
/// Register C: interrupt request flag.
pub const C_IRQF: u8 = 0x80;
/// Register C: periodic interrupt flag.
pub const C_PF: u8 = 0x40;
/// Register C: alarm flag.
pub const C_AF: u8 = 0x20;
/// Register C: update-ended flag.
pub const C_UF: u8 = 0x10;
/// Register D: valid RAM and time.
pub const D_VRT: u8 = 0x80;

/// Frequency of the emulated time base.
const XTAL_HZ: u128 = 32_768;
const NS: i128 = NS_PER_SEC as i128;

/// Broken-down calendar value (hour is 0-23).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fields {
    sec: u8,
    min: u8,
    hour: u8,
    mday: u8,
    month: u8,
    year: i64,
}

/// Whether the calendar advances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Clock {
    /// Wall-clock nanoseconds since the epoch = `origin_ns + now`.
    Running {
        #[serde(with = "crate::pc::serde_util::i128_text")]
        origin_ns: i128,
    },
    /// Frozen in the CMOS time registers. Second boundaries, once running
    /// again, fall on guest times `t` with `(t + phase_ns) % 1e9 == 0`.
    Held {
        #[serde(with = "crate::pc::serde_util::i128_text")]
        phase_ns: i128,
    },
}

/// MC146818 RTC + 128 bytes of CMOS RAM. Its serde form is the checkpoint state (guest-time
/// stamps included); check a deserialized value with [`Rtc::check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rtc {
    #[serde(with = "crate::pc::serde_util::hex")]
    cmos: [u8; 128],
    index: u8,
    nmi_masked: bool,
    clock: Clock,
    /// Added (mod 7) to the computed weekday.
    wday_adjust: u8,
    /// Guest time at which the divider chain last left reset.
    div_origin: Ns,
    /// Guest time up to which events have been accounted.
    last: Ns,
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0F)
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

impl Rtc {
    /// Creates the RTC. `start_unix` is the UTC wall-clock time in seconds at
    /// guest time 0; `ram_bytes` of guest RAM fill the memory size fields:
    ///
    /// * 0x15/0x16: base memory in KiB (640, or less if RAM is smaller).
    /// * 0x17/0x18 and 0x30/0x31: KiB of extended memory above 1 MiB (below
    ///   4 GiB), capped at 0xFFFF.
    /// * 0x34/0x35: 64 KiB units of memory between 16 MiB and 4 GiB, capped at
    ///   0xFFFF.
    /// * 0x5B-0x5D: 64 KiB units of memory above 4 GiB (24 bits, capped).
    ///
    /// RAM layout: `min(ram, 3 GiB)` sits below 4 GiB, the rest above 4 GiB.
    /// All multi-byte fields are little-endian (low byte at the lower index).
    pub fn new(start_unix: i64, ram_bytes: u64, now: Ns) -> Self {
        const KIB: u64 = 1 << 10;
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        cmos[REG_B] = B_24H; // BCD, 24-hour, no interrupts
        cmos[REG_D] = D_VRT;

        let below_4g = ram_bytes.min(3 * GIB);
        let above_4g = ram_bytes - below_4g;
        let base_kib = (below_4g / KIB).min(640);
        let ext_kib = (below_4g.saturating_sub(MIB) / KIB).min(0xFFFF);
        let high_64k = (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xFFFF);
        let over_4g_64k = (above_4g / (64 * KIB)).min(0xFF_FFFF);
        let put = |cmos: &mut [u8; 128], at: usize, v: u64, n: usize| {
            for i in 0..n {
                cmos[at + i] = (v >> (8 * i)) as u8;
            }
        };
        put(&mut cmos, 0x15, base_kib, 2);
        put(&mut cmos, 0x17, ext_kib, 2);
        put(&mut cmos, 0x30, ext_kib, 2);
        put(&mut cmos, 0x34, high_64k, 2);
        put(&mut cmos, 0x5B, over_4g_64k, 3);
        let sum: u16 = cmos[0x10..=0x2D].iter().map(|&b| u16::from(b)).sum();
        put(&mut cmos, 0x2E, u64::from(sum.swap_bytes()), 2); // 0x2E = high byte

        Rtc {
            cmos,
            index: 0,
            nmi_masked: false,
            clock: Clock::Running {
                origin_ns: i128::from(start_unix) * NS,
            },
            wday_adjust: 0,
            div_origin: now,
            last: now,
        }
    }

    /// Port read (0x70 returns 0xFF, 0x71 the selected CMOS byte, others 0xFF).
    pub fn read(&mut self, port: u16, now: Ns) -> u8 {
        if port != RTC_DATA_PORT {
            return 0xFF;
        }
        self.tick(now);
        let idx = usize::from(self.index);
        match idx {
            REG_A => {
                let uip = if self.uip(now) { A_UIP } else { 0 };
                (self.cmos[REG_A] & !A_UIP) | uip
            }
            REG_C => {
                let v = self.cmos[REG_C];
                self.cmos[REG_C] = 0;
                v
            }
            REG_D => D_VRT,
            _ if Self::is_time_reg(idx) => match self.clock {
                Clock::Running { .. } => self.current_reg(idx, now),
                Clock::Held { .. } => self.cmos[idx],
            },
            _ => self.cmos[idx],
        }
    }

    /// Port write (0x70 selects the index and NMI mask, 0x71 writes the byte).
    pub fn write(&mut self, port: u16, v: u8, now: Ns) {
        match port {
            RTC_INDEX_PORT => {
                self.index = v & 0x7F;
                self.nmi_masked = v & 0x80 != 0;
            }
            RTC_DATA_PORT => self.write_reg(usize::from(self.index), v, now),
            _ => {}
        }
    }

    /// Refuses a state the chip cannot be in (a restored checkpoint).
    pub fn check(&self) -> Result<(), String> {
        if self.index > 0x7F {
            return Err(format!("RTC: CMOS index {:#x} beyond 0x7f", self.index));
        }
        if self.wday_adjust > 6 {
            return Err(format!("RTC: weekday offset {} beyond 6", self.wday_adjust));
        }
        // Wall-clock seconds within i64, so that no calendar arithmetic can overflow.
        let limit = i128::from(i64::MAX) * NS;
        match self.clock {
            Clock::Running { origin_ns } if origin_ns.abs() > limit => {
                Err(format!("RTC: clock origin {origin_ns} ns out of range"))
            }
            Clock::Held { phase_ns } if !(0..NS).contains(&phase_ns) => {
                Err(format!("RTC: second phase {phase_ns} ns out of range"))
            }
            _ => Ok(()),
        }
    }

    /// Guest time up to which events have been accounted (by [`Rtc::tick`]).
    pub fn last_accounted(&self) -> Ns {
        self.last
    }

    /// Level of the IRQ8 line: register C's IRQF bit.
    pub fn irq_level(&self) -> bool {
        self.cmos[REG_C] & C_IRQF != 0
    }

    /// Bit 7 of the last write to the index port.
    pub fn nmi_masked(&self) -> bool {
        self.nmi_masked
    }

    /// Sets a plain CMOS RAM byte (index 0x0E-0x7F, e.g. boot order or disk
    /// types) from the VMM side. Clock and status registers are left alone.
    pub fn set_cmos_byte(&mut self, index: u8, value: u8) {
        let idx = usize::from(index & 0x7F);
        if idx >= 0x0E && idx != REG_CENTURY {
            self.cmos[idx] = value;
        }
    }

    /// The earliest guest time after `now` at which an *enabled* interrupt
    /// source (periodic with PIE, alarm with AIE, update-ended with UIE)
    /// fires, or `None` if none is enabled or can fire.
    pub fn next_event(&self, now: Ns) -> Option<Ns> {
        let b = self.cmos[REG_B];
        let mut best: Option<Ns> = None;
        let mut offer = |t: Option<Ns>| {
            if let Some(t) = t {
                best = Some(best.map_or(t, |b| b.min(t)));
            }
        };
        if b & B_PIE != 0 {
            offer(self.next_periodic(now));
        }
        if let Clock::Running { origin_ns } = self.clock {
            let wall = origin_ns + i128::from(now);
            let next_sec = wall.div_euclid(NS) + 1;
            let to_guest = |s: i128| u64::try_from(s * NS - origin_ns).ok().filter(|&t| t > now);
            if b & B_UIE != 0 {
                offer(to_guest(next_sec));
            }
            if b & B_AIE != 0 {
                offer(self.next_alarm_secs(next_sec).and_then(to_guest));
            }
        }
        best
    }

    /// Accounts for all events in `(last, now]`: sets PF/AF/UF for events that
    /// occurred and recomputes IRQF.
    pub fn tick(&mut self, now: Ns) {
        if now <= self.last {
            return;
        }
        let last = self.last;
        self.last = now;
        let mut flags = 0;
        if let Some(shift) = self.periodic_shift() {
            if self.div_ticks(now) >> shift > self.div_ticks(last) >> shift {
                flags |= C_PF;
            }
        }
        if let Clock::Running { origin_ns } = self.clock {
            let s_last = (origin_ns + i128::from(last)).div_euclid(NS);
            let s_now = (origin_ns + i128::from(now)).div_euclid(NS);
            if s_now > s_last {
                flags |= C_UF;
                if self.next_alarm_secs(s_last + 1).is_some_and(|a| a <= s_now) {
                    flags |= C_AF;
                }
            }
        }
        self.cmos[REG_C] |= flags;
        self.update_irqf();
    }

    // ----- internals -----

    fn is_time_reg(idx: usize) -> bool {
        matches!(
            idx,
            REG_SEC | REG_MIN | REG_HOUR | REG_WDAY | REG_MDAY | REG_MONTH | REG_YEAR | REG_CENTURY
        )
    }

    fn binary(&self) -> bool {
        self.cmos[REG_B] & B_DM != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() { v } else { to_bcd(v) }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() { v } else { from_bcd(v) }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.encode(h);
        }
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.decode(v).min(23);
        }
        let h12 = self.decode(v & 0x7F).min(12) % 12;
        h12 + if v & 0x80 != 0 { 12 } else { 0 }
    }

    fn running_wanted(&self) -> bool {
        self.cmos[REG_B] & B_SET == 0 && self.cmos[REG_A] & A_DV_RESET != A_DV_RESET
    }

    fn divider_running(&self) -> bool {
        self.cmos[REG_A] & A_DV_RESET != A_DV_RESET
    }

    fn uip(&self, now: Ns) -> bool {
        match self.clock {
            Clock::Running { origin_ns } => {
                let frac = (origin_ns + i128::from(now)).rem_euclid(NS);
                frac >= NS - i128::from(UIP_WINDOW_NS)
            }
            Clock::Held { .. } => false,
        }
    }

    fn wall_secs(&self, now: Ns) -> Option<i128> {
        match self.clock {
            Clock::Running { origin_ns } => Some((origin_ns + i128::from(now)).div_euclid(NS)),
            Clock::Held { .. } => None,
        }
    }

    /// Calendar fields and weekday (0 = Sunday) for a wall-clock second.
    fn fields_of(secs: i128) -> (Fields, u8) {
        let (year, month, mday, hour, min, sec, wday) = civil_from_unix(clamp_i64(secs));
        (
            Fields {
                sec,
                min,
                hour,
                mday,
                month,
                year,
            },
            wday,
        )
    }

    /// Encoded value of time register `idx` for the given fields.
    fn encode_reg(&self, idx: usize, f: &Fields, wday: u8) -> u8 {
        match idx {
            REG_SEC => self.encode(f.sec),
            REG_MIN => self.encode(f.min),
            REG_HOUR => self.encode_hour(f.hour),
            REG_WDAY => self.encode((wday + self.wday_adjust) % 7 + 1),
            REG_MDAY => self.encode(f.mday),
            REG_MONTH => self.encode(f.month),
            REG_YEAR => self.encode(f.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(f.century()),
            _ => 0,
        }
    }

    fn current_reg(&self, idx: usize, now: Ns) -> u8 {
        let (f, wday) = Self::fields_of(self.wall_secs(now).unwrap_or(0));
        self.encode_reg(idx, &f, wday)
    }

    /// Applies a guest write of time register `idx` to `f` (values clamped).
    /// Returns the requested weekday (1-7 nominal) for the weekday register.
    fn apply_time_write(&self, idx: usize, v: u8, f: &mut Fields) -> Option<u8> {
        match idx {
            REG_SEC => f.sec = self.decode(v).min(59),
            REG_MIN => f.min = self.decode(v).min(59),
            REG_HOUR => f.hour = self.decode_hour(v),
            REG_MDAY => f.mday = self.decode(v).clamp(1, 31),
            REG_MONTH => f.month = self.decode(v).clamp(1, 12),
            REG_YEAR => f.year = i64::from(f.century()) * 100 + i64::from(self.decode(v).min(99)),
            REG_CENTURY => {
                f.year = i64::from(self.decode(v).min(99)) * 100 + f.year.rem_euclid(100)
            }
            REG_WDAY => return Some(self.decode(v)),
            _ => {}
        }
        None
    }

    fn set_wday(&mut self, wanted: u8, actual: u8) {
        self.wday_adjust = (i16::from(wanted) - 1 - i16::from(actual)).rem_euclid(7) as u8;
    }

    fn write_reg(&mut self, idx: usize, v: u8, now: Ns) {
        self.tick(now);
        match idx {
            REG_A => {
                let was_div_running = self.divider_running();
                self.cmos[REG_A] = v & !A_UIP;
                let div_running = self.divider_running();
                if div_running && !was_div_running {
                    self.div_origin = now;
                    // First update cycle half a second after release.
                    let boundary = i128::from(now) + i128::from(DIVIDER_RESET_FIRST_UPDATE_NS);
                    self.hold(now); // make sure the phase below is the one used
                    self.clock = Clock::Held {
                        phase_ns: (-boundary).rem_euclid(NS),
                    };
                }
                self.sync_clock(now);
            }
            REG_B => {
                let mut v = v;
                if v & B_SET != 0 && self.cmos[REG_B] & B_SET == 0 {
                    v &= !B_UIE; // SET going high clears UIE
                }
                self.cmos[REG_B] = v;
                self.sync_clock(now);
                self.update_irqf();
            }
            REG_C | REG_D => {} // read only
            _ if Self::is_time_reg(idx) => match self.clock {
                Clock::Held { .. } => self.cmos[idx] = v,
                Clock::Running { origin_ns } => {
                    let wall = origin_ns + i128::from(now);
                    let (mut f, wday) = Self::fields_of(wall.div_euclid(NS));
                    if let Some(w) = self.apply_time_write(idx, v, &mut f) {
                        self.set_wday(w, wday);
                    } else {
                        let secs = i128::from(f.to_unix());
                        self.clock = Clock::Running {
                            origin_ns: secs * NS + wall.rem_euclid(NS) - i128::from(now),
                        };
                    }
                }
            },
            _ => self.cmos[idx] = v,
        }
    }

    /// Freezes the calendar into the time registers (no-op if already held).
    fn hold(&mut self, now: Ns) {
        if let Clock::Running { origin_ns } = self.clock {
            let (f, wday) = Self::fields_of((origin_ns + i128::from(now)).div_euclid(NS));
            for idx in [
                REG_SEC,
                REG_MIN,
                REG_HOUR,
                REG_WDAY,
                REG_MDAY,
                REG_MONTH,
                REG_YEAR,
                REG_CENTURY,
            ] {
                self.cmos[idx] = self.encode_reg(idx, &f, wday);
            }
            self.clock = Clock::Held {
                phase_ns: origin_ns.rem_euclid(NS),
            };
        }
    }

    /// Starts or stops the calendar according to SET and the divider bits.
    fn sync_clock(&mut self, now: Ns) {
        match (self.clock, self.running_wanted()) {
            (Clock::Running { .. }, false) => self.hold(now),
            (Clock::Held { phase_ns }, true) => {
                let mut f = Fields {
                    sec: 0,
                    min: 0,
                    hour: 0,
                    mday: 1,
                    month: 1,
                    year: 2000,
                };
                for idx in [
                    REG_CENTURY,
                    REG_YEAR,
                    REG_MONTH,
                    REG_MDAY,
                    REG_HOUR,
                    REG_MIN,
                    REG_SEC,
                ] {
                    self.apply_time_write(idx, self.cmos[idx], &mut f);
                }
                let secs = f.to_unix();
                let wday = Self::fields_of(i128::from(secs)).1;
                self.set_wday(self.decode(self.cmos[REG_WDAY]), wday);
                let frac = (i128::from(now) + phase_ns).rem_euclid(NS);
                self.clock = Clock::Running {
                    origin_ns: i128::from(secs) * NS + frac - i128::from(now),
                };
            }
            _ => {}
        }
    }

    fn update_irqf(&mut self) {
        let c = self.cmos[REG_C] & (C_PF | C_AF | C_UF);
        let pending = c & self.cmos[REG_B] & (B_PIE | B_AIE | B_UIE) != 0;
        self.cmos[REG_C] = c | if pending { C_IRQF } else { 0 };
    }

    /// log2 of the periodic-interrupt period in 32.768 kHz cycles, or `None`
    /// when the periodic interrupt is off.
    fn periodic_shift(&self) -> Option<u32> {
        if !self.divider_running() {
            return None;
        }
        match self.cmos[REG_A] & A_RS_MASK {
            0 => None,
            1 => Some(7), // 256 Hz
            2 => Some(8), // 128 Hz
            r => Some(u32::from(r) - 1),
        }
    }

    /// 32.768 kHz cycles elapsed since the divider left reset.
    fn div_ticks(&self, t: Ns) -> u128 {
        u128::from(t.saturating_sub(self.div_origin)) * XTAL_HZ / u128::from(NS_PER_SEC)
    }

    fn next_periodic(&self, now: Ns) -> Option<Ns> {
        let shift = self.periodic_shift()?;
        let next_tick = ((self.div_ticks(now) >> shift) + 1) << shift;
        let offset = (next_tick * u128::from(NS_PER_SEC)).div_ceil(XTAL_HZ);
        u64::try_from(u128::from(self.div_origin) + offset).ok()
    }

    /// The first wall-clock second `>= from` whose time of day matches the
    /// alarm registers (compared in their encoded form, as the chip does).
    fn next_alarm_secs(&self, from: i128) -> Option<i128> {
        let dont_care = |b: u8| b & 0xC0 == 0xC0;
        let (sa, ma, ha) = (
            self.cmos[REG_ALARM_SEC],
            self.cmos[REG_ALARM_MIN],
            self.cmos[REG_ALARM_HOUR],
        );
        let sec_target = if dont_care(sa) {
            None
        } else {
            Some((0..60).find(|&s| self.encode(s) == sa)?)
        };
        let mut min_ok = [false; 60];
        let mut hour_ok = [false; 24];
        for (m, ok) in (0u8..).zip(min_ok.iter_mut()) {
            *ok = dont_care(ma) || self.encode(m) == ma;
        }
        for (h, ok) in (0u8..).zip(hour_ok.iter_mut()) {
            *ok = dont_care(ha) || self.encode_hour(h) == ha;
        }
        let tod = from.rem_euclid(86_400);
        let day_start = from - tod;
        let (first_min, first_sec) = (tod / 60, tod % 60);
        for step in 0..=1440 {
            let abs_min = first_min + step;
            if !hour_ok[(abs_min / 60 % 24) as usize] || !min_ok[(abs_min % 60) as usize] {
                continue;
            }
            let floor = if step == 0 { first_sec } else { 0 };
            let sec = match sec_target {
                None => floor,
                Some(t) if i128::from(t) >= floor => i128::from(t),
                Some(_) => continue,
            };
            return Some(day_start + abs_min * 60 + sec);
        }
        None
    }
}

impl Fields {
    fn century(&self) -> u8 {
        (self.year.div_euclid(100).rem_euclid(100)) as u8
    }

    fn to_unix(self) -> i64 {
        unix_from_civil(
            self.year, self.month, self.mday, self.hour, self.min, self.sec,
        )
    }
}

#[cfg(test)]
mod tests;
