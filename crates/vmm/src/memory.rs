//! The guest-physical memory map and guest RAM (through vm-memory).

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM as every part of the VMM sees it. Writes made through it can be watched
/// ([`crate::write_watch`]).
pub type GuestMem = GuestMemoryMmap<crate::write_watch::WriteWatch>;

/// Whether `[addr, addr+len)` lies entirely in one region of guest RAM (`len` > 0).
pub fn is_ram(mem: &GuestMem, addr: u64, len: u64) -> bool {
    use vm_memory::GuestMemoryBackend;
    len > 0 && len <= usize::MAX as u64 && mem.get_slice(GuestAddress(addr), len as usize).is_ok()
}

/// RAM below 4 GiB ends here; the rest of the low 4 GiB is the MMIO hole (PCI windows,
/// IOAPIC at 0xFEC00000, LAPIC at 0xFEE00000, firmware at the top).
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// RAM that does not fit below the hole continues here.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Start of the legacy VGA/ROM area that the e820 map reports as reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the legacy area.
pub const LEGACY_END: u64 = 0x10_0000;

/// What a region of the guest-physical map holds, in e820 terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Usable RAM.
    Ram,
    /// Backed by RAM but reserved for firmware/legacy use (the 640 KiB–1 MiB window).
    Reserved,
    /// Not backed: accesses go to the MMIO bus.
    Mmio,
}

/// One entry of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub size: u64,
    pub kind: RegionKind,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The PC memory map of a VM with a given amount of RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryMap {
    ram_bytes: u64,
    regions: Vec<Region>,
    /// Host-backed ranges (start, size), one memory slot each.
    slots: Vec<(u64, u64)>,
}

impl MemoryMap {
    /// Lay out `ram_bytes` of RAM (rounded down to 4 KiB) the PC way.
    pub fn pc(ram_bytes: u64) -> Self {
        let ram = ram_bytes & !0xfff;
        let low = ram.min(LOW_RAM_END);
        let high = ram - low;
        let mut regions = Vec::new();
        let mut slots = vec![(0, low)];
        if low > EBDA_START {
            regions.push(Region {
                start: 0,
                size: EBDA_START,
                kind: RegionKind::Ram,
            });
            let legacy_end = low.min(LEGACY_END);
            regions.push(Region {
                start: EBDA_START,
                size: legacy_end - EBDA_START,
                kind: RegionKind::Reserved,
            });
            if low > LEGACY_END {
                regions.push(Region {
                    start: LEGACY_END,
                    size: low - LEGACY_END,
                    kind: RegionKind::Ram,
                });
            }
        } else {
            regions.push(Region {
                start: 0,
                size: low,
                kind: RegionKind::Ram,
            });
        }
        regions.push(Region {
            start: LOW_RAM_END,
            size: HIGH_RAM_START - LOW_RAM_END,
            kind: RegionKind::Mmio,
        });
        if high > 0 {
            regions.push(Region {
                start: HIGH_RAM_START,
                size: high,
                kind: RegionKind::Ram,
            });
            slots.push((HIGH_RAM_START, high));
        }
        MemoryMap {
            ram_bytes: ram,
            regions,
            slots,
        }
    }

    /// Total RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// The map as an e820-style list, ascending.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Host-backed ranges (start, size).
    pub fn slots(&self) -> &[(u64, u64)] {
        &self.slots
    }

    /// Whether `[addr, addr+len)` lies entirely in backed memory.
    pub fn is_backed(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.slots.iter().any(|&(s, n)| addr >= s && end <= s + n)
    }

    /// Allocate guest RAM for this map.
    pub fn create_memory(&self) -> Result<GuestMem, vm_memory::mmap::FromRangesError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .slots
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|&(s, n)| (GuestAddress(s), n as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges)
    }

    /// Guest RAM mapped copy-on-write from `file` (a checkpoint's memory image at `offset`,
    /// the slots one after the other): nothing is read until the guest touches it, and
    /// nothing the guest writes reaches the file.
    pub fn create_memory_from_file(
        &self,
        file: &std::fs::File,
        offset: u64,
    ) -> Result<GuestMem, String> {
        use vm_memory::bitmap::NewBitmap;
        use vm_memory::{FileOffset, GuestRegionMmap, MmapRegion};
        let mut regions = Vec::new();
        let mut at = offset;
        for &(start, size) in self.slots.iter().filter(|(_, n)| *n > 0) {
            let f = file
                .try_clone()
                .map_err(|e| format!("cannot map the memory image: {e}"))?;
            let region = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
                size as usize,
                crate::write_watch::WriteWatch::with_len(size as usize),
            )
            .with_file_offset(FileOffset::new(f, at))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| {
                format!("cannot map {size:#x} bytes of the memory image at {at:#x}: {e}")
            })?;
            let _: &MmapRegion<crate::write_watch::WriteWatch> = &region;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(start))
                    .ok_or_else(|| format!("memory slot at {start:#x} overflows"))?,
            );
            at += size;
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_is_one_low_slot_with_legacy_hole_reported() {
        let m = MemoryMap::pc(128 * MIB);
        assert_eq!(m.slots(), &[(0, 128 * MIB)]);
        let kinds: Vec<_> = m.regions().iter().map(|r| (r.start, r.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, RegionKind::Ram),
                (EBDA_START, RegionKind::Reserved),
                (LEGACY_END, RegionKind::Ram),
                (LOW_RAM_END, RegionKind::Mmio)
            ]
        );
        assert!(m.is_backed(0, 4096));
        assert!(!m.is_backed(128 * MIB - 1, 2));
    }

    #[test]
    fn large_guest_continues_above_4g_and_leaves_the_apic_hole() {
        let m = MemoryMap::pc(4096 * MIB);
        assert_eq!(
            m.slots(),
            &[(0, LOW_RAM_END), (HIGH_RAM_START, 4096 * MIB - LOW_RAM_END)]
        );
        assert_eq!(m.ram_bytes(), 4096 * MIB);
        assert!(!m.is_backed(0xfec0_0000, 4));
        assert!(!m.is_backed(0xffff_fff0, 4));
        assert!(m.is_backed(HIGH_RAM_START, 4096));
        let ram: u64 = m
            .regions()
            .iter()
            .filter(|r| r.kind != RegionKind::Mmio)
            .map(|r| r.size)
            .sum();
        assert_eq!(ram, 4096 * MIB);
    }

    #[test]
    fn overflowing_ranges_are_not_backed() {
        let m = MemoryMap::pc(16 * MIB);
        assert!(!m.is_backed(u64::MAX - 1, 4));
    }
}
