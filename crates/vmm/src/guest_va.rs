//! Guest-virtual to guest-physical translation through the guest's own page tables, for
//! hypercalls that take guest pointers. Read-only: accessed and dirty bits are not set.

use palacios_x86::SRegs;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
/// Physical-address bits of an entry (bits 12..51).
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Why a guest address cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaError {
    /// Not mapped (or mapped for the kernel and the access came from user mode).
    NotMapped,
    /// The page tables themselves are outside RAM, or a mode this walk does not know.
    BadTables,
}

/// Translate `va` with the paging mode of `sregs` (identity when paging is off). `user`:
/// the access must be allowed to user mode.
pub fn translate(mem: &GuestMem, sregs: &SRegs, va: u64, user: bool) -> Result<u64, VaError> {
    if sregs.cr0 & CR0_PG == 0 {
        return Ok(va & 0xffff_ffff);
    }
    let read = |a: u64, wide: bool| -> Result<u64, VaError> {
        if wide {
            mem.read_obj::<u64>(GuestAddress(a))
                .map_err(|_| VaError::BadTables)
        } else {
            mem.read_obj::<u32>(GuestAddress(a))
                .map(u64::from)
                .map_err(|_| VaError::BadTables)
        }
    };
    let check = |e: u64| -> Result<u64, VaError> {
        if e & PRESENT == 0 || (user && e & USER == 0) {
            Err(VaError::NotMapped)
        } else {
            Ok(e)
        }
    };
    if sregs.cr4 & CR4_PAE == 0 {
        // Two-level 32-bit paging, 4 MiB pages with CR4.PSE.
        let va = va & 0xffff_ffff;
        let pde = check(read((sregs.cr3 & 0xffff_f000) + ((va >> 22) << 2), false)?)?;
        if pde & LARGE != 0 && sregs.cr4 & CR4_PSE != 0 {
            let hi = ((pde >> 13) & 0xff) << 32;
            return Ok(hi | (pde & 0xffc0_0000) | (va & 0x3f_ffff));
        }
        let pte = check(read(
            (pde & 0xffff_f000) + (((va >> 12) & 0x3ff) << 2),
            false,
        )?)?;
        return Ok((pte & 0xffff_f000) | (va & 0xfff));
    }
    if sregs.cr4 & CR4_LA57 != 0 {
        return Err(VaError::BadTables);
    }
    let long = sregs.efer & EFER_LMA != 0;
    let (mut table, levels) = if long {
        if !canonical(va) {
            return Err(VaError::NotMapped);
        }
        (sregs.cr3 & ADDR, 4)
    } else {
        // PAE: the four PDPTEs at CR3 (32-byte aligned).
        let va = va & 0xffff_ffff;
        let pdpte = check(read((sregs.cr3 & 0xffff_ffe0) + ((va >> 30) << 3), true)?)?;
        (pdpte & ADDR, 2)
    };
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = check(read(table + (((va >> shift) & 0x1ff) << 3), true)?)?;
        if level == 1 || (e & LARGE != 0 && level <= 3) {
            let page = 1u64 << shift;
            return Ok((e & ADDR & !(page - 1)) | (va & (page - 1)));
        }
        table = e & ADDR;
    }
    Err(VaError::BadTables)
}

fn canonical(va: u64) -> bool {
    let top = (va as i64) >> 47;
    top == 0 || top == -1
}

/// Read `len` bytes at guest address `addr` (virtual when `virt`), page by page. Every byte
/// must be guest RAM.
pub fn read(
    mem: &GuestMem,
    sregs: &SRegs,
    addr: u64,
    len: usize,
    virt: bool,
) -> Result<Vec<u8>, VaError> {
    let mut out = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let va = addr.wrapping_add(done as u64);
        let pa = if virt {
            translate(mem, sregs, va, false)?
        } else {
            va
        };
        let n = (4096 - (va & 0xfff) as usize).min(len - done);
        mem.read_slice(&mut out[done..done + n], GuestAddress(pa))
            .map_err(|_| VaError::NotMapped)?;
        done += n;
    }
    Ok(out)
}

