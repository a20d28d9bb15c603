//! I/O APIC tests.

use super::*;

/// Reads indirect register `index`.
fn rd(io: &mut Ioapic, index: u32) -> u32 {
    io.mmio_write(IOREGSEL, index);
    io.mmio_read(IOWIN)
}

/// Writes indirect register `index`.
fn wr(io: &mut Ioapic, index: u32, v: u32) -> Vec<Interrupt> {
    io.mmio_write(IOREGSEL, index);
    io.mmio_write(IOWIN, v)
}

/// Programs pin `pin` with the given low half and destination.
fn program(io: &mut Ioapic, pin: u32, low: u32, dest: u8) -> Vec<Interrupt> {
    let mut out = wr(io, 0x11 + 2 * pin, (dest as u32) << 24);
    out.extend(wr(io, 0x10 + 2 * pin, low));
    out
}

#[test]
fn id_version_arbitration_registers() {
    let mut io = Ioapic::new(2);
    assert_eq!(rd(&mut io, 0x00), 2 << 24);
    assert_eq!(rd(&mut io, 0x01), 0x0017_0011);
    assert_eq!(rd(&mut io, 0x02), 2 << 24);
    wr(&mut io, 0x00, 0xff00_0000);
    assert_eq!(rd(&mut io, 0x00), 0x0f00_0000, "4-bit ID");
    assert_eq!(
        rd(&mut io, 0x02),
        0x0f00_0000,
        "arbitration ID follows the ID"
    );
    wr(&mut io, 0x01, 0);
    wr(&mut io, 0x02, 0);
    assert_eq!(rd(&mut io, 0x01), VERSION, "version is read-only");
    assert_eq!(rd(&mut io, 0x02), 0x0f00_0000, "arbitration is read-only");
    assert_eq!(io.id(), 0x0f);
    // IOREGSEL reads back (8 bits); unknown indexes and offsets read 0.
    io.mmio_write(IOREGSEL, 0x1234_5603);
    assert_eq!(io.mmio_read(IOREGSEL), 0x03);
    assert_eq!(io.mmio_read(IOWIN), 0);
    assert_eq!(rd(&mut io, 0x40), 0);
    assert_eq!(rd(&mut io, 0xff), 0);
    assert_eq!(io.mmio_read(0x20), 0);
    assert_eq!(io.mmio_read(0x04), 0);
    assert!(io.mmio_write(0x40, 0x1234).is_empty());
}

#[test]
fn reset_state_all_masked() {
    let mut io = Ioapic::new(0);
    for pin in 0..24 {
        assert_eq!(rd(&mut io, 0x10 + 2 * pin), 0x1_0000);
        assert_eq!(rd(&mut io, 0x11 + 2 * pin), 0);
        assert!(io.set_irq(pin, true).is_empty());
    }
    assert_eq!(io.entry(24), None);
    program(&mut io, 3, 0x30, 1);
    io.reset();
    assert_eq!(io.entry(3), Some(RTE_MASKED));
}

#[test]
fn redirection_table_read_back_and_read_only_bits() {
    let mut io = Ioapic::new(0);
    wr(&mut io, 0x10 + 2 * 5, 0xffff_ffff);
    wr(&mut io, 0x11 + 2 * 5, 0xffff_ffff);
    // Delivery status (12), remote IRR (14) and reserved bits are not kept.
    assert_eq!(rd(&mut io, 0x10 + 2 * 5), 0x0001_afff);
    assert_eq!(rd(&mut io, 0x11 + 2 * 5), 0xff00_0000);
    assert_eq!(io.entry(5), Some(0xff00_0000_0001_afff));
    // Halves are independent.
    wr(&mut io, 0x10 + 2 * 23, 0x0000_0941);
    wr(&mut io, 0x11 + 2 * 23, 0x0300_0000);
    assert_eq!(rd(&mut io, 0x10 + 2 * 23), 0x941);
    assert_eq!(rd(&mut io, 0x11 + 2 * 23), 0x0300_0000);
    assert_eq!(io.entry(23), Some(0x0300_0000_0000_0941));
}

#[test]
fn edge_triggered_delivers_on_rising_edge() {
    let mut io = Ioapic::new(0);
    assert!(program(&mut io, 1, 0x0000_0931, 0x03).is_empty());
    let out = io.set_irq(1, true);
    assert_eq!(
        out,
        vec![Interrupt {
            vector: 0x31,
            mode: DeliveryMode::LowestPriority,
            dest: 3,
            logical: true,
            level_triggered: false,
            assert: true,
            shorthand: Shorthand::None,
            source: 0,
        }]
    );
    assert!(io.set_irq(1, true).is_empty(), "held high: no new edge");
    assert!(io.set_irq(1, false).is_empty());
    assert_eq!(io.set_irq(1, true).len(), 1);
    // Edges on a masked pin are lost, not held pending.
    io.set_irq(1, false);
    program(&mut io, 1, 0x0001_0931, 0x03);
    assert!(io.set_irq(1, true).is_empty());
    assert!(program(&mut io, 1, 0x0000_0931, 0x03).is_empty());
    // Edge entries never set remote IRR and ignore EOIs.
    assert_eq!(rd(&mut io, 0x12) & (1 << 14), 0);
    assert!(io.eoi(0x31).is_empty());
}

