//! QEMU-style `pc-testdev`, the helper device used by kvm-unit-tests.
//!
//! | range | behaviour |
//! |-------|-----------|
//! | ports 0xE0-0xE3 | 32-bit scratch register, byte-addressed little-endian |
//! | ports 0xE4-0xE7 | "flush page": writes are accepted and ignored (a VMM with shadow paging has no host mapping to flush); reads return 0 |
//! | ports 0x2000-0x2017 | one port per interrupt line 0-23: writing sets the line's level (non-zero byte = high), reading returns the level last written (0/1) |
//! | MMIO 64 KiB | scratch memory, byte-addressed little-endian (the VMM maps it at [`MMIO_BASE`]) |
//!
//! All accesses are byte-addressed: an access of `len` bytes (clamped to 8)
//! at port/offset `p` covers `p..p+len`, least-significant byte first, as an
//! x86 `in`/`out` of that width does. Bytes outside a defined range read as
//! 0xFF for ports and 0 for MMIO, and are ignored on writes. An access of
//! length 0 does nothing and reads 0.

/// Guest-physical base where the VMM should map the MMIO scratch area.
pub const MMIO_BASE: u64 = 0xFF00_0000;
/// Size of the MMIO scratch area.
pub const MMIO_SIZE: usize = 64 * 1024;
/// First scratch-register port.
pub const SCRATCH_PORT: u16 = 0xE0;
/// First flush-page port.
pub const FLUSH_PAGE_PORT: u16 = 0xE4;
/// Port of interrupt line 0.
pub const IRQ_PORT_BASE: u16 = 0x2000;
/// Number of interrupt lines.
pub const IRQ_LINES: usize = 24;

/// The test device. Its serde form is the checkpoint state (the scratch memory as its non-zero
/// chunks); check a deserialized value with [`TestDev::check`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TestDev {
    scratch: [u8; 4],
    irq_levels: [bool; IRQ_LINES],
    #[serde(with = "crate::pc::serde_util::sparse")]
    mem: Vec<u8>,
}

impl Default for TestDev {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDev {
    /// Zeroed scratch register and memory, all lines low.
    pub fn new() -> Self {
        TestDev {
            scratch: [0; 4],
            irq_levels: [false; IRQ_LINES],
            mem: vec![0; MMIO_SIZE],
        }
    }

    /// Level last written for interrupt line `irq` (false for unknown lines).
    /// Refuses a state the device cannot be in (a restored checkpoint).
    pub fn check(&self) -> Result<(), String> {
        if self.mem.len() != MMIO_SIZE {
            return Err(format!(
                "pc-testdev: {} bytes of MMIO scratch (must be {MMIO_SIZE})",
                self.mem.len()
            ));
        }
        Ok(())
    }

    pub fn irq_level(&self, irq: u8) -> bool {
        self.irq_levels
            .get(usize::from(irq))
            .copied()
            .unwrap_or(false)
    }

    /// Port read of `len` bytes.
    pub fn io_read(&mut self, port: u16, len: usize) -> u64 {
        let mut v = 0u64;
        for i in 0..len.min(8) {
            let b = match port.checked_add(i as u16) {
                Some(p @ 0xE0..=0xE3) => self.scratch[usize::from(p - SCRATCH_PORT)],
                Some(0xE4..=0xE7) => 0,
                Some(p) if Self::irq_of(p).is_some() => {
                    u8::from(self.irq_levels[Self::irq_of(p).unwrap_or(0)])
                }
                _ => 0xFF,
            };
            v |= u64::from(b) << (8 * i);
        }
        v
    }

    /// Port write of `len` bytes. Returns `(irq, level)` for every interrupt
    /// line written (even if its level did not change); the VMM applies them
    /// to its interrupt controllers.
    pub fn io_write(&mut self, port: u16, v: u64, len: usize) -> Vec<(u8, bool)> {
        let mut out = Vec::new();
        for i in 0..len.min(8) {
            let b = (v >> (8 * i)) as u8;
            match port.checked_add(i as u16) {
                Some(p @ 0xE0..=0xE3) => self.scratch[usize::from(p - SCRATCH_PORT)] = b,
                Some(p) => {
                    if let Some(irq) = Self::irq_of(p) {
                        self.irq_levels[irq] = b != 0;
                        out.push((irq as u8, b != 0));
                    }
                }
                None => {}
            }
        }
        out
    }

    /// MMIO read of `len` bytes at `offset` into the scratch area.
    pub fn mmio_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut v = 0u64;
        for i in 0..len.min(8) {
            let b = self.mem_index(offset, i).map_or(0, |j| self.mem[j]);
            v |= u64::from(b) << (8 * i);
        }
        v
    }

    /// MMIO write of `len` bytes at `offset` into the scratch area.
    pub fn mmio_write(&mut self, offset: u64, v: u64, len: usize) {
        for i in 0..len.min(8) {
            if let Some(j) = self.mem_index(offset, i) {
                self.mem[j] = (v >> (8 * i)) as u8;
            }
        }
    }

