//! Intel 8042 keyboard controller (ports 0x60/0x64) with an attached PS/2
//! keyboard and mouse, plus System Control Port A (port 0x92).
//!
//! # Model
//! * Every command completes synchronously, so the input buffer is never full
//!   (status IBF is always 0) and the keyboard-lock switch reads "unlocked".
//! * The controller has one output buffer (status OBF). Bytes waiting behind
//!   it live in three bounded queues, drained in priority order: controller
//!   responses first, then keyboard bytes (unless the keyboard interface is
//!   disabled, command byte bit 4), then mouse bytes (unless the aux interface
//!   is disabled, bit 5). A queue that is full drops further bytes, like a
//!   real keyboard's 16-byte buffer.
//! * Each time the output buffer is loaded, an [`I8042Action::Irq1`]
//!   (keyboard/controller data, command byte bit 0) or [`I8042Action::Irq12`]
//!   (mouse data, bit 1) is returned when that interrupt is enabled; it stands
//!   for a rising edge on the ISA line. Enabling the interrupt while the buffer
//!   is already full also produces one.
//! * Reading port 0x60 with an empty buffer returns the last byte read.
//! * A20 is the OR of output-port bit 1 and port 0x92 bit 1; an
//!   [`I8042Action::A20`] is returned whenever that combination changes. A20
//!   starts enabled.
//! * Reset requests: pulse commands 0xF0-0xFF with bit 0 clear (0xFE is the
//!   classic one), writing the output port with bit 0 clear (the line is a
//!   pulse, so the stored bit reads back as 1), and a 0→1 transition of port
//!   0x92 bit 0.
//! * Writing a keyboard command to port 0x60 re-enables a keyboard interface
//!   that was disabled with 0xAD, as real controllers do. A byte that
//!   arrives while the keyboard expects a command argument is taken as the
//!   argument. Scan codes passed to [`I8042::push_key`] are delivered verbatim
//!   (no set-2 → set-1 translation is performed; the caller supplies the set
//!   the guest expects).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Status (read) / command (write) port.
pub const STATUS_PORT: u16 = 0x64;
/// System Control Port A.
pub const PORT_A: u16 = 0x92;

/// Status: output buffer full.
pub const ST_OBF: u8 = 0x01;
/// Status: system flag.
pub const ST_SYS: u8 = 0x04;
/// Status: last write was a command (port 0x64).
pub const ST_CMD: u8 = 0x08;
/// Status: keyboard not inhibited (key lock off).
pub const ST_UNLOCKED: u8 = 0x10;
/// Status: output buffer holds mouse data.
pub const ST_AUX: u8 = 0x20;

/// Command byte: keyboard interrupt enable.
pub const CB_KBD_INT: u8 = 0x01;
/// Command byte: mouse interrupt enable.
pub const CB_AUX_INT: u8 = 0x02;
/// Command byte: system flag.
pub const CB_SYS: u8 = 0x04;
/// Command byte: keyboard interface disabled.
pub const CB_KBD_DISABLE: u8 = 0x10;
/// Command byte: mouse interface disabled.
pub const CB_AUX_DISABLE: u8 = 0x20;
/// Command byte: scan code translation.
pub const CB_XLATE: u8 = 0x40;

const OUT_RESET: u8 = 0x01;
const OUT_A20: u8 = 0x02;
const OUT_KBD_OBF: u8 = 0x10;
const OUT_AUX_OBF: u8 = 0x20;
const QUEUE_CAP: usize = 16;

/// Side effects the VMM must apply after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum I8042Action {
    /// Nothing to do (never produced; available as a placeholder).
    None,
    /// Reset the machine (0xFE-style pulse, output port bit 0, port 0x92 bit 0).
    Reset,
    /// The A20 gate changed to the given state.
    A20(bool),
    /// Raise an edge on ISA IRQ 1 (keyboard).
    Irq1,
    /// Raise an edge on ISA IRQ 12 (mouse).
    Irq12,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Source {
    Kbd,
    Aux,
}

/// Data byte the controller expects on port 0x60 after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Pending {
    None,
    WriteRam(u8),
    WriteOutPort,
    WriteKbdBuffer,
    WriteAuxBuffer,
    WriteAux,
}

/// Argument the keyboard expects after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum KbdArg {
    None,
    Leds,
    Typematic,
    ScanSet,
}

