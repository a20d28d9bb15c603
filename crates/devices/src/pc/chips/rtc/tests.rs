use super::*;

const S: u64 = NS_PER_SEC;
const MS: u64 = 1_000_000;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn rd(rtc: &mut Rtc, idx: u8, now: Ns) -> u8 {
    rtc.write(RTC_INDEX_PORT, idx, now);
    rtc.read(RTC_DATA_PORT, now)
}

fn wr(rtc: &mut Rtc, idx: u8, v: u8, now: Ns) {
    rtc.write(RTC_INDEX_PORT, idx, now);
    rtc.write(RTC_DATA_PORT, v, now);
}

/// Friday 2024-03-15 13:45:30 UTC.
fn t0() -> i64 {
    unix_from_civil(2024, 3, 15, 13, 45, 30)
}

fn time_regs(rtc: &mut Rtc, now: Ns) -> [u8; 8] {
    [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|i| rd(rtc, i, now))
}

#[test]
fn bcd_default_time_and_status_registers() {
    let mut rtc = Rtc::new(t0(), 128 * MIB, 0);
    assert_eq!(
        time_regs(&mut rtc, 0),
        [0x30, 0x45, 0x13, 0x06, 0x15, 0x03, 0x24, 0x20]
    );
    assert_eq!(rd(&mut rtc, 0x0A, 0), 0x26);
    assert_eq!(rd(&mut rtc, 0x0B, 0), 0x02);
    assert_eq!(rd(&mut rtc, 0x0C, 0), 0x00);
    assert_eq!(rd(&mut rtc, 0x0D, 0), 0x80);
}

#[test]
fn binary_mode() {
    let mut rtc = Rtc::new(t0(), 128 * MIB, 0);
    wr(&mut rtc, 0x0B, B_24H | B_DM, 0);
    assert_eq!(time_regs(&mut rtc, 0), [30, 45, 13, 6, 15, 3, 24, 20]);
    // Time keeps running in binary mode too.
    assert_eq!(rd(&mut rtc, 0x00, 45 * S), 15);
    assert_eq!(rd(&mut rtc, 0x02, 45 * S), 46);
}

#[test]
fn twelve_hour_mode_pm_bit() {
    let mut rtc = Rtc::new(t0(), 128 * MIB, 0);
    wr(&mut rtc, 0x0B, 0x00, 0); // BCD, 12-hour
    assert_eq!(rd(&mut rtc, 0x04, 0), 0x81); // 1 PM
    wr(&mut rtc, 0x0B, B_DM, 0); // binary, 12-hour
    assert_eq!(rd(&mut rtc, 0x04, 0), 0x81);

    let midnight = unix_from_civil(2024, 1, 1, 0, 0, 0);
    let mut rtc = Rtc::new(midnight, 0, 0);
    wr(&mut rtc, 0x0B, 0x00, 0);
    assert_eq!(rd(&mut rtc, 0x04, 0), 0x12); // 12 AM
    assert_eq!(rd(&mut rtc, 0x04, 11 * 3600 * S), 0x11); // 11 AM
    assert_eq!(rd(&mut rtc, 0x04, 12 * 3600 * S), 0x92); // 12 PM
    assert_eq!(rd(&mut rtc, 0x04, 23 * 3600 * S), 0x91); // 11 PM

    // Setting 8 PM in 12-hour mode reads back as 20 in 24-hour mode.
    let now = 23 * 3600 * S;
    wr(&mut rtc, 0x0B, B_SET, now);
    wr(&mut rtc, 0x04, 0x88, now);
    wr(&mut rtc, 0x0B, 0x00, now);
    assert_eq!(rd(&mut rtc, 0x04, now), 0x88);
    wr(&mut rtc, 0x0B, B_24H, now);
    assert_eq!(rd(&mut rtc, 0x04, now), 0x20);
}

