//! Guest time: the one definition every timer device uses.
//!
//! Guest time is the host's monotonic clock since the VM was created, plus an offset (0 unless
//! a restore sets it). The guest's TSC is defined from it: `tsc = ns * tsc_hz / 1e9`; backends
//! load that value into each core's TSC when it starts, so the TSC and the timer devices agree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Nanoseconds of guest time.
pub type Ns = u64;

/// The TSC frequency the guest is told when the backend has no better figure.
pub const DEFAULT_TSC_HZ: u64 = 2_000_000_000;

#[derive(Debug)]
pub struct GuestClock {
    start: Instant,
    offset: AtomicU64,
    tsc_hz: AtomicU64,
    /// Guest TSC at guest time 0 (a backend that cannot set the TSC reports where it is).
    tsc_base: AtomicU64,
    /// Deterministic mode: guest time is this value, advanced by the cores (not the host).
    virtual_ns: Option<AtomicU64>,
    /// Guest time at which the clock was stopped (paused VM); `RUNNING` while it runs.
    frozen: AtomicU64,
    /// Guest time runs at 1/`dilation` of host time (`<time dilation>`).
    dilation: AtomicU64,
}

/// `frozen` value of a running clock.
const RUNNING: u64 = u64::MAX;

impl GuestClock {
    pub fn new(tsc_hz: u64) -> Self {
        GuestClock {
            start: Instant::now(),
            offset: AtomicU64::new(0),
            tsc_hz: AtomicU64::new(tsc_hz.max(1)),
            tsc_base: AtomicU64::new(0),
            virtual_ns: None,
            frozen: AtomicU64::new(RUNNING),
            dilation: AtomicU64::new(1),
        }
    }

    /// Make guest time run at 1/`d` of host time (before the VM runs).
    pub fn set_dilation(&self, d: u32) {
        let d = u64::from(d.max(1));
        let now = self.now();
        self.dilation.store(d, Ordering::Relaxed);
        self.continue_from(now);
    }

    pub fn dilation(&self) -> u64 {
        self.dilation.load(Ordering::Relaxed)
    }

    /// Host time that `ns` of guest time take (for waits).
    pub fn host_ns(&self, ns: Ns) -> u64 {
        ns.saturating_mul(self.dilation())
    }

    /// Host nanoseconds since the clock started, dilated.
    fn raw(&self) -> u64 {
        (self.start.elapsed().as_nanos() as u64) / self.dilation.load(Ordering::Relaxed)
    }

    /// A clock that only moves when [`GuestClock::advance_to`] is called.
    pub fn new_virtual(tsc_hz: u64) -> Self {
        GuestClock {
            virtual_ns: Some(AtomicU64::new(0)),
            ..Self::new(tsc_hz)
        }
    }

    pub fn is_virtual(&self) -> bool {
        self.virtual_ns.is_some()
    }

    /// Deterministic mode: move guest time forward to `ns` (never backwards).
    pub fn advance_to(&self, ns: Ns) {
        if let Some(v) = &self.virtual_ns {
            v.fetch_max(ns, Ordering::AcqRel);
        }
    }

    /// Guest nanoseconds now.
    pub fn now(&self) -> Ns {
        let f = self.frozen.load(Ordering::Acquire);
        if f != RUNNING {
            return f;
        }
        self.running_now()
    }

    fn running_now(&self) -> Ns {
        if let Some(v) = &self.virtual_ns {
            return v
                .load(Ordering::Acquire)
                .wrapping_add(self.offset.load(Ordering::Relaxed));
        }
        self.raw().wrapping_add(self.offset.load(Ordering::Relaxed))
    }

    /// Shift guest time (for restore).
    pub fn set_offset(&self, ns: u64) {
        self.offset.store(ns, Ordering::Relaxed);
    }

