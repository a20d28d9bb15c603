//! Unit tests for the 8259A PIC pair model.

use super::*;

/// Initialises the pair the way a PC BIOS / Linux does.
fn pc_init(aeoi: bool) -> PicPair {
    let mut p = PicPair::new();
    let icw4 = if aeoi { 0x03 } else { 0x01 };
    for (cmd, data, base, icw3) in [(0x20, 0x21, 0x20, 0x04), (0xa0, 0xa1, 0x28, 0x02)] {
        p.write(cmd, 0x11);
        p.write(data, base);
        p.write(data, icw3);
        p.write(data, icw4);
        p.write(data, 0x00);
    }
    p
}

fn pulse(p: &mut PicPair, irq: u8) {
    p.set_irq(irq, true);
    p.set_irq(irq, false);
}

fn isr(p: &mut PicPair, cmd: u16) -> u8 {
    p.write(cmd, 0x0b);
    let v = p.read(cmd);
    p.write(cmd, 0x0a);
    v
}

#[test]
fn power_on_state_is_masked_and_quiet() {
    let mut p = PicPair::new();
    assert_eq!(p.read(0x21), 0xff);
    assert_eq!(p.read(0xa1), 0xff);
    assert_eq!(p.read(0x20), 0);
    assert_eq!(p.elcr(), 0);
    pulse(&mut p, 1);
    assert!(!p.output());
    assert_eq!(p.read(0x20), 0x02, "IRR still latches while masked");
    assert_eq!(p.acknowledge(), 7, "spurious with base 0");
}

#[test]
fn init_sequence_and_basic_delivery() {
    let mut p = pc_init(false);
    assert_eq!(p.read(0x21), 0);
    pulse(&mut p, 0);
    assert!(p.output());
    assert_eq!(p.acknowledge(), 0x20);
    assert!(!p.output());
    assert_eq!(isr(&mut p, 0x20), 0x01);
    p.write(0x20, 0x20); // non-specific EOI
    assert_eq!(isr(&mut p, 0x20), 0);
    // Edge line held high does not re-trigger.
    p.set_irq(3, true);
    assert_eq!(p.acknowledge(), 0x23);
    p.write(0x20, 0x20);
    assert!(!p.output());
    p.set_irq(3, true);
    assert!(!p.output());
    p.set_irq(3, false);
    p.set_irq(3, true);
    assert!(p.output());
}

#[test]
fn icw2_low_bits_ignored_and_single_mode_without_icw4() {
    let mut p = PicPair::new();
    p.write(0x20, 0x12); // ICW1: single, no ICW4
    p.write(0x21, 0x47); // ICW2 -> base 0x40
    p.write(0x21, 0xfe); // already OCW1 (no ICW3, no ICW4)
    assert_eq!(p.read(0x21), 0xfe);
    pulse(&mut p, 0);
    assert_eq!(p.acknowledge(), 0x40);
    // Single mode: IR2 is an ordinary input delivering base+2 itself.
    p.write(0x20, 0x20);
    p.write(0x21, 0x00);
    p.write(0xa0, 0x11);
    p.write(0xa1, 0x70);
    p.write(0xa1, 0x02);
    p.write(0xa1, 0x01);
    p.write(0xa1, 0x00);
    pulse(&mut p, 9);
    assert_eq!(p.acknowledge(), 0x42);
}

#[test]
fn icw1_with_icw4_single_mode_skips_icw3() {
    let mut p = PicPair::new();
    p.write(0x20, 0x13); // single, ICW4 needed
    p.write(0x21, 0x08);
    p.write(0x21, 0x03); // ICW4 with AEOI
    p.write(0x21, 0xf0); // OCW1
    assert_eq!(p.read(0x21), 0xf0);
    pulse(&mut p, 1);
    assert_eq!(p.acknowledge(), 0x09);
    assert_eq!(isr(&mut p, 0x20), 0, "AEOI leaves ISR clear");
}