    fn mem_index(&self, offset: u64, i: usize) -> Option<usize> {
        let j = usize::try_from(offset.checked_add(i as u64)?).ok()?;
        (j < self.mem.len()).then_some(j)
    }

    fn irq_of(port: u16) -> Option<usize> {
        let n = usize::from(port.checked_sub(IRQ_PORT_BASE)?);
        (n < IRQ_LINES).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_register_reads_back() {
        let mut t = TestDev::new();
        assert_eq!(t.io_read(0xE0, 4), 0);
        t.io_write(0xE0, 0xDEAD_BEEF, 4);
        assert_eq!(t.io_read(0xE0, 4), 0xDEAD_BEEF);
        assert_eq!(t.io_read(0xE0, 1), 0xEF);
        assert_eq!(t.io_read(0xE2, 2), 0xDEAD);
    }

    #[test]
    fn scratch_partial_writes() {
        let mut t = TestDev::new();
        t.io_write(0xE0, 0x1122_3344, 4);
        t.io_write(0xE1, 0xAA, 1);
        assert_eq!(t.io_read(0xE0, 4), 0x1122_AA44);
        t.io_write(0xE2, 0xBBCC, 2);
        assert_eq!(t.io_read(0xE0, 4), 0xBBCC_AA44);
        // A write straddling the end only touches the register's bytes.
        t.io_write(0xE3, 0x5566, 2);
        assert_eq!(t.io_read(0xE0, 4), 0x66CC_AA44);
    }

    #[test]
    fn irq_levels_are_reported_and_read_back() {
        let mut t = TestDev::new();
        assert_eq!(t.io_write(0x2004, 1, 1), vec![(4, true)]);
        assert_eq!(t.io_read(0x2004, 1), 1);
        assert!(t.irq_level(4));
        assert_eq!(t.io_write(0x2004, 0, 1), vec![(4, false)]);
        assert_eq!(t.io_read(0x2004, 1), 0);
        assert_eq!(t.io_write(0x2017, 0x80, 1), vec![(23, true)]);
        assert!(t.irq_level(23));
        assert!(!t.irq_level(24));
    }

    #[test]
    fn wide_irq_writes_cover_consecutive_lines() {
        let mut t = TestDev::new();
        assert_eq!(
            t.io_write(0x2000, 0x0001_0001, 4),
            vec![(0, true), (1, false), (2, true), (3, false)]
        );
        assert_eq!(t.io_read(0x2000, 4), 0x0001_0001);
        // Beyond line 23 nothing is reported.
        assert_eq!(
            t.io_write(0x2016, 0xFFFF_FFFF, 4),
            vec![(22, true), (23, true)]
        );
        assert_eq!(t.io_read(0x2016, 4), 0xFFFF_0101);
    }

    #[test]
    fn flush_page_accepted_and_ignored() {
        let mut t = TestDev::new();
        assert!(t.io_write(0xE4, 0x1234_5000, 4).is_empty());
        assert_eq!(t.io_read(0xE4, 4), 0);
        assert_eq!(t.io_read(0xE0, 4), 0);
    }

    #[test]
    fn unknown_ports() {
        let mut t = TestDev::new();
        assert_eq!(t.io_read(0x80, 1), 0xFF);
        assert_eq!(t.io_read(0x1FFF, 2), 0x00FF);
        assert!(t.io_write(0x2018, 1, 1).is_empty());
        assert!(t.io_write(0xFFFF, u64::MAX, 8).is_empty());
        assert_eq!(t.io_read(0xFFFF, 8), u64::MAX);
        assert_eq!(t.io_read(0xE0, 0), 0);
    }

    #[test]
    fn mmio_scratch_little_endian() {
        let mut t = TestDev::new();
        t.mmio_write(0x100, 0x0102_0304_0506_0708, 8);
        assert_eq!(t.mmio_read(0x100, 1), 0x08);
        assert_eq!(t.mmio_read(0x107, 1), 0x01);
        assert_eq!(t.mmio_read(0x102, 4), 0x0304_0506);
        assert_eq!(t.mmio_read(0x100, 8), 0x0102_0304_0506_0708);
        t.mmio_write(0x101, 0xFFFF, 2);
        assert_eq!(t.mmio_read(0x100, 4), 0x05FF_FF08);
    }

    #[test]
    fn mmio_bounds() {
        let mut t = TestDev::new();
        t.mmio_write(0xFFFE, 0xAABB_CCDD, 4);
        assert_eq!(t.mmio_read(0xFFFE, 4), 0xCCDD);
        assert_eq!(t.mmio_read(0x1_0000, 4), 0);
        t.mmio_write(u64::MAX, u64::MAX, 8);
        assert_eq!(t.mmio_read(u64::MAX, 8), 0);
        assert_eq!(t.mmio_read(0, 100), 0);
    }
}
