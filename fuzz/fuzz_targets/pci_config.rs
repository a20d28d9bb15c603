#![no_main]
//! PCI configuration-space and MSI-X table writes, as a guest issues them: any sequence keeps
//! the read-only fields, decodes only aligned in-range BARs, and never panics.
use libfuzzer_sys::fuzz_target;
use palacios_pci::config::{BarKind, BarSpec, ConfigSpace, CONFIG_SIZE};
use palacios_pci::msix::MsixTable;
use palacios_vmm::irq::{MsiController, MsiMessage};

struct Count(std::sync::atomic::AtomicU32);
impl MsiController for Count {
    fn send_msi(&self, _m: MsiMessage) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = ConfigSpace::new(0x1af4, 0x1042, (1, 0, 0), 1);
    c.add_bar(0, BarSpec { size: 0x100, kind: BarKind::Io, prefetchable: false });
    c.add_bar(4, BarSpec { size: 0x8000, kind: BarKind::Mem64, prefetchable: false });
    let mut t = MsixTable::new(3);
    let (body, mask) = t.capability(4, 0x4000, 0x6000);
    c.add_capability(0x11, &body, &mask);
    let sink = Count(Default::default());
    for op in data.chunks_exact(8) {
        let off = u16::from_le_bytes([op[0], op[1]]) as usize % (CONFIG_SIZE + 16);
        let len = [1, 2, 4, 8][op[2] as usize % 4];
        let val = &op[3..8];
        let mut bytes = [0u8; 8];
        bytes[..5].copy_from_slice(val);
        match op[2] >> 4 {
            0..=9 => c.write(off, &bytes[..len]),
            10..=13 => t.write_table(off as u64, &bytes[..len], &sink),
            14 => {
                t.notify(op[3] as u16, &sink);
            }
            _ => t.set_control(u16::from_le_bytes([op[3], op[4]]), &sink),
        }
        let mut r = [0u8; 8];
        c.read(off, &mut r[..len]);
        t.read_table(off as u64, &mut r[..len]);
        t.read_pba(off as u64 % 64, &mut r[..len]);
    }
    assert_eq!(c.vendor(), 0x1af4);
    assert_eq!(c.device(), 0x1042);
    for b in c.active_bars() {
        assert_eq!(b.addr % b.size, 0);
        assert!(b.addr != 0);
        if b.kind == BarKind::Io {
            assert!(b.addr + b.size <= 0x1_0000);
        }
    }
});