#[test]
fn fully_nested_priority() {
    let mut p = pc_init(false);
    pulse(&mut p, 5);
    assert_eq!(p.acknowledge(), 0x25);
    pulse(&mut p, 6);
    assert!(!p.output(), "lower priority blocked by IRQ5 in service");
    pulse(&mut p, 1);
    assert!(p.output(), "higher priority preempts");
    assert_eq!(p.acknowledge(), 0x21);
    assert_eq!(isr(&mut p, 0x20), 0x22);
    p.write(0x20, 0x20); // clears IRQ1 (highest in service)
    assert_eq!(isr(&mut p, 0x20), 0x20);
    assert!(!p.output());
    p.write(0x20, 0x20);
    assert_eq!(p.acknowledge(), 0x26);
}

#[test]
fn imr_masks_and_reads_back() {
    let mut p = pc_init(false);
    p.write(0x21, 0x10);
    assert_eq!(p.read(0x21), 0x10);
    pulse(&mut p, 4);
    assert!(!p.output());
    pulse(&mut p, 7);
    assert_eq!(p.acknowledge(), 0x27);
    p.write(0x20, 0x20);
    p.write(0x21, 0x00);
    assert_eq!(p.acknowledge(), 0x24, "masked request was kept in IRR");
}

#[test]
fn cascade_delivers_slave_vector() {
    let mut p = pc_init(false);
    pulse(&mut p, 12);
    assert!(p.output());
    assert_eq!(p.acknowledge(), 0x2c);
    assert_eq!(isr(&mut p, 0x20), 0x04);
    assert_eq!(isr(&mut p, 0xa0), 0x10);
    // Slave mask blocks the cascade output.
    p.write(0xa0, 0x20);
    p.write(0x20, 0x20);
    p.write(0xa1, 0x01);
    pulse(&mut p, 8);
    assert!(!p.output());
    p.write(0xa1, 0x00);
    assert!(p.output());
    assert_eq!(p.acknowledge(), 0x28);
}

#[test]
fn two_slave_requests_are_both_delivered() {
    for aeoi in [false, true] {
        let mut p = pc_init(aeoi);
        pulse(&mut p, 10);
        pulse(&mut p, 9);
        assert_eq!(p.acknowledge(), 0x29);
        if !aeoi {
            assert!(!p.output());
            p.write(0xa0, 0x20);
            p.write(0x20, 0x20);
        }
        assert!(p.output(), "aeoi={aeoi}");
        assert_eq!(p.acknowledge(), 0x2a);
    }
}

#[test]
fn spurious_irq7_when_level_request_vanishes() {
    let mut p = pc_init(false);
    p.write(0x4d0, 0x20); // IRQ5 level
    p.set_irq(5, true);
    assert!(p.output());
    p.set_irq(5, false);
    assert!(!p.output());
    assert_eq!(p.acknowledge(), 0x27);
    assert_eq!(isr(&mut p, 0x20), 0, "no ISR bit for spurious IRQ7");
    // Masking an edge request before INTA gives the same.
    pulse(&mut p, 3);
    p.write(0x21, 0x08);
    assert_eq!(p.acknowledge(), 0x27);
}

#[test]
fn spurious_irq15_sets_master_isr2_only() {
    let mut p = pc_init(false);
    p.write(0x4d1, 0x08); // IRQ11 level
    p.set_irq(11, true);
    assert!(p.output());
    p.set_irq(11, false);
    // Master IR2 is edge-triggered and latched the slave's request.
    assert!(p.output());
    assert_eq!(p.acknowledge(), 0x2f);
    assert_eq!(isr(&mut p, 0x20), 0x04);
    assert_eq!(isr(&mut p, 0xa0), 0x00);
}

#[test]
fn level_triggered_via_elcr_redelivers_until_line_drops() {
    let mut p = pc_init(false);
    p.write(0x4d0, 0xff);
    p.write(0x4d1, 0xff);
    assert_eq!(p.read(0x4d0), 0xf8);
    assert_eq!(p.read(0x4d1), 0xde);
    assert_eq!(p.elcr(), 0xdef8);
    p.set_irq(10, true);
    assert_eq!(p.acknowledge(), 0x2a);
    p.write(0xa0, 0x20);
    p.write(0x20, 0x20);
    assert!(p.output(), "line still high");
    assert_eq!(p.acknowledge(), 0x2a);
    p.set_irq(10, false);
    p.write(0xa0, 0x20);
    p.write(0x20, 0x20);
    assert!(!p.output());
    p.write(0x20, 0x0a);
    assert_eq!(p.read(0x20), 0);
}