    /// Stop guest time (the VM is paused): [`GuestClock::now`] stays where it is.
    pub fn freeze(&self) {
        if self.virtual_ns.is_some() {
            // Deterministic time moves only when cores run, and a paused VM's cores do not.
            return;
        }
        let now = self.running_now();
        let _ = self
            .frozen
            .compare_exchange(RUNNING, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Let guest time run again from where it stopped: the paused interval never happened
    /// for the guest.
    pub fn thaw(&self) {
        let f = self.frozen.load(Ordering::Acquire);
        if f == RUNNING {
            return;
        }
        self.continue_from(f);
        self.frozen.store(RUNNING, Ordering::Release);
    }

    /// How long ago (in ns of the host clock) guest time stopped; 0 while it runs. A core
    /// that parks after the freeze subtracts this from its TSC so that the TSC stopped with
    /// guest time.
    pub fn frozen_lag(&self) -> u64 {
        let f = self.frozen.load(Ordering::Acquire);
        if f == RUNNING {
            return 0;
        }
        self.running_now().saturating_sub(f)
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire) != RUNNING
    }

    /// Make guest time `ns` now, and continue from there (restore; a thaw).
    pub fn continue_from(&self, ns: Ns) {
        if let Some(v) = &self.virtual_ns {
            // The cores report absolute guest time (restored with their instruction counts).
            v.store(ns, Ordering::Release);
            self.offset.store(0, Ordering::Release);
            return;
        }
        let raw = self.raw();
        self.offset.store(ns.wrapping_sub(raw), Ordering::Release);
        if self.frozen.load(Ordering::Acquire) != RUNNING {
            self.frozen.store(ns, Ordering::Release);
        }
    }

    /// The TSC anchor (guest TSC at guest time 0), for checkpoints.
    pub fn tsc_base(&self) -> u64 {
        self.tsc_base.load(Ordering::Relaxed)
    }

    pub fn set_tsc_base(&self, base: u64) {
        self.tsc_base.store(base, Ordering::Relaxed);
    }

    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz.load(Ordering::Relaxed)
    }

    /// Set the TSC frequency (the backend's figure, before any core runs).
    pub fn set_tsc_hz(&self, hz: u64) {
        self.tsc_hz.store(hz.max(1), Ordering::Relaxed);
    }

    /// The guest TSC at guest time `ns`.
    pub fn tsc_at(&self, ns: Ns) -> u64 {
        let ticks = ((u128::from(ns) * u128::from(self.tsc_hz())) / 1_000_000_000) as u64;
        ticks.wrapping_add(self.tsc_base.load(Ordering::Relaxed))
    }

    /// Guest time at which the TSC reaches `tsc` (0 for a TSC before guest time 0).
    pub fn ns_at_tsc(&self, tsc: u64) -> Ns {
        let ticks = tsc.saturating_sub(self.tsc_base.load(Ordering::Relaxed));
        let ns = (u128::from(ticks) * 1_000_000_000) / u128::from(self.tsc_hz());
        ns.min(u128::from(u64::MAX)) as u64
    }

    /// The backend could not set the guest TSC: it reads `observed` at guest time `now`.
    /// Re-anchor so that [`GuestClock::tsc_at`] matches what the guest sees.
    pub fn anchor_tsc(&self, observed: u64, now: Ns) {
        let ticks = ((u128::from(now) * u128::from(self.tsc_hz())) / 1_000_000_000) as u64;
        self.tsc_base
            .store(observed.wrapping_sub(ticks), Ordering::Relaxed);
    }

    /// The guest TSC now.
    pub fn tsc(&self) -> u64 {
        self.tsc_at(self.now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_and_time_convert_both_ways() {
        let c = GuestClock::new(3_000_000_000);
        assert_eq!(c.tsc_at(1_000_000_000), 3_000_000_000);
        assert_eq!(c.ns_at_tsc(3_000), 1_000);
        assert_eq!(
            c.ns_at_tsc(u64::MAX),
            (u128::from(u64::MAX) * 1_000_000_000 / 3_000_000_000) as u64
        );
        let a = c.now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(c.now() >= a + 1_000_000);
        c.anchor_tsc(5_000_000_000, 1_000_000_000);
        assert_eq!(c.tsc_at(1_000_000_000), 5_000_000_000);
        assert_eq!(c.ns_at_tsc(5_000_000_000 + 3_000), 1_000_001_000);
        assert_eq!(c.ns_at_tsc(0), 0);
        c.set_offset(1 << 40);
        assert!(c.now() >= 1 << 40);
    }

    #[test]
    fn a_frozen_clock_stands_still_and_continues_without_a_jump() {
        let c = GuestClock::new(1_000_000_000);
        c.continue_from(5_000_000_000);
        let a = c.now();
        assert!((5_000_000_000..5_100_000_000).contains(&a));
        c.freeze();
        let f = c.now();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(c.now(), f, "frozen");
        c.thaw();
        let b = c.now();
        assert!(b >= f && b - f < 20_000_000, "no jump: {f} -> {b}");
        let v = GuestClock::new_virtual(1_000_000_000);
        v.continue_from(100);
        assert_eq!(v.now(), 100);
        v.advance_to(150);
        assert_eq!(
            v.now(),
            150,
            "a restored virtual clock is advanced by the cores"
        );
    }
}
