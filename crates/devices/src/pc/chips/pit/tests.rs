//! Unit tests for the 8254 PIT model.

use super::*;

/// Guest time at which exactly `k` clocks have elapsed since time 0.
fn t(k: u64) -> Ns {
    ns_for_ticks(k) as Ns
}

fn read16(p: &mut Pit, port: u16, now: Ns) -> u16 {
    let lo = p.read(port, now);
    u16::from_le_bytes([lo, p.read(port, now)])
}

fn program(p: &mut Pit, ch: u8, mode: u8, count: u16, now: Ns) {
    p.write(0x43, ch << 6 | 0x30 | mode << 1, now);
    p.write(0x40 + u16::from(ch), count as u8, now);
    p.write(0x40 + u16::from(ch), (count >> 8) as u8, now);
}

#[test]
fn power_on_state() {
    let mut p = Pit::new();
    assert_eq!(p.next_irq0(0), None);
    assert_eq!(p.read(0x43, 0), 0xff);
    assert_eq!(p.read(0x44, 0), 0xff);
    assert!(p.out(0, 1_000_000) && p.out(2, 0));
    assert!(!p.out(3, 0));
    assert_eq!(read16(&mut p, 0x40, 5_000_000), 0);
    assert_eq!(p.read(0x61, 0) & 0x0f, 0);
}

#[test]
fn tick_conversion_round_trips() {
    for k in [0, 1, 2, 1193, 65_536, 1 << 40] {
        assert_eq!(ticks_in(t(k)), k);
        if k > 0 {
            assert_eq!(ticks_in(t(k) - 1), k - 1);
        }
    }
}

#[test]
fn mode2_rate_generator_1ms() {
    let mut p = Pit::new();
    let t0 = 5_000;
    program(&mut p, 0, 2, 1193, t0);
    let first = p.next_irq0(t0).unwrap();
    assert_eq!(first, t0 + t(1193));
    assert!((first - t0).abs_diff(1_000_000) < 1_000);
    // Edges stay on the grid (no accumulated rounding).
    let mut now = first;
    for k in 2..=1000u64 {
        now = p.next_irq0(now).unwrap();
        assert_eq!(now, t0 + t(1193 * k));
    }
    assert!((now - t0).abs_diff(1_000_000_000) < 1_000_000);
    // OUT is low for exactly the last clock of each period.
    assert!(p.out(0, t0 + t(1191)));
    assert!(!p.out(0, t0 + t(1192)));
    assert!(p.out(0, t0 + t(1193)));
    assert_eq!(read16(&mut p, 0x40, t0), 1193);
    assert_eq!(read16(&mut p, 0x40, t0 + t(1192)), 1);
    assert_eq!(read16(&mut p, 0x40, t0 + t(1193)), 1193);
}

#[test]
fn lost_ticks_are_coalesced() {
    let mut p = Pit::new();
    program(&mut p, 0, 2, 1000, 0);
    // The VMM wakes up 3.5 periods late: next deadline is the next grid
    // point, not the missed ones.
    let late = t(4500);
    assert_eq!(p.next_irq0(late), Some(t(5000)));
    assert_eq!(p.next_irq0(t(5000)), Some(t(6000)));
    assert_eq!(p.next_irq0(t(5000) - 1), Some(t(5000)));
}

#[test]
fn mode0_fires_once() {
    let mut p = Pit::new();
    p.write(0x43, 0x30, 0);
    assert!(!p.out(0, 0), "mode 0 control word drives OUT low");
    p.write(0x40, 100, 10);
    assert!(!p.out(0, 10), "first byte: still low, not counting");
    assert_eq!(p.next_irq0(10), None);
    p.write(0x40, 0, 20);
    assert_eq!(p.next_irq0(20), Some(20 + t(100)));
    assert!(!p.out(0, 20 + t(100) - 1));
    assert!(p.out(0, 20 + t(100)));
    assert_eq!(p.next_irq0(20 + t(100)), None);
    assert_eq!(p.next_irq0(20 + t(1_000_000)), None);
    // Counter wraps after terminal count; OUT stays high.
    assert_eq!(read16(&mut p, 0x40, 20 + t(101)), 0xffff);
    assert!(p.out(0, 20 + t(70_000)));
    // A new count restarts: OUT low again.
    p.write(0x40, 10, t(200_000));
    p.write(0x40, 0, t(200_000));
    assert!(!p.out(0, t(200_000)));
    assert_eq!(p.next_irq0(t(200_000)), Some(t(200_000) + t(10)));
}