#[test]
fn time_advances_and_rolls_over_century() {
    let mut rtc = Rtc::new(t0(), 128 * MIB, 0);
    assert_eq!(rd(&mut rtc, 0x00, 61 * S - 1), 0x30);
    assert_eq!(rd(&mut rtc, 0x00, 61 * S), 0x31);
    assert_eq!(rd(&mut rtc, 0x02, 61 * S), 0x46);

    let mut rtc = Rtc::new(unix_from_civil(2099, 12, 31, 23, 59, 59), 0, 0);
    assert_eq!(
        time_regs(&mut rtc, 0),
        [0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x99, 0x20]
    );
    // 2100-01-01 is a Friday.
    assert_eq!(
        time_regs(&mut rtc, S),
        [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]
    );
}

#[test]
fn register_c_read_clears_irqf() {
    let mut rtc = Rtc::new(t0(), 128 * MIB, 0);
    wr(&mut rtc, 0x0A, 0x20, 0); // periodic off, so only UF is involved
    wr(&mut rtc, 0x0B, B_24H | B_UIE, 0);
    assert_eq!(rtc.next_event(0), Some(S));
    rtc.tick(S - 1);
    assert!(!rtc.irq_level());
    rtc.tick(S);
    assert!(rtc.irq_level());
    assert_eq!(rd(&mut rtc, 0x0C, S), C_IRQF | C_UF);
    assert!(!rtc.irq_level());
    assert_eq!(rd(&mut rtc, 0x0C, S), 0);

    // Flags are set without their enable (polling), but IRQF is not.
    wr(&mut rtc, 0x0B, B_24H, S);
    wr(&mut rtc, 0x0A, 0x26, S);
    assert_eq!(rd(&mut rtc, 0x0C, S + 2 * MS), C_PF);
    assert!(!rtc.irq_level());
    // Enabling a source whose flag is already pending raises IRQF.
    rtc.tick(S + 4 * MS);
    wr(&mut rtc, 0x0B, B_24H | B_PIE, S + 4 * MS);
    assert!(rtc.irq_level());
    wr(&mut rtc, 0x0B, B_24H, S + 4 * MS);
    assert!(!rtc.irq_level());
}

fn count_periodic(rate: u8, dur: Ns) -> usize {
    let mut rtc = Rtc::new(t0(), 0, 0);
    wr(&mut rtc, 0x0A, 0x20 | rate, 0);
    wr(&mut rtc, 0x0B, B_24H | B_PIE, 0);
    let mut now = 0;
    let mut n = 0;
    while let Some(t) = rtc.next_event(now) {
        assert!(t > now);
        if t > dur {
            break;
        }
        rtc.tick(t);
        assert!(rtc.irq_level());
        assert_eq!(
            rd(&mut rtc, 0x0C, t) & (C_IRQF | C_PF | C_AF),
            C_IRQF | C_PF
        );
        n += 1;
        now = t;
    }
    n
}

#[test]
fn periodic_rates_follow_datasheet() {
    assert_eq!(count_periodic(6, S), 1024);
    assert_eq!(count_periodic(3, S), 8192);
    assert_eq!(count_periodic(1, S), 256);
    assert_eq!(count_periodic(2, S), 128);
    assert_eq!(count_periodic(15, 10 * S), 20);
    assert_eq!(count_periodic(0, S), 0);
    // Rate 6 spacing is 976.5625 µs.
    let mut rtc = Rtc::new(t0(), 0, 0);
    wr(&mut rtc, 0x0B, B_24H | B_PIE, 0);
    assert_eq!(rtc.next_event(0), Some(976_563));
    assert_eq!(rtc.next_event(976_563), Some(1_953_125));
}