#[test]
fn ltim_makes_all_inputs_level() {
    let mut p = PicPair::new();
    p.write(0x20, 0x19); // LTIM, cascade, ICW4
    p.write(0x21, 0x30);
    p.write(0x21, 0x04);
    p.write(0x21, 0x01);
    p.write(0x21, 0x00);
    p.set_irq(0, true);
    p.set_irq(0, false);
    assert!(!p.output(), "level input follows the line");
    p.set_irq(0, true);
    assert_eq!(p.acknowledge(), 0x30);
    p.write(0x20, 0x20);
    assert!(p.output());
}

#[test]
fn read_isr_and_irr_select() {
    let mut p = pc_init(false);
    pulse(&mut p, 3);
    pulse(&mut p, 4);
    p.write(0x20, 0x0a);
    assert_eq!(p.read(0x20), 0x18);
    p.acknowledge();
    assert_eq!(p.read(0x20), 0x10, "still reading IRR");
    p.write(0x20, 0x0b);
    assert_eq!(p.read(0x20), 0x08);
    assert_eq!(p.read(0x20), 0x08, "selection is sticky");
    p.write(0x20, 0x08); // OCW3 with RR=0: no change
    assert_eq!(p.read(0x20), 0x08);
}

#[test]
fn poll_command() {
    let mut p = pc_init(false);
    p.write(0x20, 0x0c);
    assert_eq!(p.read(0x20), 0, "nothing pending");
    pulse(&mut p, 6);
    p.write(0x20, 0x0c);
    assert_eq!(p.read(0x21), 0x86);
    assert_eq!(isr(&mut p, 0x20), 0x40, "poll acknowledged");
    assert_eq!(p.read(0x21), 0x00, "poll is one-shot; IMR read again");
    // Slave request through the master, then poll the slave.
    p.write(0x20, 0x20);
    pulse(&mut p, 14);
    p.write(0x20, 0x0c);
    assert_eq!(p.read(0x20), 0x82);
    p.write(0xa0, 0x0c);
    assert_eq!(p.read(0xa0), 0x86);
    assert_eq!(isr(&mut p, 0xa0), 0x40);
}

#[test]
fn specific_eoi_and_set_priority() {
    let mut p = pc_init(false);
    pulse(&mut p, 3);
    pulse(&mut p, 0);
    assert_eq!(p.acknowledge(), 0x20);
    p.write(0x20, 0x63); // specific EOI for IRQ3 (not in service: no-op)
    assert_eq!(isr(&mut p, 0x20), 0x01);
    p.write(0x20, 0x60); // specific EOI IRQ0
    assert_eq!(isr(&mut p, 0x20), 0);
    p.write(0x20, 0x20); // non-specific with nothing in service: no-op
    // Set priority: IRQ4 lowest, so IRQ5 is now the highest.
    p.write(0x20, 0xc4);
    pulse(&mut p, 5);
    assert_eq!(p.acknowledge(), 0x25);
    assert!(!p.output(), "IRQ3 now below IRQ5");
    p.write(0x20, 0x20);
    assert_eq!(p.acknowledge(), 0x23);
}

#[test]
fn rotate_on_eoi_commands() {
    let mut p = pc_init(false);
    pulse(&mut p, 1);
    assert_eq!(p.acknowledge(), 0x21);
    p.write(0x20, 0xa0); // rotate on non-specific EOI: IRQ1 now lowest
    pulse(&mut p, 1);
    pulse(&mut p, 7);
    assert_eq!(p.acknowledge(), 0x27, "IRQ7 now outranks IRQ1");
    p.write(0x20, 0xe7); // rotate on specific EOI for 7: IRQ0 highest
    pulse(&mut p, 0);
    assert_eq!(p.acknowledge(), 0x20);
    p.write(0x20, 0x20);
    assert_eq!(p.acknowledge(), 0x21);
}

