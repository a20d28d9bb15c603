//! The local APIC timer: divide configuration, initial/current count,
//! one-shot, periodic and TSC-deadline modes.
//!
//! The counter is not stepped; it is described by an *anchor*: the counter
//! held `anchor_count` at guest time `anchor` and decrements once per
//! `divisor` bus clocks since. The current count and the next expiry follow
//! from that and the time passed in.

use crate::pc::chips::apic::Ns;
use serde::{Deserialize, Serialize};

/// Frequency of the APIC timer's input clock (the "bus clock"), in Hz.
///
/// One count of the timer at divide-by-1 lasts `1e9 / BUS_HZ` ns, i.e.
/// exactly 1 ns with the chosen 1 GHz; a count at divide-by-`d` lasts `d`
/// ns. Guests learn the rate by calibrating against another clock (PIT,
/// HPET, ACPI PM timer) or from CPUID leaf 0x15 if the VMM exposes it.
pub const BUS_HZ: u64 = 1_000_000_000;

const NS_PER_SEC: u128 = 1_000_000_000;

/// Timer mode selected by LVT timer bits 17-18.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerMode {
    /// `00`: count down once, then stop.
    OneShot,
    /// `01`: count down, reload from the initial count, repeat.
    Periodic,
    /// `10`: fire when the TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
    /// `11`: reserved; the timer never fires.
    Reserved,
}

impl TimerMode {
    /// Decodes the mode from an LVT timer value.
    pub(crate) fn from_lvt(lvt: u32) -> Self {
        match (lvt >> 17) & 3 {
            0 => Self::OneShot,
            1 => Self::Periodic,
            2 => Self::TscDeadline,
            _ => Self::Reserved,
        }
    }
}

/// Divisor encoded by the divide configuration register (bits 0, 1, 3):
/// `000`→2, `001`→4, `010`→8, `011`→16, `100`→32, `101`→64, `110`→128,
/// `111`→1.
pub(crate) fn divisor(dcr: u32) -> u64 {
    let code = (dcr & 3) | ((dcr >> 1) & 4);
    if code == 7 { 1 } else { 2u64 << code }
}

