//! Local APIC timer tests: one-shot, periodic, TSC-deadline, divide
//! configuration, masking.

use super::tests::{LVT_T, TSC_HZ, lapic, x2};
use super::*;

const INIT: u32 = 0x380;
const CUR: u32 = 0x390;
const DCR: u32 = 0x3e0;
const DIV1: u32 = 0xb;

#[test]
fn one_shot_counts_down_and_fires_once() {
    let mut l = lapic(0);
    l.mmio_write(DCR, DIV1, 0);
    l.mmio_write(LVT_T, 0x40, 0);
    assert_eq!(l.mmio_write(INIT, 1000, 10), vec![Action::TimerChanged]);
    assert_eq!(l.next_timer_deadline(), Some(1010));
    assert_eq!(l.mmio_read(INIT, 0), 1000);
    assert_eq!(l.mmio_read(CUR, 10), 1000);
    assert_eq!(l.mmio_read(CUR, 260), 750);
    assert_eq!(l.mmio_read(CUR, 1009), 1);
    assert!(l.timer_tick(500).is_empty(), "too early");
    assert!(!l.irr_bit(0x40));
    assert_eq!(l.timer_tick(1010), vec![Action::TimerChanged]);
    assert_eq!(l.pending_vector(), Some(0x40));
    assert_eq!(l.next_timer_deadline(), None);
    assert_eq!(l.mmio_read(CUR, 5000), 0);
    assert!(l.timer_tick(9000).is_empty(), "one-shot fires once");
    // Writing 0 stops a running timer.
    l.mmio_write(INIT, 500, 10_000);
    assert_eq!(l.mmio_write(INIT, 0, 10_100), vec![Action::TimerChanged]);
    assert_eq!(l.next_timer_deadline(), None);
    assert_eq!(l.mmio_read(CUR, 10_200), 0);
}

#[test]
fn divide_configuration_scales_the_count() {
    let mut l = lapic(0);
    l.mmio_write(LVT_T, 0x41, 0);
    assert_eq!(l.mmio_read(DCR, 0), 0, "divide by 2 at reset");
    l.mmio_write(INIT, 100, 0);
    assert_eq!(l.next_timer_deadline(), Some(200));
    assert_eq!(l.mmio_read(CUR, 50), 75);
    // Divide by 128 (0b1010).
    l.mmio_write(DCR, 0xa, 0);
    assert_eq!(l.mmio_read(DCR, 0), 0xa);
    l.mmio_write(INIT, 10, 1000);
    assert_eq!(l.next_timer_deadline(), Some(1000 + 1280));
    assert_eq!(l.mmio_read(CUR, 1000 + 128 * 3), 7);
    // Changing the divisor mid-count continues from the current count.
    l.mmio_write(DCR, DIV1, 1000 + 128 * 4);
    assert_eq!(l.mmio_read(CUR, 1000 + 128 * 4), 6);
    assert_eq!(l.next_timer_deadline(), Some(1000 + 128 * 4 + 6));
    // Reserved bits of the DCR are not kept.
    l.mmio_write(DCR, 0xffff_fff4, 2000);
    assert_eq!(l.mmio_read(DCR, 0), 0);
}

#[test]
fn periodic_rearms_and_coalesces() {
    let mut l = lapic(0);
    l.mmio_write(DCR, DIV1, 0);
    l.mmio_write(LVT_T, 0x2_0050, 0);
    l.mmio_write(INIT, 100, 0);
    assert_eq!(l.next_timer_deadline(), Some(100));
    assert_eq!(l.timer_tick(100), vec![Action::TimerChanged]);
    assert!(l.irr_bit(0x50));
    assert_eq!(l.next_timer_deadline(), Some(200));
    assert_eq!(l.mmio_read(CUR, 130), 70);
    l.acknowledge(0x50);
    l.mmio_write(0xb0, 0, 0);
    // Late tick: several periods missed, one interrupt, phase preserved.
    assert_eq!(l.timer_tick(455), vec![Action::TimerChanged]);
    assert!(l.irr_bit(0x50));
    assert_eq!(l.next_timer_deadline(), Some(500));
    assert_eq!(l.mmio_read(CUR, 455), 45);
    // Current count wraps in periodic mode even before the tick.
    assert_eq!(l.mmio_read(CUR, 620), 80);
    assert_eq!(l.mmio_read(0x320, 0), 0x2_0050);
}

