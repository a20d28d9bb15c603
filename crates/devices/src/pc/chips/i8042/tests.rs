use super::I8042Action::*;
use super::*;

fn cmd(k: &mut I8042, v: u8) -> Vec<I8042Action> {
    k.write(STATUS_PORT, v)
}

fn data(k: &mut I8042, v: u8) -> Vec<I8042Action> {
    k.write(DATA_PORT, v)
}

fn status(k: &mut I8042) -> u8 {
    k.read(STATUS_PORT).0
}

/// Drains the output buffer.
fn drain(k: &mut I8042) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..64 {
        if status(k) & ST_OBF == 0 {
            break;
        }
        out.push(k.read(DATA_PORT).0);
    }
    out
}

#[test]
fn initial_state() {
    let mut k = I8042::new();
    assert_eq!(status(&mut k), ST_UNLOCKED);
    assert!(k.a20());
    assert_eq!(k.command_byte(), 0x41);
    assert_eq!(k.read(0x61).0, 0xFF);
}

#[test]
fn self_test_and_interface_tests() {
    let mut k = I8042::new();
    assert_eq!(cmd(&mut k, 0xAA), vec![Irq1]);
    assert_eq!(status(&mut k), ST_UNLOCKED | ST_OBF | ST_SYS | ST_CMD);
    assert_eq!(k.read(DATA_PORT), (0x55, vec![]));
    assert_eq!(status(&mut k) & ST_OBF, 0);
    cmd(&mut k, 0xAB);
    assert_eq!(drain(&mut k), vec![0x00]);
    cmd(&mut k, 0xA9);
    assert_eq!(drain(&mut k), vec![0x00]);
    // Empty buffer: the last byte read is returned again.
    assert_eq!(k.read(DATA_PORT).0, 0x00);
    cmd(&mut k, 0xA4);
    assert_eq!(drain(&mut k), vec![0xF1]);
}

#[test]
fn command_byte_read_write_and_cmd_flag() {
    let mut k = I8042::new();
    cmd(&mut k, 0x60);
    assert_ne!(status(&mut k) & ST_CMD, 0);
    data(&mut k, 0x65);
    assert_eq!(status(&mut k) & (ST_CMD | ST_SYS), ST_SYS);
    cmd(&mut k, 0x20);
    assert_eq!(drain(&mut k), vec![0x65]);
    // Without bit 0, no IRQ1 and no SYS.
    cmd(&mut k, 0x60);
    assert!(data(&mut k, 0x40).is_empty());
    assert_eq!(status(&mut k) & ST_SYS, 0);
    assert!(cmd(&mut k, 0x20).is_empty());
    assert_eq!(drain(&mut k), vec![0x40]);
    // Other RAM bytes.
    cmd(&mut k, 0x65);
    data(&mut k, 0x99);
    cmd(&mut k, 0x25);
    assert_eq!(drain(&mut k), vec![0x99]);
}

#[test]
fn pulse_output_lines_reset() {
    let mut k = I8042::new();
    assert_eq!(cmd(&mut k, 0xFE), vec![Reset]);
    assert_eq!(cmd(&mut k, 0xF0), vec![Reset]);
    assert_eq!(cmd(&mut k, 0xFC), vec![Reset]);
    assert!(cmd(&mut k, 0xFF).is_empty());
    assert!(cmd(&mut k, 0xFD).is_empty());
}

#[test]
fn a20_and_reset_through_output_port() {
    let mut k = I8042::new();
    cmd(&mut k, 0xD1);
    assert_eq!(data(&mut k, 0xDD), vec![A20(false)]);
    assert!(!k.a20());
    // Bits 4/5 reflect the buffers, not the written value.
    cmd(&mut k, 0xD0);
    assert_eq!(drain(&mut k), vec![0xCD]);
    cmd(&mut k, 0xD1);
    assert_eq!(data(&mut k, 0xDF), vec![A20(true)]);
    assert!(k.a20());
    cmd(&mut k, 0xD1);
    assert!(data(&mut k, 0xDF).is_empty()); // unchanged: no action
    cmd(&mut k, 0xD1);
    assert_eq!(data(&mut k, 0xDE), vec![Reset]);
    // The reset line is a pulse: bit 0 reads back 1.
    cmd(&mut k, 0xD0);
    assert_eq!(drain(&mut k), vec![0xCF]);
    assert_eq!(cmd(&mut k, 0xDD), vec![A20(false)]);
    assert_eq!(cmd(&mut k, 0xDF), vec![A20(true)]);
}

#[test]
fn port_92_fast_a20_and_reset() {
    let mut k = I8042::new();
    cmd(&mut k, 0xDD);
    assert!(!k.a20());
    assert_eq!(k.write(PORT_A, 0x02), vec![A20(true)]);
    assert_eq!(k.read(PORT_A).0, 0x02);
    assert!(k.a20());
    assert_eq!(k.write(PORT_A, 0x00), vec![A20(false)]);
    assert_eq!(k.write(PORT_A, 0x03), vec![Reset, A20(true)]);
    assert_eq!(k.read(PORT_A).0, 0x03);
    // Only a 0 -> 1 transition resets.
    assert!(k.write(PORT_A, 0x03).is_empty());
    assert_eq!(k.write(PORT_A, 0x02), vec![]);
    assert_eq!(k.write(PORT_A, 0x03), vec![Reset]);
    // Output-port A20 keeps the gate open when port 0x92 clears it.
    cmd(&mut k, 0xDF);
    assert!(k.write(PORT_A, 0x00).is_empty());
    assert!(k.a20());
}

