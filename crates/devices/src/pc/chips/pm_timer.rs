//! ACPI power-management timer.
//!
//! A free-running counter clocked at 3.579545 MHz, derived purely from guest
//! time so it needs no state: the count at `now` is
//! `floor(now * 3_579_545 / 10^9)`. The standard register ([`read`]) exposes
//! the low 24 bits; [`read_ext`] gives the 32-bit value for a FADT that sets
//! TMR_VAL_EXT. TMR_STS is set whenever bit 23 (or bit 31 for the extended
//! timer) toggles; [`next_msb_toggle`] tells the VMM when that next happens.

use super::NS_PER_SEC;
use palacios_vmm::time::Ns;

/// Timer frequency in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// Conventional port of the PM timer (PM1a block + 8) on PIIX4-style chipsets.
pub const PM_TIMER_PORT: u16 = 0xB008;

fn ticks(now: Ns) -> u128 {
    u128::from(now) * u128::from(PM_TIMER_HZ) / u128::from(NS_PER_SEC)
}

/// The 24-bit timer value at `now`.
pub fn read(now: Ns) -> u32 {
    (ticks(now) & 0xFF_FFFF) as u32
}

/// The 32-bit (TMR_VAL_EXT) timer value at `now`.
pub fn read_ext(now: Ns) -> u32 {
    ticks(now) as u32
}

/// Guest time of the next toggle of the counter's top bit (bit 23 for the
/// 24-bit timer, bit 31 if `ext`), strictly after `now`, or `None` if it
/// lies beyond the range of [`Ns`].
pub fn next_msb_toggle(now: Ns, ext: bool) -> Option<Ns> {
    let half: u128 = if ext { 1 << 31 } else { 1 << 23 };
    let next = (ticks(now) / half + 1) * half;
    let t = (next * u128::from(NS_PER_SEC)).div_ceil(u128::from(PM_TIMER_HZ));
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_zero() {
        assert_eq!(read(0), 0);
        assert_eq!(read(279), 0); // one tick is ~279.4 ns
        assert_eq!(read(280), 1);
    }

    #[test]
    fn one_second_is_the_frequency() {
        assert_eq!(read(NS_PER_SEC), 3_579_545);
        assert_eq!(read_ext(NS_PER_SEC), 3_579_545);
    }

    #[test]
    fn one_millisecond() {
        assert_eq!(read(1_000_000), 3579);
    }

    #[test]
    fn monotonic_between_wraps() {
        let mut prev = 0;
        for i in 0..100_000u64 {
            let v = read(i * 997);
            assert!(v >= prev);
            prev = v;
        }
    }

    #[test]
    fn wraps_at_24_bits() {
        // 2^24 ticks take ~4.687 s.
        let wrap = (1u128 << 24) * 1_000_000_000 / 3_579_545 + 1;
        let t = wrap as u64;
        assert!(read(t - 1) > 0xFF_FF00);
        assert!(read(t) < 0x10);
        assert!(read(u64::MAX) <= 0xFF_FFFF);
        assert_eq!(read(t), read_ext(t) & 0xFF_FFFF);
        assert!(read_ext(t) >= 1 << 24);
    }

    #[test]
    fn ext_wraps_at_32_bits() {
        let wrap = ((1u128 << 32) * 1_000_000_000).div_ceil(3_579_545) as u64;
        assert!(read_ext(wrap - 1) > 0xFFFF_FF00);
        assert_eq!(read_ext(wrap), 0);
    }

    #[test]
    fn msb_toggle_times() {
        let t = next_msb_toggle(0, false).unwrap();
        assert_eq!(read(t - 1), 0x7F_FFFF);
        assert_eq!(read(t), 0x80_0000);
        let t2 = next_msb_toggle(t, false).unwrap();
        assert_eq!(read(t2 - 1), 0xFF_FFFF);
        assert_eq!(read(t2), 0);
        let te = next_msb_toggle(0, true).unwrap();
        assert_eq!(read_ext(te), 0x8000_0000);
        assert_eq!(read_ext(te - 1), 0x7FFF_FFFF);
    }

    #[test]
    fn extreme_times_do_not_panic() {
        let _ = read(u64::MAX);
        let _ = read_ext(u64::MAX);
        assert_eq!(next_msb_toggle(u64::MAX, false), None);
        assert!(next_msb_toggle(u64::MAX - 5_000_000_000, false).is_some());
    }
}