#[test]
fn masked_timer_counts_but_does_not_interrupt() {
    let mut l = lapic(0);
    l.mmio_write(DCR, DIV1, 0);
    l.mmio_write(LVT_T, 0x3_0060, 0); // masked, periodic
    l.mmio_write(INIT, 10, 0);
    assert_eq!(l.mmio_read(CUR, 4), 6);
    assert_eq!(l.timer_tick(10), vec![Action::TimerChanged]);
    assert!(!l.irr_bit(0x60));
    assert_eq!(l.next_timer_deadline(), Some(20));
    // Unmask: the next expiry is delivered.
    l.mmio_write(LVT_T, 0x2_0060, 15);
    l.timer_tick(20);
    assert!(l.irr_bit(0x60));
    // Software disable masks the timer; it keeps running.
    l.mmio_write(0xf0, 0xff, 21);
    l.acknowledge(0x60);
    l.timer_tick(30);
    assert!(!l.irr_bit(0x60));
    assert_eq!(l.next_timer_deadline(), Some(40));
}

#[test]
fn tsc_deadline_mode() {
    let mut l = lapic(0);
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
    // Outside TSC-deadline mode the MSR ignores writes.
    assert_eq!(l.msr_write(MSR_TSC_DEADLINE, 5000, 0, 0), Ok(Vec::new()));
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
    l.mmio_write(LVT_T, 0x4_0070, 0);
    // Initial count is ignored in TSC-deadline mode.
    assert!(l.mmio_write(INIT, 1000, 0).is_empty());
    assert_eq!(l.mmio_read(INIT, 0), 0);
    assert_eq!(l.mmio_read(CUR, 0), 0);
    // 2 GHz TSC: 4000 ticks ahead = 2000 ns.
    let acts = l.msr_write(MSR_TSC_DEADLINE, 14_000, 1000, 10_000).unwrap();
    assert_eq!(acts, vec![Action::TimerChanged]);
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(14_000));
    assert_eq!(l.next_timer_deadline(), Some(3000));
    assert!(l.timer_tick(2999).is_empty());
    assert_eq!(l.timer_tick(3000), vec![Action::TimerChanged]);
    assert!(l.irr_bit(0x70));
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(0), "fired: disarmed");
    assert_eq!(l.next_timer_deadline(), None);
    // Odd conversion rounds up, never early: 1 TSC tick at 2 GHz = 0.5 ns.
    l.msr_write(MSR_TSC_DEADLINE, 100_001, 0, 100_000).unwrap();
    assert_eq!(l.next_timer_deadline(), Some(1));
    // Writing 0 disarms.
    assert_eq!(
        l.msr_write(MSR_TSC_DEADLINE, 0, 0, 0),
        Ok(vec![Action::TimerChanged])
    );
    assert_eq!(l.next_timer_deadline(), None);
    // A deadline in the past fires immediately.
    l.acknowledge(0x70);
    l.mmio_write(0xb0, 0, 0);
    assert!(
        l.msr_write(MSR_TSC_DEADLINE, 50, 7000, 60)
            .unwrap()
            .is_empty()
    );
    assert!(l.irr_bit(0x70));
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
    // Leaving TSC-deadline mode disarms.
    l.msr_write(MSR_TSC_DEADLINE, 1 << 40, 0, 0).unwrap();
    assert!(l.next_timer_deadline().is_some());
    assert_eq!(l.mmio_write(LVT_T, 0x0_0070, 0), vec![Action::TimerChanged]);
    assert_eq!(l.next_timer_deadline(), None);
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
    // Huge deadlines saturate instead of overflowing.
    l.mmio_write(LVT_T, 0x4_0070, 0);
    l.msr_write(MSR_TSC_DEADLINE, u64::MAX, u64::MAX - 1, 0)
        .unwrap();
    assert_eq!(l.next_timer_deadline(), Some(u64::MAX));
}

#[test]
fn tsc_deadline_in_x2apic_mode_and_reserved_mode() {
    let mut l = x2(3);
    l.msr_write(0x832, 0x4_0080, 0, 0).unwrap();
    l.msr_write(MSR_TSC_DEADLINE, 2_000_000, 0, 0).unwrap();
    assert_eq!(l.next_timer_deadline(), Some(1_000_000));
    l.timer_tick(1_000_000);
    assert_eq!(l.pending_vector(), Some(0x80));
    // Reserved timer mode 11: never fires.
    l.msr_write(0x832, 0x6_0080, 0, 0).unwrap();
    l.msr_write(0x838, 10, 0, 0).unwrap();
    assert_eq!(l.next_timer_deadline(), None);
    assert!(l.timer_tick(u64::MAX).is_empty());
    assert_eq!(l.msr_read(0x839, 5), Ok(0));
    let _ = TSC_HZ;
}

#[test]
fn one_shot_to_periodic_switch_keeps_counting() {
    let mut l = lapic(0);
    l.mmio_write(DCR, DIV1, 0);
    l.mmio_write(LVT_T, 0x90, 0);
    l.mmio_write(INIT, 100, 0);
    assert!(l.mmio_write(LVT_T, 0x2_0090, 50).is_empty());
    assert_eq!(l.mmio_read(CUR, 50), 50);
    l.timer_tick(100);
    assert_eq!(l.next_timer_deadline(), Some(200), "now periodic");
}