#[test]
fn keyboard_commands() {
    let mut k = I8042::new();
    let acts = data(&mut k, 0xFF);
    assert_eq!(acts, vec![Irq1]);
    assert_eq!(drain(&mut k), vec![0xFA, 0xAA]);
    data(&mut k, 0xEE);
    assert_eq!(drain(&mut k), vec![0xEE]);
    data(&mut k, 0xF2);
    assert_eq!(drain(&mut k), vec![0xFA, 0xAB, 0x41]);
    cmd(&mut k, 0x60);
    data(&mut k, 0x01); // translation off
    data(&mut k, 0xF2);
    assert_eq!(drain(&mut k), vec![0xFA, 0xAB, 0x83]);
    data(&mut k, 0xED);
    assert_eq!(drain(&mut k), vec![0xFA]);
    data(&mut k, 0x05);
    assert_eq!(drain(&mut k), vec![0xFA]);
    assert_eq!(k.leds(), 0x05);
    data(&mut k, 0xF0);
    data(&mut k, 0x00);
    assert_eq!(drain(&mut k), vec![0xFA, 0xFA, 0x02]);
    data(&mut k, 0xF3);
    data(&mut k, 0x20);
    data(&mut k, 0xF4);
    data(&mut k, 0x42);
    assert_eq!(drain(&mut k), vec![0xFA, 0xFA, 0xFA, 0xFA]);
}

#[test]
fn irq1_per_byte_and_keyboard_disable() {
    let mut k = I8042::new();
    assert_eq!(k.push_key(0x1E), vec![Irq1]);
    assert!(k.push_key(0x9E).is_empty()); // buffer already full
    assert_eq!(k.read(DATA_PORT), (0x1E, vec![Irq1])); // next byte loads
    assert_eq!(k.read(DATA_PORT), (0x9E, vec![]));
    // Disabled keyboard interface holds keys back.
    cmd(&mut k, 0xAD);
    assert!(k.push_key(0x10).is_empty());
    assert_eq!(status(&mut k) & ST_OBF, 0);
    assert_eq!(cmd(&mut k, 0xAE), vec![Irq1]);
    assert_eq!(drain(&mut k), vec![0x10]);
    // Scanning disabled (0xF5): keys are dropped.
    data(&mut k, 0xF5);
    drain(&mut k);
    assert!(k.push_key(0x11).is_empty());
    assert!(drain(&mut k).is_empty());
    // Queue is bounded.
    data(&mut k, 0xF4);
    drain(&mut k);
    cmd(&mut k, 0xAD);
    for i in 0..100 {
        k.push_key(i);
    }
    cmd(&mut k, 0xAE);
    assert_eq!(drain(&mut k).len(), 16);
    // Enabling IRQ1 while data waits raises it.
    cmd(&mut k, 0x60);
    data(&mut k, 0x00);
    k.push_key(0x22);
    cmd(&mut k, 0x60);
    assert_eq!(data(&mut k, 0x01), vec![Irq1]);
}

#[test]
fn aux_port() {
    let mut k = I8042::new();
    cmd(&mut k, 0x60);
    data(&mut k, CB_KBD_INT | CB_AUX_INT);
    cmd(&mut k, 0xD4);
    assert_eq!(data(&mut k, 0xF2), vec![Irq12]);
    assert_eq!(status(&mut k) & (ST_OBF | ST_AUX), ST_OBF | ST_AUX);
    // Output port shows "aux buffer full"; controller replies overtake the
    // mouse bytes still queued.
    cmd(&mut k, 0xD0);
    assert_eq!(drain(&mut k), vec![0xFA, 0xE3, 0x00]);
    // Disabled aux interface holds mouse data back.
    cmd(&mut k, 0xA7);
    cmd(&mut k, 0xD4);
    assert!(data(&mut k, 0xFF).is_empty());
    assert_eq!(status(&mut k) & ST_OBF, 0);
    assert_eq!(cmd(&mut k, 0xA8), vec![Irq12]);
    assert_eq!(drain(&mut k), vec![0xFA, 0xAA, 0x00]);
    // 0xD3 puts a byte in the buffer as mouse data, 0xD2 as keyboard data.
    cmd(&mut k, 0xD3);
    assert_eq!(data(&mut k, 0x12), vec![Irq12]);
    assert_eq!(status(&mut k) & ST_AUX, ST_AUX);
    drain(&mut k);
    cmd(&mut k, 0xD2);
    assert_eq!(data(&mut k, 0x34), vec![Irq1]);
    assert_eq!(status(&mut k) & ST_AUX, 0);
    assert_eq!(drain(&mut k), vec![0x34]);
}

#[test]
fn random_input_never_panics() {
    let mut k = I8042::new();
    let mut seed = 42u64;
    for _ in 0..100_000 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let r = (seed >> 24) as u32;
        let port = [DATA_PORT, STATUS_PORT, PORT_A, 0x61][(r & 3) as usize];
        match (r >> 2) & 3 {
            0 => {
                k.read(port);
            }
            1 => {
                k.push_key((r >> 8) as u8);
            }
            _ => {
                k.write(port, (r >> 8) as u8);
            }
        }
        assert!(k.ctrl_q.len() <= QUEUE_CAP && k.kbd_q.len() <= QUEUE_CAP);
    }
}