#[test]
fn level_triggered_remote_irr_and_eoi_redelivery() {
    let mut io = Ioapic::new(0);
    program(&mut io, 9, 0x0000_8049, 0x01);
    let out = io.set_irq(9, true);
    assert_eq!(out.len(), 1);
    assert!(out[0].level_triggered && out[0].assert);
    assert_eq!(out[0].vector, 0x49);
    assert_ne!(rd(&mut io, 0x10 + 18) & (1 << 14), 0, "remote IRR set");
    assert!(
        io.set_irq(9, true).is_empty(),
        "remote IRR blocks redelivery"
    );
    assert!(io.eoi(0x48).is_empty(), "other vector");
    // EOI while still asserted: delivered again.
    assert_eq!(io.eoi(0x49).len(), 1);
    assert_ne!(rd(&mut io, 0x10 + 18) & (1 << 14), 0);
    // Deassert, then EOI: remote IRR clears, nothing delivered.
    assert!(io.set_irq(9, false).is_empty());
    assert!(io.eoi(0x49).is_empty());
    assert_eq!(rd(&mut io, 0x10 + 18) & (1 << 14), 0);
    // Writes cannot set remote IRR.
    wr(&mut io, 0x10 + 18, 0x0000_c049);
    assert_eq!(rd(&mut io, 0x10 + 18), 0x8049);
    assert_eq!(io.set_irq(9, true).len(), 1);
}

#[test]
fn eoi_serves_every_pin_sharing_the_vector() {
    let mut io = Ioapic::new(0);
    program(&mut io, 2, 0x0000_8055, 0);
    program(&mut io, 3, 0x0000_8055, 0);
    assert_eq!(io.set_irq(2, true).len(), 1);
    assert_eq!(io.set_irq(3, true).len(), 1);
    io.set_irq(3, false);
    let out = io.eoi(0x55);
    assert_eq!(out.len(), 1, "pin 2 still asserted, pin 3 not");
    assert_eq!(io.entry(3).unwrap() & RTE_REMOTE_IRR, 0);
}

#[test]
fn unmasking_an_asserted_level_pin_delivers() {
    let mut io = Ioapic::new(0);
    program(&mut io, 4, 0x0001_8060, 0x02);
    assert!(io.set_irq(4, true).is_empty(), "masked");
    assert_eq!(io.entry(4).unwrap() & RTE_REMOTE_IRR, 0);
    let out = program(&mut io, 4, 0x0000_8060, 0x02);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].vector, out[0].dest), (0x60, 2));
    // Re-writing the unmasked entry does not deliver twice.
    assert!(program(&mut io, 4, 0x0000_8060, 0x02).is_empty());
    // Mask, EOI, unmask: delivered again on unmask.
    wr(&mut io, 0x10 + 8, 0x0001_8060);
    assert!(io.eoi(0x60).is_empty(), "masked: not redelivered");
    assert_eq!(wr(&mut io, 0x10 + 8, 0x0000_8060).len(), 1);
}

#[test]
fn switching_to_edge_clears_remote_irr() {
    let mut io = Ioapic::new(0);
    program(&mut io, 7, 0x0000_8070, 0);
    io.set_irq(7, true);
    assert_ne!(io.entry(7).unwrap() & RTE_REMOTE_IRR, 0);
    // Linux's EOI for version 0x11: mask + edge, then back to level.
    wr(&mut io, 0x10 + 14, 0x0001_0070);
    assert_eq!(io.entry(7).unwrap() & RTE_REMOTE_IRR, 0);
    let out = wr(&mut io, 0x10 + 14, 0x0000_8070);
    assert_eq!(out.len(), 1, "still asserted: delivered again");
}

#[test]
fn active_low_polarity_inverts_the_line() {
    let mut io = Ioapic::new(0);
    // Level, active low, unmasked: an idle (low) line is asserted.
    let out = program(&mut io, 10, 0x0000_a081, 0);
    assert_eq!(out.len(), 1);
    io.set_irq(10, true); // deasserted
    assert!(io.eoi(0x81).is_empty());
    assert_eq!(io.set_irq(10, false).len(), 1);
    // Edge, active low: the falling edge delivers.
    program(&mut io, 11, 0x0000_2082, 0);
    io.set_irq(11, true);
    assert!(io.set_irq(11, true).is_empty());
    assert_eq!(io.set_irq(11, false).len(), 1);
    assert!(io.set_irq(11, true).is_empty());
    assert!(io.line(11));
}

#[test]
fn special_modes_are_edge_and_bad_input_is_ignored() {
    let mut io = Ioapic::new(0);
    // NMI with the level bit set still behaves as edge: no remote IRR.
    program(&mut io, 0, 0x0000_8400, 0);
    let out = io.set_irq(0, true);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].mode, out[0].level_triggered),
        (DeliveryMode::Nmi, false)
    );
    assert_eq!(io.entry(0).unwrap() & RTE_REMOTE_IRR, 0);
    assert!(io.set_irq(0, true).is_empty());
    // ExtINT.
    program(&mut io, 1, 0x0000_0700, 0xff);
    assert_eq!(io.set_irq(1, true)[0].mode, DeliveryMode::ExtInt);
    // Reserved delivery mode 011: nothing is sent.
    program(&mut io, 2, 0x0000_8330, 0);
    assert!(io.set_irq(2, true).is_empty());
    // Out-of-range pins.
    assert!(io.set_irq(24, true).is_empty());
    assert!(io.set_irq(u32::MAX, true).is_empty());
    assert!(!io.line(99));
    // Every register and offset accepts any value without panicking.
    for index in 0..=0xff {
        for v in [0, 0xffff_ffff, 0x0000_8000] {
            let _ = wr(&mut io, index, v);
            let _ = rd(&mut io, index);
        }
    }
    for off in (0..0x100).step_by(4) {
        let _ = io.mmio_write(off, 0xffff_ffff);
        let _ = io.mmio_read(off);
    }
    for pin in 0..30 {
        let _ = io.set_irq(pin, pin % 2 == 0);
    }
    for v in 0..=255 {
        let _ = io.eoi(v);
    }
}
