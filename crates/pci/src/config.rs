//! A PCI function's configuration space (type 0 header, 4 KiB with the extended space), with
//! per-bit write masks so guest writes to read-only fields are ignored as the PCI Local Bus
//! specification requires, write-1-to-clear status bits, BAR sizing and capability lists.
//!
//! Pure data: no I/O, no locks. Guest-facing, so every access is bounds-checked and any
//! offset/length combination is accepted (out-of-range bytes read as all-ones and are dropped
//! on write).

use serde::{Deserialize, Serialize};

pub const CONFIG_SIZE: usize = 4096;
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYS_VENDOR: usize = 0x2c;
pub const SUBSYS_ID: usize = 0x2e;
pub const CAP_PTR: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_INTX: u16 = 1 << 3;
pub const STATUS_CAP_LIST: u16 = 1 << 4;

pub const CAP_MSI: u8 = 0x05;
pub const CAP_VENDOR: u8 = 0x09;
pub const CAP_MSIX: u8 = 0x11;

/// The kind of a base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Io,
    Mem32,
    /// Takes this BAR and the next.
    Mem64,
}

/// A BAR the function decodes: its size (a power of two) and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarSpec {
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// Where a BAR currently decodes (what the bus must map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMapping {
    pub index: usize,
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct ConfigSpace {
    #[serde(with = "serde_bytes_vec")]
    data: Vec<u8>,
    /// Bits the guest may write.
    #[serde(skip, default)]
    wmask: Vec<u8>,
    /// Bits a guest write of 1 clears.
    #[serde(skip, default)]
    w1c: Vec<u8>,
    #[serde(skip, default)]
    bars: [Option<BarSpec>; 6],
    /// The last capability's offset (the next one is linked after it).
    #[serde(skip, default)]
    last_cap: Option<usize>,
    /// Where the next capability goes.
    #[serde(skip, default)]
    next_cap: usize,
}

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd-length hex"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

impl ConfigSpace {
    /// A type 0 header. `class` is (base class, subclass, programming interface).
    pub fn new(vendor: u16, device: u16, class: (u8, u8, u8), revision: u8) -> Self {
        let mut c = ConfigSpace {
            data: vec![0; CONFIG_SIZE],
            wmask: vec![0; CONFIG_SIZE],
            w1c: vec![0; CONFIG_SIZE],
            bars: [None; 6],
            last_cap: None,
            next_cap: 0x40,
        };
        c.set_u16(VENDOR_ID, vendor);
        c.set_u16(DEVICE_ID, device);
        c.data[REVISION] = revision;
        c.data[0x09] = class.2;
        c.data[0x0a] = class.1;
        c.data[0x0b] = class.0;
        // Command: I/O, memory, bus master, INTx disable are writable.
        c.set_wmask16(
            COMMAND,
            CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE | (1 << 6) | (1 << 8),
        );
        // Status: the error bits are write-1-to-clear.
        c.w1c[STATUS + 1] = 0xf9;
        c.data[INTERRUPT_LINE] = 0xff;
        c.wmask[INTERRUPT_LINE] = 0xff;
        // Cache line size and latency timer are plain read/write registers.
        c.wmask[0x0c] = 0xff;
        c.wmask[0x0d] = 0xff;
        c
    }