#[test]
fn uip_is_computed_from_time_and_never_sticks() {
    let mut rtc = Rtc::new(t0(), 0, 0);
    assert_eq!(rd(&mut rtc, 0x0A, S - 300_000) & A_UIP, 0);
    assert_eq!(rd(&mut rtc, 0x0A, S - 100_000) & A_UIP, A_UIP);
    assert_eq!(rd(&mut rtc, 0x0A, S - 100_000) & A_UIP, A_UIP);
    assert_eq!(rd(&mut rtc, 0x0A, S) & A_UIP, 0);
    assert_eq!(rd(&mut rtc, 0x0A, S + 1) & A_UIP, 0);
    // Over one second, UIP is high for ~244 µs.
    let high = (0..1_000_000u64)
        .filter(|us| rtc.uip(2 * S + us * 1000))
        .count();
    assert!((244..=245).contains(&high), "{high}");
    // A guest polling for UIP 1 -> 0 terminates.
    let mut t = 5 * S + 10 * MS;
    while rd(&mut rtc, 0x0A, t) & A_UIP == 0 {
        t += 10_000;
    }
    while rd(&mut rtc, 0x0A, t) & A_UIP != 0 {
        t += 10_000;
    }
    assert_eq!(rd(&mut rtc, 0x00, t), 0x36);
    // UIP reads 0 while SET is held.
    wr(&mut rtc, 0x0B, B_SET | B_24H, t);
    assert_eq!(rd(&mut rtc, 0x0A, 7 * S - 100_000) & A_UIP, 0);
}

#[test]
fn set_bit_freezes_time_and_guest_time_continues() {
    let mut rtc = Rtc::new(t0(), 0, 0);
    wr(&mut rtc, 0x0B, B_SET | B_24H | B_UIE, S / 2);
    assert_eq!(rd(&mut rtc, 0x0B, S / 2), B_SET | B_24H); // SET clears UIE
    assert_eq!(rd(&mut rtc, 0x00, 10 * S), 0x30);
    assert_eq!(rtc.next_event(10 * S), None);
    // No update events while SET; the periodic flag keeps running.
    assert_eq!(rd(&mut rtc, 0x0C, 10 * S), C_PF);
    // Set 2030-06-01 08:00:00.
    for (idx, v) in [
        (0, 0x00),
        (2, 0x00),
        (4, 0x08),
        (6, 0x07),
        (7, 0x01),
        (8, 0x06),
        (9, 0x30),
    ] {
        wr(&mut rtc, idx, v, 10 * S);
    }
    assert_eq!(rd(&mut rtc, 0x04, 10 * S), 0x08);
    wr(&mut rtc, 0x0B, B_24H, 10 * S + S / 4);
    assert_eq!(
        time_regs(&mut rtc, 10 * S + S / 4),
        [0, 0, 8, 7, 1, 6, 0x30, 0x20]
    );
    // The sub-second phase is preserved: the next update is at 11 s.
    assert_eq!(rd(&mut rtc, 0x00, 11 * S - 1), 0x00);
    assert_eq!(rd(&mut rtc, 0x00, 11 * S), 0x01);
    assert_eq!(rd(&mut rtc, 0x02, 71 * S), 0x01);
}