#[test]
fn counter_latch_freezes_value() {
    let mut p = Pit::new();
    program(&mut p, 0, 2, 5000, 0);
    p.write(0x43, 0x00, t(1000));
    p.write(0x43, 0x00, t(2000)); // ignored: latch still unread
    assert_eq!(p.read(0x40, t(3000)), (4000u16 & 0xff) as u8);
    assert_eq!(p.read(0x40, t(4000)), (4000u16 >> 8) as u8);
    assert_eq!(read16(&mut p, 0x40, t(4000)), 1000, "latch released");
    // Lobyte-only access latches a single byte.
    p.write(0x43, 0x14, t(0));
    p.write(0x40, 200, t(0));
    p.write(0x43, 0x00, t(50));
    assert_eq!(p.read(0x40, t(150)), 150);
    assert_eq!(p.read(0x40, t(150)), 50);
}

#[test]
fn read_back_status_and_count() {
    let mut p = Pit::new();
    p.write(0x43, 0xb0, 0); // ch2, word, mode 0, binary
    // Status right after the control word: OUT low, null count.
    p.write(0x43, 0xe8, 0); // read-back status of channel 2
    assert_eq!(p.read(0x42, 0), 0x70);
    p.write(0x42, 0x34, 0);
    p.write(0x42, 0x12, 0);
    p.write(0x61, 0x01, t(10)); // gate on
    p.write(0x43, 0xc8, t(10) + t(0x1234)); // count + status of ch2
    assert_eq!(p.read(0x42, t(0x2000)), 0xb0, "OUT high, count loaded");
    assert_eq!(
        read16(&mut p, 0x42, t(0x3000)),
        0,
        "latched at terminal count"
    );
    // Several channels at once; BCD/mode/RW fields.
    p.write(0x43, 0x17, 0); // ch0 lobyte, mode 3, BCD
    p.write(0x43, 0x6a, 0); // ch1 hibyte, mode 5 (mode bits kept)
    p.write(0x43, 0xe6, 0); // status of ch0 and ch1
    assert_eq!(p.read(0x40, 0), 0xd7);
    assert_eq!(p.read(0x41, 0), 0xea);
    // Status-only latch does not disturb a latched count.
    program(&mut p, 0, 2, 300, 0);
    p.write(0x43, 0xc2, t(100)); // count + status ch0
    p.write(0x43, 0xe2, t(200)); // status again: ignored (unread)
    assert_eq!(p.read(0x40, t(250)), 0xb4);
    assert_eq!(read16(&mut p, 0x40, t(250)), 200);
}

#[test]
fn null_count_until_mode2_switch() {
    let mut p = Pit::new();
    program(&mut p, 0, 2, 1000, 0);
    program_count_only(&mut p, 500, t(300));
    p.write(0x43, 0xe2, t(300));
    assert_eq!(p.read(0x40, t(300)) & 0x40, 0x40);
    // Current period finishes with the old count.
    assert_eq!(p.next_irq0(t(300)), Some(t(1000)));
    assert_eq!(p.next_irq0(t(1000)), Some(t(1500)));
    assert_eq!(read16(&mut p, 0x40, t(1100)), 400);
    p.write(0x43, 0xe2, t(1100));
    assert_eq!(p.read(0x40, t(1100)) & 0x40, 0);
}

fn program_count_only(p: &mut Pit, count: u16, now: Ns) {
    p.write(0x40, count as u8, now);
    p.write(0x40, (count >> 8) as u8, now);
}

#[test]
fn bcd_counting() {
    let mut p = Pit::new();
    p.write(0x43, 0x31, 0); // ch0 word, mode 0, BCD
    program_count_only(&mut p, 0x0100, 0);
    assert_eq!(read16(&mut p, 0x40, t(10)), 0x0090);
    assert_eq!(read16(&mut p, 0x40, t(99)), 0x0001);
    assert_eq!(read16(&mut p, 0x40, t(101)), 0x9999, "wraps modulo 10000");
    assert_eq!(p.next_irq0(0), Some(t(100)));
    // Count 0 in BCD means 10000.
    program_count_only(&mut p, 0, 0);
    assert_eq!(read16(&mut p, 0x40, 0), 0);
    assert_eq!(read16(&mut p, 0x40, t(1)), 0x9999);
    assert_eq!(p.next_irq0(0), Some(t(10_000)));
    // Malformed digits never panic.
    program_count_only(&mut p, 0xffff, 0);
    let _ = read16(&mut p, 0x40, t(3));
}