/// Write `data` at guest address `addr` (virtual when `virt`); nothing is written unless every
/// page is mapped RAM.
pub fn write(
    mem: &GuestMem,
    sregs: &SRegs,
    addr: u64,
    data: &[u8],
    virt: bool,
) -> Result<(), VaError> {
    let mut pieces = Vec::new();
    let mut done = 0;
    while done < data.len() {
        let va = addr.wrapping_add(done as u64);
        let pa = if virt {
            translate(mem, sregs, va, false)?
        } else {
            va
        };
        let n = (4096 - (va & 0xfff) as usize).min(data.len() - done);
        if !crate::memory::is_ram(mem, pa, n as u64) {
            return Err(VaError::NotMapped);
        }
        pieces.push((pa, done, n));
        done += n;
    }
    for (pa, off, n) in pieces {
        mem.write_slice(&data[off..off + n], GuestAddress(pa))
            .map_err(|_| VaError::NotMapped)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryMap;

    fn mem() -> GuestMem {
        MemoryMap::pc(16 << 20).create_memory().unwrap()
    }

    #[test]
    fn four_level_and_large_pages_translate() {
        let m = mem();
        // PML4 at 0x10000 -> PDPT 0x11000 -> PD 0x12000 -> PT 0x13000 -> page 0x200000.
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).unwrap();
        w(0x10000, 0x11000 | 3);
        w(0x11000, 0x12000 | 3);
        w(0x12000, 0x13000 | 3);
        w(0x13000 + 8, 0x20_0000 | 3); // va 0x1000 -> 0x200000
        w(0x12000 + 8, 0x40_0000 | 3 | LARGE); // va 0x200000 (2 MiB page) -> 0x400000
        let s = SRegs {
            cr0: CR0_PG | 1,
            cr4: CR4_PAE,
            cr3: 0x10000,
            efer: EFER_LMA,
            ..Default::default()
        };
        assert_eq!(translate(&m, &s, 0x1234, false), Ok(0x20_0234));
        assert_eq!(translate(&m, &s, 0x20_1234, false), Ok(0x40_1234));
        assert_eq!(translate(&m, &s, 0x3000, false), Err(VaError::NotMapped));
        // Supervisor-only pages refuse user accesses.
        assert_eq!(translate(&m, &s, 0x1234, true), Err(VaError::NotMapped));
        assert_eq!(
            translate(&m, &s, 0x8000_0000_0000, false),
            Err(VaError::NotMapped)
        );
        // A read across into an unmapped page fails as a whole.
        assert!(read(&m, &s, 0x1ff0, 32, true).is_err());
        assert_eq!(read(&m, &s, 0x1ff0, 16, true).unwrap().len(), 16);
    }

    #[test]
    fn two_level_paging_and_no_paging() {
        let m = mem();
        let w = |a: u64, v: u32| m.write_obj(v, GuestAddress(a)).unwrap();
        w(0x10000, 0x11000 | 7); // user-accessible
        w(0x11000 + 4 * 5, 0x30_0000 | 7);
        w(0x10000 + 4, 0x80_0000 | 3 | LARGE as u32);
        let s = SRegs {
            cr0: CR0_PG | 1,
            cr4: CR4_PSE,
            cr3: 0x10000,
            ..Default::default()
        };
        assert_eq!(translate(&m, &s, 0x5010, true), Ok(0x30_0010));
        assert_eq!(translate(&m, &s, 0x40_0010, false), Ok(0x80_0010));
        let off = SRegs::default();
        assert_eq!(translate(&m, &off, 0x1234, false), Ok(0x1234));
        // Outside RAM: the write is refused before anything is written.
        assert!(write(&m, &off, 0xfff_ff000, &[1, 2, 3], false).is_err());
        assert!(write(&m, &off, 0x5000, &[1, 2, 3], false).is_ok());
    }
}