#[test]
fn rotate_in_aeoi_mode() {
    let mut p = pc_init(true);
    p.write(0x20, 0x80); // set rotate in AEOI
    pulse(&mut p, 3);
    assert_eq!(p.acknowledge(), 0x23);
    pulse(&mut p, 3);
    pulse(&mut p, 5);
    assert_eq!(p.acknowledge(), 0x25, "IRQ3 rotated to lowest");
    p.write(0x20, 0x00); // clear rotate in AEOI
    pulse(&mut p, 0);
    assert_eq!(p.acknowledge(), 0x20, "IRQ5 lowest: order 6,7,0,..");
    assert_eq!(p.acknowledge(), 0x23, "no rotation any more");
    pulse(&mut p, 4);
    pulse(&mut p, 6);
    assert_eq!(p.acknowledge(), 0x26, "IRQ5 is still the lowest");
}

#[test]
fn special_mask_mode() {
    let mut p = pc_init(false);
    pulse(&mut p, 3);
    assert_eq!(p.acknowledge(), 0x23);
    pulse(&mut p, 5);
    assert!(!p.output());
    p.write(0x21, 0x08); // mask IRQ3 (in service)
    p.write(0x20, 0x68); // OCW3: set special mask mode
    assert!(p.output(), "masked in-service level no longer blocks");
    assert_eq!(p.acknowledge(), 0x25);
    p.write(0x20, 0x20); // non-specific EOI skips masked IRQ3
    assert_eq!(isr(&mut p, 0x20), 0x08);
    p.write(0x20, 0x48); // reset special mask mode
    p.write(0x21, 0x00);
    p.write(0x20, 0x20);
    assert_eq!(isr(&mut p, 0x20), 0);
}

#[test]
fn special_fully_nested_mode_lets_slave_nest() {
    let mut p = PicPair::new();
    for (cmd, base, icw3, icw4) in [(0x20u16, 0x20, 0x04, 0x11), (0xa0, 0x28, 0x02, 0x01)] {
        p.write(cmd, 0x11);
        p.write(cmd + 1, base);
        p.write(cmd + 1, icw3);
        p.write(cmd + 1, icw4);
        p.write(cmd + 1, 0);
    }
    pulse(&mut p, 12);
    assert_eq!(p.acknowledge(), 0x2c);
    pulse(&mut p, 9);
    assert!(
        p.output(),
        "higher slave level nests with master IR2 in service"
    );
    assert_eq!(p.acknowledge(), 0x29);
    pulse(&mut p, 3);
    assert!(!p.output(), "IRQ3 is still below IR2");
}

#[test]
fn icw1_resets_state() {
    let mut p = pc_init(false);
    pulse(&mut p, 4);
    p.acknowledge();
    p.write(0x21, 0x55);
    p.write(0x20, 0x0b);
    p.write(0x20, 0x11);
    assert_eq!(p.read(0x21), 0, "IMR cleared by ICW1");
    assert_eq!(p.read(0x20), 0, "IRR selected, nothing latched");
    p.write(0x21, 0x50);
    p.write(0x21, 0x04);
    p.write(0x21, 0x01);
    pulse(&mut p, 7);
    assert_eq!(p.acknowledge(), 0x57);
    assert_eq!(isr(&mut p, 0x20), 0x80);
}

#[test]
fn bad_ports_and_irqs_ignored() {
    let mut p = pc_init(false);
    assert_eq!(p.read(0x22), 0xff);
    assert_eq!(p.read(0x4d2), 0xff);
    p.write(0x22, 0x11);
    p.set_irq(16, true);
    p.set_irq(255, true);
    p.set_irq(2, true);
    assert!(!p.output());
}

#[test]
fn random_guest_input_never_panics() {
    let mut p = PicPair::new();
    let mut x: u64 = 0x1234_5678_9abc_def0;
    let ports = [0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x22];
    for _ in 0..50_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = ports[(x % 7) as usize];
        match (x >> 8) % 5 {
            0 => p.write(port, (x >> 16) as u8),
            1 => {
                p.read(port);
            }
            2 => p.set_irq((x >> 16) as u8 & 31, x & (1 << 40) != 0),
            3 => {
                let _ = p.acknowledge();
            }
            _ => {
                let _ = p.output();
            }
        }
    }
}