/// The 8042 controller with keyboard, mouse and port 0x92. Its serde form is the checkpoint
/// state; check a deserialized value with [`I8042::check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042 {
    /// Controller RAM; byte 0 is the command byte.
    ram: [u8; 32],
    sys: bool,
    last_was_cmd: bool,
    outport: u8,
    port92: u8,
    a20_reported: bool,
    obuf: Option<(u8, Source)>,
    last_read: u8,
    ctrl_q: VecDeque<(u8, Source)>,
    kbd_q: VecDeque<u8>,
    aux_q: VecDeque<u8>,
    pending: Pending,
    kbd_arg: KbdArg,
    kbd_scanning: bool,
    scan_set: u8,
    leds: u8,
    aux_arg: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// Power-on state: command byte 0x41 (IRQ1 enabled, translation on),
    /// A20 enabled, empty buffers.
    pub fn new() -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CB_KBD_INT | CB_XLATE;
        I8042 {
            ram,
            sys: false,
            last_was_cmd: false,
            outport: 0xC0 | OUT_A20 | OUT_RESET,
            port92: 0,
            a20_reported: true,
            obuf: None,
            last_read: 0,
            ctrl_q: VecDeque::new(),
            kbd_q: VecDeque::new(),
            aux_q: VecDeque::new(),
            pending: Pending::None,
            kbd_arg: KbdArg::None,
            kbd_scanning: true,
            scan_set: 2,
            leds: 0,
            aux_arg: false,
        }
    }

    /// Refuses a state the controller cannot be in (a restored checkpoint).
    pub fn check(&self) -> Result<(), String> {
        if let Pending::WriteRam(i) = self.pending
            && usize::from(i) >= self.ram.len()
        {
            return Err(format!("i8042: pending write to RAM byte {i} beyond 31"));
        }
        for (name, len) in [
            ("controller", self.ctrl_q.len()),
            ("keyboard", self.kbd_q.len()),
            ("mouse", self.aux_q.len()),
        ] {
            if len > QUEUE_CAP {
                return Err(format!(
                    "i8042: {len} bytes queued from the {name} (at most {QUEUE_CAP})"
                ));
            }
        }
        if !(1..=3).contains(&self.scan_set) {
            return Err(format!("i8042: scan code set {}", self.scan_set));
        }
        Ok(())
    }

    /// Current A20 gate state (output port bit 1 OR port 0x92 bit 1).
    pub fn a20(&self) -> bool {
        self.outport & OUT_A20 != 0 || self.port92 & 0x02 != 0
    }

    /// Current command byte.
    pub fn command_byte(&self) -> u8 {
        self.ram[0]
    }

    /// Keyboard LED state last set with 0xED (bit 0 scroll, 1 num, 2 caps).
    pub fn leds(&self) -> u8 {
        self.leds
    }

    /// Port read: 0x60 data, 0x64 status, 0x92 port A; others read 0xFF.
    pub fn read(&mut self, port: u16) -> (u8, Vec<I8042Action>) {
        let mut acts = Vec::new();
        let v = match port {
            DATA_PORT => {
                if let Some((b, _)) = self.obuf.take() {
                    self.last_read = b;
                }
                self.fill(&mut acts);
                self.last_read
            }
            STATUS_PORT => self.status(),
            PORT_A => self.port92,
            _ => 0xFF,
        };
        (v, acts)
    }

    /// Port write: 0x60 data, 0x64 command, 0x92 port A; others ignored.
    pub fn write(&mut self, port: u16, v: u8) -> Vec<I8042Action> {
        let mut acts = Vec::new();
        match port {
            DATA_PORT => {
                self.last_was_cmd = false;
                self.data_write(v, &mut acts);
            }
            STATUS_PORT => {
                self.last_was_cmd = true;
                self.command(v, &mut acts);
            }
            PORT_A => {
                let old = self.port92;
                self.port92 = v;
                if v & 0x01 != 0 && old & 0x01 == 0 {
                    acts.push(I8042Action::Reset);
                }
                self.update_a20(&mut acts);
            }
            _ => {}
        }
        acts
    }

    /// Queues a byte from the keyboard (ignored while the keyboard has
    /// scanning disabled via 0xF5; dropped when its 16-byte queue is full).
    pub fn push_key(&mut self, scancode: u8) -> Vec<I8042Action> {
        let mut acts = Vec::new();
        if self.kbd_scanning {
            Self::push(&mut self.kbd_q, scancode);
            self.fill(&mut acts);
        }
        acts
    }

    /// Queues a byte from the mouse (e.g. a movement packet); it is delivered
    /// when the aux interface is enabled.
    pub fn push_aux(&mut self, byte: u8) -> Vec<I8042Action> {
        let mut acts = Vec::new();
        Self::push(&mut self.aux_q, byte);
        self.fill(&mut acts);
        acts
    }

    fn status(&self) -> u8 {
        let mut s = ST_UNLOCKED;
        if let Some((_, src)) = self.obuf {
            s |= ST_OBF;
            if src == Source::Aux {
                s |= ST_AUX;
            }
        }
        if self.sys {
            s |= ST_SYS;
        }
        if self.last_was_cmd {
            s |= ST_CMD;
        }
        s
    }

    fn push<T>(q: &mut VecDeque<T>, v: T) {
        if q.len() < QUEUE_CAP {
            q.push_back(v);
        }
    }

    fn reply(&mut self, bytes: &[u8], acts: &mut Vec<I8042Action>) {
        for &b in bytes {
            Self::push(&mut self.ctrl_q, (b, Source::Kbd));
        }
        self.fill(acts);
    }

    /// Loads the output buffer from the queues if it is empty.
    fn fill(&mut self, acts: &mut Vec<I8042Action>) {
        if self.obuf.is_some() {
            return;
        }
        let cb = self.ram[0];
        let next = if let Some(x) = self.ctrl_q.pop_front() {
            Some(x)
        } else if cb & CB_KBD_DISABLE == 0 && !self.kbd_q.is_empty() {
            self.kbd_q.pop_front().map(|b| (b, Source::Kbd))
        } else if cb & CB_AUX_DISABLE == 0 && !self.aux_q.is_empty() {
            self.aux_q.pop_front().map(|b| (b, Source::Aux))
        } else {
            None
        };
        if let Some((b, src)) = next {
            self.obuf = Some((b, src));
            self.raise_irq(src, acts);
        }
    }

    fn raise_irq(&self, src: Source, acts: &mut Vec<I8042Action>) {
        let cb = self.ram[0];
        match src {
            Source::Kbd if cb & CB_KBD_INT != 0 => acts.push(I8042Action::Irq1),
            Source::Aux if cb & CB_AUX_INT != 0 => acts.push(I8042Action::Irq12),
            _ => {}
        }
    }

    fn update_a20(&mut self, acts: &mut Vec<I8042Action>) {
        let a20 = self.a20();
        if a20 != self.a20_reported {
            self.a20_reported = a20;
            acts.push(I8042Action::A20(a20));
        }
    }

    fn set_command_byte(&mut self, v: u8, acts: &mut Vec<I8042Action>) {
        let old = self.ram[0];
        self.ram[0] = v;
        self.sys = v & CB_SYS != 0;
        if let Some((_, src)) = self.obuf {
            let bit = if src == Source::Aux {
                CB_AUX_INT
            } else {
                CB_KBD_INT
            };
            if v & bit != 0 && old & bit == 0 {
                self.raise_irq(src, acts);
            }
        }
        self.fill(acts);
    }

    fn set_outport(&mut self, v: u8, acts: &mut Vec<I8042Action>) {
        if v & OUT_RESET == 0 {
            acts.push(I8042Action::Reset);
        }
        self.outport = (v | OUT_RESET) & !(OUT_KBD_OBF | OUT_AUX_OBF);
        self.update_a20(acts);
    }

    fn command(&mut self, v: u8, acts: &mut Vec<I8042Action>) {
        self.pending = Pending::None;
        match v {
            0x20..=0x3F => self.reply(&[self.ram[usize::from(v & 0x1F)]], acts),
            0x60..=0x7F => self.pending = Pending::WriteRam(v & 0x1F),
            0xA4 => self.reply(&[0xF1], acts), // no password installed
            0xA7 => self.ram[0] |= CB_AUX_DISABLE,
            0xA8 => {
                self.ram[0] &= !CB_AUX_DISABLE;
                self.fill(acts);
            }
            0xA9 | 0xAB => self.reply(&[0x00], acts), // interface tests pass
            0xAA => {
                self.sys = true;
                self.ram[0] |= CB_SYS;
                self.reply(&[0x55], acts);
            }
            0xAD => self.ram[0] |= CB_KBD_DISABLE,
            0xAE => {
                self.ram[0] &= !CB_KBD_DISABLE;
                self.fill(acts);
            }
            0xC0 => self.reply(&[0x80], acts), // input port: keyboard not inhibited
            0xD0 => {
                let mut out = self.outport;
                match self.obuf {
                    Some((_, Source::Aux)) => out |= OUT_AUX_OBF,
                    Some((_, Source::Kbd)) => out |= OUT_KBD_OBF,
                    None => {}
                }
                self.reply(&[out], acts);
            }
            0xD1 => self.pending = Pending::WriteOutPort,
            0xD2 => self.pending = Pending::WriteKbdBuffer,
            0xD3 => self.pending = Pending::WriteAuxBuffer,
            0xD4 => self.pending = Pending::WriteAux,
            0xDD => self.set_outport(self.outport & !OUT_A20, acts),
            0xDF => self.set_outport(self.outport | OUT_A20, acts),
            0xE0 => self.reply(&[0x00], acts), // test inputs
            0xF0..=0xFF => {
                if v & 0x01 == 0 {
                    acts.push(I8042Action::Reset);
                }
            }
            _ => {} // unsupported commands are ignored
        }
    }

    fn data_write(&mut self, v: u8, acts: &mut Vec<I8042Action>) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteRam(0) => self.set_command_byte(v, acts),
            Pending::WriteRam(i) => self.ram[usize::from(i)] = v,
            Pending::WriteOutPort => self.set_outport(v, acts),
            Pending::WriteKbdBuffer => self.reply(&[v], acts),
            Pending::WriteAuxBuffer => {
                Self::push(&mut self.ctrl_q, (v, Source::Aux));
                self.fill(acts);
            }
            Pending::WriteAux => self.aux_write(v, acts),
            Pending::None => {
                self.ram[0] &= !CB_KBD_DISABLE;
                self.keyboard_write(v, acts);
            }
        }
    }

    fn kbd_reply(&mut self, bytes: &[u8], acts: &mut Vec<I8042Action>) {
        for &b in bytes {
            Self::push(&mut self.kbd_q, b);
        }
        self.fill(acts);
    }

    fn keyboard_write(&mut self, v: u8, acts: &mut Vec<I8042Action>) {
        match std::mem::replace(&mut self.kbd_arg, KbdArg::None) {
            KbdArg::Leds => {
                self.leds = v & 0x07;
                return self.kbd_reply(&[0xFA], acts);
            }
            KbdArg::Typematic => return self.kbd_reply(&[0xFA], acts),
            KbdArg::ScanSet => {
                return match v {
                    0 => self.kbd_reply(&[0xFA, self.scan_set], acts),
                    1..=3 => {
                        self.scan_set = v;
                        self.kbd_reply(&[0xFA], acts)
                    }
                    _ => self.kbd_reply(&[0xFE], acts), // resend
                };
            }
            KbdArg::None => {}
        }
        match v {
            0xED => {
                self.kbd_arg = KbdArg::Leds;
                self.kbd_reply(&[0xFA], acts);
            }
            0xEE => self.kbd_reply(&[0xEE], acts),
            0xF0 => {
                self.kbd_arg = KbdArg::ScanSet;
                self.kbd_reply(&[0xFA], acts);
            }
            0xF2 => {
                // MF2 keyboard; the controller translates 0x83 to 0x41.
                let id2 = if self.ram[0] & CB_XLATE != 0 {
                    0x41
                } else {
                    0x83
                };
                self.kbd_reply(&[0xFA, 0xAB, id2], acts);
            }
            0xF3 => {
                self.kbd_arg = KbdArg::Typematic;
                self.kbd_reply(&[0xFA], acts);
            }
            0xF4 => {
                self.kbd_scanning = true;
                self.kbd_reply(&[0xFA], acts);
            }
            0xF5 => {
                self.kbd_scanning = false;
                self.kbd_reply(&[0xFA], acts);
            }
            0xFF => {
                self.kbd_q.clear();
                self.kbd_scanning = true;
                self.scan_set = 2;
                self.leds = 0;
                self.kbd_reply(&[0xFA, 0xAA], acts);
            }
            _ => self.kbd_reply(&[0xFA], acts),
        }
    }

    /// Minimal PS/2 mouse: acknowledges everything, answers reset, ID,
    /// status and read-data requests.
    fn aux_write(&mut self, v: u8, acts: &mut Vec<I8042Action>) {
        let resp: &[u8] = if std::mem::replace(&mut self.aux_arg, false) {
            &[0xFA]
        } else {
            match v {
                0xFF => {
                    self.aux_q.clear();
                    &[0xFA, 0xAA, 0x00]
                }
                0xF2 => &[0xFA, 0x00],
                0xE9 => &[0xFA, 0x00, 0x02, 0x64],
                0xEB => &[0xFA, 0x08, 0x00, 0x00],
                0xE8 | 0xF3 => {
                    self.aux_arg = true;
                    &[0xFA]
                }
                _ => &[0xFA],
            }
        };
        for &b in resp {
            Self::push(&mut self.aux_q, b);
        }
        self.fill(acts);
    }
}

#[cfg(test)]
mod tests;