/// Nanoseconds taken by `ticks` counts at divisor `div` (rounded up, at
/// least 1 for a non-zero count, saturating).
fn ticks_to_ns(ticks: u64, div: u64) -> u64 {
    if ticks == 0 {
        return 0;
    }
    let num = ticks as u128 * div as u128 * NS_PER_SEC;
    let ns = num.div_ceil(BUS_HZ as u128).max(1);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Whole counts elapsed in `ns` nanoseconds at divisor `div` (saturating).
fn ns_to_ticks(ns: u64, div: u64) -> u64 {
    let t = ns as u128 * BUS_HZ as u128 / (div as u128 * NS_PER_SEC);
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// Converts a TSC delta to nanoseconds at `tsc_hz` (rounded up so that the
/// timer never fires early; saturating).
pub(crate) fn tsc_to_ns(delta: u64, tsc_hz: u64) -> u64 {
    let ns = (delta as u128 * NS_PER_SEC).div_ceil(tsc_hz.max(1) as u128);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// A running count-down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Run {
    /// Guest time at which the counter held `anchor_count`.
    anchor: Ns,
    /// Counter value at `anchor` (non-zero).
    anchor_count: u32,
    /// Guest time at which the counter reaches zero.
    next: Ns,
}

/// State of the APIC timer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Timer {
    /// Initial count register.
    pub(crate) initial: u32,
    /// Divide configuration register (only bits 0, 1, 3 kept).
    pub(crate) dcr: u32,
    /// Count-down state in one-shot / periodic mode.
    run: Option<Run>,
    /// IA32_TSC_DEADLINE (TSC units; 0 = disarmed).
    pub(crate) tsc_deadline: u64,
    /// Guest time matching `tsc_deadline` while armed.
    tsc_deadline_ns: Option<Ns>,
}

impl Timer {
    /// Resets to the power-on state (stopped, counts 0, divide by 2).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    /// Refuses a state the timer cannot be in (a restored checkpoint).
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.dcr & !0xb != 0 {
            return Err(format!(
                "timer divide configuration {:#x} sets reserved bits",
                self.dcr
            ));
        }
        if self.run.is_some_and(|r| r.anchor_count == 0) {
            return Err("timer count-down from 0".into());
        }
        Ok(())
    }

    fn div(&self) -> u64 {
        divisor(self.dcr)
    }

    /// Writes the initial count: (re)starts the count-down at `now`, or
    /// stops it for 0. Ignored in TSC-deadline mode.
    pub(crate) fn write_initial(&mut self, now: Ns, count: u32, mode: TimerMode) {
        if mode == TimerMode::TscDeadline {
            return;
        }
        self.initial = count;
        self.run = (count != 0).then(|| Run {
            anchor: now,
            anchor_count: count,
            next: now.saturating_add(ticks_to_ns(count as u64, self.div())),
        });
    }

    /// Current count register value at `now`.
    pub(crate) fn current(&self, now: Ns, mode: TimerMode) -> u32 {
        let Some(run) = self.run else { return 0 };
        match mode {
            TimerMode::OneShot | TimerMode::Periodic => {}
            TimerMode::TscDeadline | TimerMode::Reserved => return 0,
        }
        let elapsed = ns_to_ticks(now.saturating_sub(run.anchor), self.div());
        if elapsed < run.anchor_count as u64 {
            return run.anchor_count - elapsed as u32;
        }
        if mode == TimerMode::Periodic && self.initial != 0 {
            let over = elapsed - run.anchor_count as u64;
            self.initial - (over % self.initial as u64) as u32
        } else {
            0
        }
    }

    /// Writes the divide configuration; a running count continues from its
    /// current value at the new rate.
    pub(crate) fn write_dcr(&mut self, now: Ns, v: u32, mode: TimerMode) {
        let cur = self.current(now, mode);
        self.dcr = v & 0xb;
        if let Some(run) = self.run.as_mut() {
            // An expiry already due is left for `tick` to report.
            if run.next > now && cur != 0 {
                run.anchor = now;
                run.anchor_count = cur;
                run.next = now.saturating_add(ticks_to_ns(cur as u64, divisor(self.dcr)));
            }
        }
    }

    /// The timer mode changed from `old` to `new`. Transitions into or out
    /// of TSC-deadline mode disarm the timer and clear both the initial
    /// count and IA32_TSC_DEADLINE; one-shot <-> periodic keeps counting.
    pub(crate) fn mode_changed(&mut self, old: TimerMode, new: TimerMode) {
        if old != new && (old == TimerMode::TscDeadline || new == TimerMode::TscDeadline) {
            self.run = None;
            self.initial = 0;
            self.tsc_deadline = 0;
            self.tsc_deadline_ns = None;
        }
    }

    /// Reads IA32_TSC_DEADLINE (0 outside TSC-deadline mode).
    pub(crate) fn read_tsc_deadline(&self, mode: TimerMode) -> u64 {
        if mode == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// Writes IA32_TSC_DEADLINE. Returns `true` when the deadline is
    /// already due (`deadline <= tsc_now`): the timer fires right away and
    /// disarms. Ignored outside TSC-deadline mode; 0 disarms.
    pub(crate) fn write_tsc_deadline(
        &mut self,
        v: u64,
        now: Ns,
        tsc_now: u64,
        tsc_hz: u64,
        mode: TimerMode,
    ) -> bool {
        if mode != TimerMode::TscDeadline {
            return false;
        }
        if v == 0 {
            self.tsc_deadline = 0;
            self.tsc_deadline_ns = None;
            return false;
        }
        if v <= tsc_now {
            self.tsc_deadline = 0;
            self.tsc_deadline_ns = None;
            return true;
        }
        self.tsc_deadline = v;
        self.tsc_deadline_ns = Some(now.saturating_add(tsc_to_ns(v - tsc_now, tsc_hz)));
        false
    }

    /// Guest time of the next expiry, if armed in the current mode.
    pub(crate) fn deadline(&self, mode: TimerMode) -> Option<Ns> {
        match mode {
            TimerMode::OneShot | TimerMode::Periodic => self.run.map(|r| r.next),
            TimerMode::TscDeadline => self.tsc_deadline_ns,
            TimerMode::Reserved => None,
        }
    }

    /// Advances to `now`. Returns `true` if the timer expired (at most one
    /// expiry is reported per call: missed periodic expiries coalesce into
    /// one, as they would in a single IRR bit).
    pub(crate) fn tick(&mut self, now: Ns, mode: TimerMode) -> bool {
        match mode {
            TimerMode::OneShot => match self.run {
                Some(r) if r.next <= now => {
                    self.run = None;
                    true
                }
                _ => false,
            },
            TimerMode::Periodic => {
                let Some(r) = self.run else { return false };
                if r.next > now {
                    return false;
                }
                if self.initial == 0 {
                    self.run = None;
                    return true;
                }
                let period = ticks_to_ns(self.initial as u64, self.div()).max(1);
                let missed = (now - r.next) / period;
                let last = r.next.saturating_add(missed.saturating_mul(period));
                self.run = Some(Run {
                    anchor: last,
                    anchor_count: self.initial,
                    next: last.saturating_add(period),
                });
                true
            }
            TimerMode::TscDeadline => match self.tsc_deadline_ns {
                Some(t) if t <= now => {
                    self.tsc_deadline = 0;
                    self.tsc_deadline_ns = None;
                    true
                }
                _ => false,
            },
            TimerMode::Reserved => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divide_encoding() {
        let expect = [
            (0, 2),
            (1, 4),
            (2, 8),
            (3, 16),
            (8, 32),
            (9, 64),
            (10, 128),
            (11, 1),
        ];
        for (dcr, d) in expect {
            assert_eq!(divisor(dcr), d, "dcr {dcr:#x}");
        }
        // Bit 2 and high bits are ignored.
        assert_eq!(divisor(0xffff_fff4), divisor(0));
        assert_eq!(divisor(0xf), divisor(0xb));
    }

    #[test]
    fn conversions_saturate() {
        assert_eq!(ticks_to_ns(u64::MAX, 128), u64::MAX);
        assert_eq!(ns_to_ticks(u64::MAX, 1), u64::MAX);
        assert_eq!(tsc_to_ns(u64::MAX, 1), u64::MAX);
        assert_eq!(tsc_to_ns(3, 0), 3_000_000_000);
        assert_eq!(tsc_to_ns(1, 3_000_000_000), 1);
    }

    #[test]
    fn periodic_coalesces_missed_periods() {
        let mut t = Timer {
            dcr: 0xb,
            ..Timer::default()
        };
        t.write_initial(0, 100, TimerMode::Periodic);
        assert_eq!(t.deadline(TimerMode::Periodic), Some(100));
        assert!(t.tick(1050, TimerMode::Periodic));
        assert_eq!(t.deadline(TimerMode::Periodic), Some(1100));
        assert_eq!(t.current(1050, TimerMode::Periodic), 50);
        assert!(!t.tick(1099, TimerMode::Periodic));
    }

    #[test]
    fn extreme_times_do_not_wrap() {
        let mut t = Timer::default();
        t.write_initial(u64::MAX - 5, u32::MAX, TimerMode::Periodic);
        assert_eq!(t.deadline(TimerMode::Periodic), Some(u64::MAX));
        assert!(t.tick(u64::MAX, TimerMode::Periodic));
        assert!(t.tick(u64::MAX, TimerMode::Periodic));
        let _ = t.current(0, TimerMode::Periodic);
    }
}