#[test]
fn lobyte_and_hibyte_only_access() {
    let mut p = Pit::new();
    p.write(0x43, 0x54, 0); // ch1 lobyte, mode 2
    p.write(0x41, 0x10, 0);
    assert_eq!(p.read(0x41, t(1)), 0x0f);
    assert_eq!(p.read(0x41, t(2)), 0x0e, "every read is the low byte");
    p.write(0x43, 0x64, 0); // ch1 hibyte, mode 2
    p.write(0x41, 0x02, 0); // count 0x200
    assert_eq!(p.read(0x41, t(1)), 0x01);
    assert_eq!(p.read(0x41, 0), 0x02);
}

#[test]
fn word_read_and_write_flip_flops_are_independent() {
    let mut p = Pit::new();
    p.write(0x43, 0x34, 0);
    p.write(0x40, 0x00, 0);
    assert_eq!(p.read(0x40, 0), 0x00, "low byte of idle counter");
    p.write(0x40, 0x10, 0); // completes 0x1000 despite the read
    assert_eq!(p.read(0x40, t(1)), 0x0f, "read flip-flop: high byte");
    assert_eq!(p.read(0x40, t(1)), 0xff, "low byte of 0x0fff");
    assert_eq!(p.read(0x40, t(1)), 0x0f);
}

#[test]
fn channel2_gate_and_out2_calibration_pattern() {
    let mut p = Pit::new();
    // Gate off, speaker off; mode 0 count 0xffff.
    let v = p.read(0x61, 0) & !0x03;
    p.write(0x61, v, 0);
    p.write(0x43, 0xb0, 0);
    p.write(0x42, 0xff, 0);
    p.write(0x42, 0xff, 0);
    assert_eq!(p.read(0x61, t(10)) & 0x20, 0);
    assert_eq!(read16(&mut p, 0x42, t(5000)), 0xffff, "gate low holds");
    // Gate on at t0, then poll bit 5.
    let t0 = t(6000);
    p.write(0x61, 0x01, t0);
    assert_eq!(p.read(0x61, t0) & 0x21, 0x01);
    assert_eq!(read16(&mut p, 0x42, t0 + t(0x1000)), 0xefff);
    let mut now = t0;
    let mut polls = 0;
    while p.read(0x61, now) & 0x20 == 0 {
        now += 10_000;
        polls += 1;
        assert!(polls < 10_000);
    }
    assert!(now >= t0 + t(0xffff) && now < t0 + t(0xffff) + 10_000);
    // The MSB-polling pattern (quick_pit_calibrate) sees a decreasing MSB.
    program(&mut p, 2, 0, 0xffff, 0);
    let msb = |p: &mut Pit, n| read16(p, 0x42, n) >> 8;
    assert_eq!(msb(&mut p, t(256)), 0xfe);
    assert_eq!(msb(&mut p, t(512)), 0xfd);
}

#[test]
fn mode0_gate_low_pauses() {
    let mut p = Pit::new();
    p.write(0x61, 0x01, 0);
    program(&mut p, 2, 0, 1000, 0);
    p.write(0x61, 0x00, t(400));
    assert_eq!(read16(&mut p, 0x42, t(900)), 600);
    assert!(!p.out(2, t(5000)));
    let t1 = t(5000);
    p.write(0x61, 0x01, t1);
    assert!(!p.out(2, t1 + t(599)));
    assert!(p.out(2, t1 + t(600)));
    assert_eq!(read16(&mut p, 0x42, t1 + t(100)), 500);
}

#[test]
fn mode3_square_wave_duty_cycle() {
    let mut p = Pit::new();
    for (n, high, values) in [(5u16, 3u64, [5u16, 4, 2, 5, 2]), (4, 2, [4, 2, 4, 2, 4])] {
        program(&mut p, 0, 3, n, 0);
        let n = u64::from(n);
        for k in 0..3 * n {
            assert_eq!(p.out(0, t(k)), k % n < high, "n={n} k={k}");
        }
        for (k, v) in values.iter().enumerate() {
            assert_eq!(read16(&mut p, 0x40, t(k as u64)), *v, "n={n} k={k}");
        }
        assert_eq!(p.next_irq0(0), Some(t(n)));
    }
    // Mode 7 aliases mode 3; count 1 behaves like 2.
    p.write(0x43, 0x3e, 0);
    program_count_only(&mut p, 1, 0);
    assert!(p.out(0, 0) && !p.out(0, t(1)) && p.out(0, t(2)));
    p.write(0x43, 0xe2, 0);
    assert_eq!(p.read(0x40, 0) & 0x0e, 0x0e, "status reports mode 7");
}