#[test]
fn memory_size_fields() {
    let rtc_bytes = |ram: u64| {
        let mut rtc = Rtc::new(0, ram, 0);
        let mut all = [0u8; 128];
        for (i, b) in all.iter_mut().enumerate() {
            if i >= 0x0E {
                *b = rd(&mut rtc, i as u8, 0);
            }
        }
        all
    };
    let c = rtc_bytes(128 * MIB);
    assert_eq!((c[0x15], c[0x16]), (0x80, 0x02)); // 640 KiB
    assert_eq!((c[0x17], c[0x18]), (0xFF, 0xFF)); // 127 MiB capped
    assert_eq!((c[0x30], c[0x31]), (0xFF, 0xFF));
    assert_eq!((c[0x34], c[0x35]), (0x00, 0x07)); // 112 MiB / 64 KiB = 0x700
    assert_eq!(&c[0x5B..=0x5D], &[0, 0, 0]);
    let sum: u16 = c[0x10..=0x2D].iter().map(|&b| u16::from(b)).sum();
    assert_eq!(u16::from_be_bytes([c[0x2E], c[0x2F]]), sum);

    let c = rtc_bytes(5 * GIB);
    assert_eq!((c[0x17], c[0x18]), (0xFF, 0xFF));
    assert_eq!((c[0x34], c[0x35]), (0x00, 0xBF)); // (3 GiB - 16 MiB) / 64 KiB
    assert_eq!(&c[0x5B..=0x5D], &[0x00, 0x80, 0x00]); // 2 GiB / 64 KiB = 0x8000

    let c = rtc_bytes(8 * MIB);
    assert_eq!((c[0x17], c[0x18]), (0x00, 0x1C)); // 7168 KiB
    assert_eq!((c[0x34], c[0x35]), (0, 0));
    let c = rtc_bytes(512 * 1024);
    assert_eq!((c[0x15], c[0x16]), (0x00, 0x02)); // 512 KiB
}

#[test]
fn alarm_interrupt_and_dont_care() {
    let mut rtc = Rtc::new(t0(), 0, 0);
    wr(&mut rtc, 0x0A, 0x20, 0); // periodic off
    wr(&mut rtc, 0x01, 0x35, 0);
    wr(&mut rtc, 0x03, 0x45, 0);
    wr(&mut rtc, 0x05, 0x13, 0);
    wr(&mut rtc, 0x0B, B_24H | B_AIE, 0);
    assert_eq!(rtc.next_event(0), Some(5 * S));
    rtc.tick(5 * S - 1);
    assert!(!rtc.irq_level());
    rtc.tick(5 * S);
    assert!(rtc.irq_level());
    assert_eq!(rd(&mut rtc, 0x0C, 5 * S), C_IRQF | C_AF | C_UF);
    assert_eq!(rtc.next_event(5 * S), Some((5 + 86_400) * S));
    // A long jump over the alarm still reports it.
    rtc.tick(86_500 * S);
    assert_eq!(rd(&mut rtc, 0x0C, 86_500 * S), C_IRQF | C_AF | C_UF);
    // All "don't care": every second.
    wr(&mut rtc, 0x01, 0xC0, 86_500 * S);
    wr(&mut rtc, 0x03, 0xFF, 86_500 * S);
    wr(&mut rtc, 0x05, 0xC5, 86_500 * S);
    assert_eq!(rtc.next_event(86_500 * S), Some(86_501 * S));
    // Impossible alarm value never fires.
    wr(&mut rtc, 0x01, 0x7A, 86_500 * S);
    assert_eq!(rtc.next_event(86_500 * S), None);
    // 12-hour mode: 1:45:40 PM matches only with the PM bit.
    let mut rtc = Rtc::new(t0(), 0, 0);
    wr(&mut rtc, 0x0B, B_AIE, 0);
    wr(&mut rtc, 0x01, 0x40, 0);
    wr(&mut rtc, 0x03, 0x45, 0);
    wr(&mut rtc, 0x05, 0x81, 0);
    assert_eq!(rtc.next_event(0), Some(10 * S));
}

#[test]
fn index_port_nmi_and_read_only_registers() {
    let mut rtc = Rtc::new(t0(), 0, 0);
    rtc.write(RTC_INDEX_PORT, 0x8D, 0);
    assert!(rtc.nmi_masked());
    assert_eq!(rtc.read(RTC_DATA_PORT, 0), D_VRT);
    rtc.write(RTC_DATA_PORT, 0x00, 0);
    assert_eq!(rtc.read(RTC_DATA_PORT, 0), D_VRT);
    rtc.write(RTC_INDEX_PORT, 0x0D, 0);
    assert!(!rtc.nmi_masked());
    assert_eq!(rtc.read(RTC_INDEX_PORT, 0), 0xFF);
    // Index 0xFF is masked to 0x7F: plain RAM.
    wr(&mut rtc, 0xFF, 0x5A, 0);
    assert!(rtc.nmi_masked());
    assert_eq!(rd(&mut rtc, 0x7F, 0), 0x5A);
    assert!(!rtc.nmi_masked());
    // Register C is not writable; UIP is not writable.
    wr(&mut rtc, 0x0C, 0xFF, 0);
    assert_eq!(rd(&mut rtc, 0x0C, 0), 0);
    wr(&mut rtc, 0x0A, 0xA6, 0);
    assert_eq!(rd(&mut rtc, 0x0A, 0), 0x26);
    assert_eq!(rtc.read(0x72, 0), 0xFF);
}