    pub fn vendor(&self) -> u16 {
        self.u16_at(VENDOR_ID)
    }
    pub fn device(&self) -> u16 {
        self.u16_at(DEVICE_ID)
    }
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    pub fn set_header_type(&mut self, t: u8) {
        self.data[HEADER_TYPE] = t;
    }
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set_u16(SUBSYS_VENDOR, vendor);
        self.set_u16(SUBSYS_ID, id);
    }
    /// INTA#..INTD# as 1..4, 0 for none.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.data[INTERRUPT_PIN] = pin;
    }
    pub fn interrupt_pin(&self) -> u8 {
        self.data[INTERRUPT_PIN]
    }

    /// Set the interrupt status bit (read-only to the guest).
    pub fn set_intx_status(&mut self, on: bool) {
        let s = self.u16_at(STATUS);
        self.set_u16(
            STATUS,
            if on {
                s | STATUS_INTX
            } else {
                s & !STATUS_INTX
            },
        );
    }

    /// Declare BAR `index`. The size is rounded up to a power of two (at least 16 bytes for
    /// memory, 4 for I/O).
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) {
        assert!(index < 6 && (spec.kind != BarKind::Mem64 || index < 5));
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        let size = spec.size.max(min).next_power_of_two();
        let spec = BarSpec { size, ..spec };
        let off = BAR0 + 4 * index;
        let mask = !(size - 1);
        match spec.kind {
            BarKind::Io => {
                self.set_u32(off, 1);
                self.set_wmask32(off, (mask as u32) & 0xffff_fffc);
            }
            BarKind::Mem32 => {
                self.set_u32(off, if spec.prefetchable { 8 } else { 0 });
                self.set_wmask32(off, (mask as u32) & 0xffff_fff0);
            }
            BarKind::Mem64 => {
                self.set_u32(off, 4 | if spec.prefetchable { 8 } else { 0 });
                self.set_wmask32(off, (mask as u32) & 0xffff_fff0);
                self.set_wmask32(off + 4, (mask >> 32) as u32);
            }
        }
        self.bars[index] = Some(spec);
    }

    pub fn bar_spec(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// Program BAR `index` (what firmware would do).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(spec) = self.bar_spec(index) else {
            return;
        };
        let off = BAR0 + 4 * index;
        let low_flags = self.u32_at(off) & if spec.kind == BarKind::Io { 3 } else { 0xf };
        self.set_u32(off, (addr as u32 & !(spec.size as u32 - 1)) | low_flags);
        if spec.kind == BarKind::Mem64 {
            self.set_u32(off + 4, (addr >> 32) as u32);
        }
    }

    /// The address BAR `index` holds (whether or not decoding is enabled).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar_spec(index)?;
        let off = BAR0 + 4 * index;
        let low = u64::from(self.u32_at(off));
        Some(match spec.kind {
            BarKind::Io => low & !3,
            BarKind::Mem32 => low & !0xf,
            BarKind::Mem64 => (low & !0xf) | (u64::from(self.u32_at(off + 4)) << 32),
        })
    }

    /// The BARs that decode now: memory BARs while memory space is enabled, I/O BARs while
    /// I/O space is enabled; a BAR at 0, or one that wraps or (for I/O) leaves the 64 KiB
    /// port space, decodes nothing.
    pub fn active_bars(&self) -> Vec<BarMapping> {
        let cmd = self.command();
        let mut v = Vec::new();
        for index in 0..6 {
            let (Some(spec), Some(addr)) = (self.bar_spec(index), self.bar_address(index)) else {
                continue;
            };
            let enabled = match spec.kind {
                BarKind::Io => cmd & CMD_IO != 0,
                _ => cmd & CMD_MEMORY != 0,
            };
            let limit = if spec.kind == BarKind::Io {
                0x1_0000
            } else {
                u64::MAX
            };
            let fits = addr
                .checked_add(spec.size - 1)
                .is_some_and(|last| last < limit);
            // All-ones in the address bits: the sizing pattern, not an address.
            let sizing = addr | (spec.size - 1) == limit.wrapping_sub(1)
                || (spec.kind != BarKind::Mem64 && addr | (spec.size - 1) == 0xffff_ffff);
            if enabled && addr != 0 && fits && !sizing {
                v.push(BarMapping {
                    index,
                    kind: spec.kind,
                    addr,
                    size: spec.size,
                });
            }
        }
        v
    }

    /// Append a capability with `id` and `body` (the bytes after the ID and next pointer);
    /// `wmask` (same length as `body`, or empty for read-only) says which bits the guest may
    /// write. Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> usize {
        let off = self.next_cap;
        let len = 2 + body.len();
        assert!(
            off + len <= 0x100,
            "capabilities overflow the 256-byte space"
        );
        self.data[off] = id;
        self.data[off + 1] = 0;
        self.data[off + 2..off + len].copy_from_slice(body);
        if !wmask.is_empty() {
            self.wmask[off + 2..off + len].copy_from_slice(wmask);
        }
        match self.last_cap {
            None => self.data[CAP_PTR] = off as u8,
            Some(prev) => self.data[prev + 1] = off as u8,
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len).next_multiple_of(4);
        let st = self.u16_at(STATUS) | STATUS_CAP_LIST;
        self.set_u16(STATUS, st);
        off
    }

    /// Read `data.len()` bytes at `offset` (any alignment; bytes past the end read as 0xff).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.data.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// A guest write: only writable bits change; write-1-to-clear bits clear.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i;
            if o >= CONFIG_SIZE {
                break;
            }
            let m = self.wmask[o];
            let old = self.data[o];
            self.data[o] = (old & !m) | (b & m);
            self.data[o] &= !(b & self.w1c[o]);
        }
    }

    /// The raw bytes (for a device's own registers inside its capabilities).
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Replace the contents from a saved copy, keeping this space's masks (the device's
    /// layout comes from its config, not from the checkpoint). Refuses a copy whose read-only
    /// bits differ: it was saved from another kind of device.
    pub fn restore_from(&mut self, saved: &ConfigSpace) -> Result<(), String> {
        if saved.data.len() != CONFIG_SIZE {
            return Err(format!(
                "PCI config space of {} bytes (expected {CONFIG_SIZE})",
                saved.data.len()
            ));
        }
        for o in 0..CONFIG_SIZE {
            let ro = !self.wmask[o] & !self.w1c[o];
            // Status bits the device itself drives may differ; everything else read-only must match.
            let volatile = o == STATUS || (0x40..0x100).contains(&o);
            if !volatile && (self.data[o] & ro) != (saved.data[o] & ro) {
                return Err(format!(
                    "PCI config space differs at read-only offset {o:#x} ({:#x} saved, {:#x} here)",
                    saved.data[o], self.data[o]
                ));
            }
        }
        self.data.copy_from_slice(&saved.data);
        Ok(())
    }

    pub fn u16_at(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.data[o], self.data[o + 1]])
    }
    pub fn u32_at(&self, o: usize) -> u32 {
        u32::from_le_bytes(self.data[o..o + 4].try_into().unwrap())
    }
    pub fn set_u16(&mut self, o: usize, v: u16) {
        self.data[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_u32(&mut self, o: usize, v: u32) {
        self.data[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_wmask_byte(&mut self, o: usize, m: u8) {
        self.wmask[o] = m;
    }
    pub fn set_wmask16(&mut self, o: usize, m: u16) {
        self.wmask[o..o + 2].copy_from_slice(&m.to_le_bytes());
    }
    pub fn set_wmask32(&mut self, o: usize, m: u32) {
        self.wmask[o..o + 4].copy_from_slice(&m.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &ConfigSpace, o: usize) -> u32 {
        let mut b = [0; 4];
        c.read(o, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, (1, 0, 0), 1);
        c.write(0, &[0xff; 16]);
        assert_eq!(c.vendor(), 0x1af4);
        assert_eq!(c.device(), 0x1042);
        assert_eq!(
            c.command(),
            CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE | (1 << 6) | (1 << 8)
        );
        assert_eq!(c.bytes()[0x0b], 1, "class is read-only");
        // Past the end: all-ones, writes dropped, no panic.
        let mut b = [0u8; 8];
        c.read(CONFIG_SIZE - 4, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        c.write(CONFIG_SIZE - 2, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_sizing_and_decode() {
        let mut c = ConfigSpace::new(1, 2, (2, 0, 0), 0);
        c.add_bar(
            0,
            BarSpec {
                size: 0x20,
                kind: BarKind::Io,
                prefetchable: false,
            },
        );
        c.add_bar(
            1,
            BarSpec {
                size: 0x4000,
                kind: BarKind::Mem64,
                prefetchable: true,
            },
        );
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(rd32(&c, BAR0), 0xffff_ffe1);
        c.write(BAR0 + 4, &0xffff_ffffu32.to_le_bytes());
        c.write(BAR0 + 8, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(rd32(&c, BAR0 + 4), 0xffff_c00c);
        assert_eq!(rd32(&c, BAR0 + 8), 0xffff_ffff);
        // Unimplemented BARs read 0.
        c.write(BAR0 + 12, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(rd32(&c, BAR0 + 12), 0);
        // Decoding off: nothing mapped.
        assert!(c.active_bars().is_empty());
        c.write(BAR0, &0xc040u32.to_le_bytes());
        c.write(BAR0 + 4, &0xe000_0000u32.to_le_bytes());
        c.write(BAR0 + 8, &0u32.to_le_bytes());
        c.write(COMMAND, &(CMD_IO | CMD_MEMORY).to_le_bytes());
        let a = c.active_bars();
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].addr, a[0].size), (0xc040, 0x20));
        assert_eq!((a[1].addr, a[1].size, a[1].index), (0xe000_0000, 0x4000, 1));
        c.write(COMMAND, &CMD_MEMORY.to_le_bytes());
        assert_eq!(c.active_bars().len(), 1);
    }

    #[test]
    fn capabilities_chain_and_status_w1c() {
        let mut c = ConfigSpace::new(1, 2, (2, 0, 0), 0);
        let a = c.add_capability(
            CAP_VENDOR,
            &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[],
        );
        let b = c.add_capability(CAP_MSIX, &[0; 10], &[0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.bytes()[CAP_PTR] as usize, a);
        assert_eq!(c.bytes()[a + 1] as usize, b);
        assert_eq!(c.bytes()[b + 1], 0);
        assert!(c.u16_at(STATUS) & STATUS_CAP_LIST != 0);
        c.bytes_mut()[STATUS + 1] = 0x80; // parity error seen
        c.write(STATUS, &[0xff, 0x80]);
        assert_eq!(c.u16_at(STATUS), STATUS_CAP_LIST);
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(c.u16_at(b + 2), 0xc000);
    }
}