#[test]
fn count_zero_means_65536() {
    let mut p = Pit::new();
    for mode in 0..=5u8 {
        program(&mut p, 0, mode, 0, 0);
        let _ = read16(&mut p, 0x40, t(12_345));
        let _ = p.out(0, t(12_345));
    }
    program(&mut p, 0, 2, 0, 0);
    assert_eq!(p.next_irq0(0), Some(t(65_536)));
    assert_eq!(read16(&mut p, 0x40, t(1)), 0xffff);
    program(&mut p, 0, 3, 0, 0);
    assert!(p.out(0, t(32_767)) && !p.out(0, t(32_768)));
    // Mode 6 aliases mode 2.
    p.write(0x43, 0x3c, 0);
    program_count_only(&mut p, 0, 0);
    assert_eq!(p.next_irq0(t(1)), Some(t(65_536)));
}

#[test]
fn mode4_software_strobe() {
    let mut p = Pit::new();
    program(&mut p, 0, 4, 50, 0);
    assert!(p.out(0, t(49)));
    assert!(!p.out(0, t(50)));
    assert!(p.out(0, t(51)));
    assert_eq!(p.next_irq0(0), Some(t(51)));
    assert_eq!(p.next_irq0(t(51)), None);
}

#[test]
fn modes_1_and_5_need_a_gate_trigger() {
    let mut p = Pit::new();
    // Channel 0's gate is tied high: no rising edge, no trigger.
    program(&mut p, 0, 1, 10, 0);
    assert_eq!(p.next_irq0(0), None);
    assert!(p.out(0, t(100)));
    // Channel 2 mode 1: trigger, OUT low for n clocks, retrigger.
    program(&mut p, 2, 1, 100, 0);
    assert!(p.out(2, t(10)));
    p.write(0x61, 0x01, t(10));
    assert!(!p.out(2, t(10)));
    assert_eq!(read16(&mut p, 0x42, t(30)), 80);
    p.write(0x61, 0x00, t(50)); // gate low does not stop mode 1
    p.write(0x61, 0x01, t(60)); // retrigger
    assert!(!p.out(2, t(159)));
    assert!(p.out(2, t(160)));
    // Mode 5: strobe n clocks after the trigger.
    p.write(0x61, 0x00, 0);
    program(&mut p, 2, 5, 20, 0);
    p.write(0x61, 0x01, t(5));
    assert!(p.out(2, t(24)) && !p.out(2, t(25)) && p.out(2, t(26)));
}

#[test]
fn mode2_gate_low_forces_out_high_and_rising_reloads() {
    let mut p = Pit::new();
    p.write(0x61, 0x01, 0);
    program(&mut p, 2, 2, 100, 0);
    assert!(!p.out(2, t(99)));
    p.write(0x61, 0x00, t(99));
    assert!(p.out(2, t(99)), "gate low forces OUT high");
    assert_eq!(read16(&mut p, 0x42, t(500)), 1, "counting suspended");
    let t1 = t(1000);
    p.write(0x61, 0x01, t1);
    assert_eq!(read16(&mut p, 0x42, t1), 100, "reloaded");
    assert!(p.out(2, t1 + t(98)));
    assert!(!p.out(2, t1 + t(99)));
    assert!(p.out(2, t1 + t(100)));
}

#[test]
fn port61_bits() {
    let mut p = Pit::new();
    p.write(0x61, 0xff, 0);
    assert_eq!(p.read(0x61, 0) & 0xcf, 0x0f);
    let a = p.read(0x61, 0) & 0x10;
    let b = p.read(0x61, REFRESH_NS) & 0x10;
    assert_ne!(a, b, "refresh bit toggles");
    assert_eq!(p.read(0x61, 2 * REFRESH_NS) & 0x10, a);
    p.write(0x61, 0x02, 0);
    assert_eq!(p.read(0x61, 0) & 0x03, 0x02);
}

#[test]
fn random_guest_input_never_panics() {
    let mut p = Pit::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let ports = [0x40u16, 0x41, 0x42, 0x43, 0x43, 0x61, 0x60];
    let times = [
        0u64,
        1,
        838,
        1_000_000,
        u64::MAX / 2,
        u64::MAX - 1,
        u64::MAX,
    ];
    for _ in 0..50_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let now = if x & 1 == 0 {
            times[(x >> 1) as usize % 7]
        } else {
            x >> 3
        };
        let port = ports[(x >> 20) as usize % 7];
        match (x >> 30) % 4 {
            0 | 1 => p.write(port, (x >> 40) as u8, now),
            2 => {
                p.read(port, now);
            }
            _ => {
                let _ = p.out((x >> 40) as usize % 4, now);
                if let Some(e) = p.next_irq0(now) {
                    assert!(e > now);
                }
            }
        }
    }
}