#[test]
fn divider_reset_delays_first_update_by_half_a_second() {
    let mut rtc = Rtc::new(t0(), 0, 0);
    wr(&mut rtc, 0x0B, B_24H | B_PIE, 0);
    wr(&mut rtc, 0x0A, 0x70 | 6, S / 3);
    assert_eq!(rtc.next_event(S / 3), None); // periodic stops in divider reset
    assert_eq!(rd(&mut rtc, 0x00, 3 * S / 2), 0x30);
    wr(&mut rtc, 0x0B, B_24H | B_UIE, 2 * S);
    wr(&mut rtc, 0x0A, 0x26, 2 * S);
    assert_eq!(rtc.next_event(2 * S), Some(2 * S + S / 2));
    assert_eq!(rd(&mut rtc, 0x00, 2 * S + S / 2 - 1), 0x30);
    assert_eq!(rd(&mut rtc, 0x00, 2 * S + S / 2), 0x31);
    assert!(rtc.irq_level());
    // The periodic phase restarts at the release.
    let mut rtc = Rtc::new(t0(), 0, 0);
    wr(&mut rtc, 0x0B, B_24H | B_PIE, 0);
    wr(&mut rtc, 0x0A, 0x76, 0);
    let release = 1_000_123;
    wr(&mut rtc, 0x0A, 0x26, release);
    assert_eq!(rtc.next_event(release), Some(release + 976_563));
}

#[test]
fn writes_while_running_adjust_single_fields() {
    let mut rtc = Rtc::new(t0(), 0, 0);
    wr(&mut rtc, 0x02, 0x10, S / 2);
    assert_eq!(time_regs(&mut rtc, S / 2)[..3], [0x30, 0x10, 0x13]);
    assert_eq!(rd(&mut rtc, 0x00, S), 0x31); // phase unchanged
    wr(&mut rtc, 0x06, 0x03, S);
    assert_eq!(rd(&mut rtc, 0x06, S), 0x03);
    assert_eq!(rd(&mut rtc, 0x06, S + 86_400 * S), 0x04);
    assert_eq!(rd(&mut rtc, 0x07, S + 86_400 * S), 0x16);
    wr(&mut rtc, 0x32, 0x19, 2 * S);
    assert_eq!(rd(&mut rtc, 0x09, 2 * S), 0x24);
    assert_eq!(rd(&mut rtc, 0x32, 2 * S), 0x19);
}

#[test]
fn random_guest_input_never_panics() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) as u32
    };
    for start in [i64::MIN, -1, 0, i64::MAX] {
        let mut rtc = Rtc::new(start, u64::MAX, 0);
        let mut now: Ns = 0;
        for _ in 0..20_000 {
            let r = next();
            now = now.saturating_add(u64::from(r % 5_000_000));
            let port = if r & 0x100 != 0 { 0x70 } else { 0x71 };
            if r & 0x200 != 0 {
                rtc.write(port, (r >> 16) as u8, now);
            } else {
                rtc.read(port, now);
            }
            if let Some(t) = rtc.next_event(now) {
                assert!(t > now);
            }
        }
        rtc.tick(u64::MAX);
        let _ = rtc.next_event(u64::MAX);
    }
}
