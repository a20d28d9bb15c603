//! Reading and writing a 64-bit guest's virtual memory through its own 4-level page tables,
//! with the entries of the walk (GEARS services clear a page's no-execute bit while injected
//! code runs, and ask the guest kernel to fault in pages that are not present).

use palacios_vmm::GuestMem;
use vm_memory::{Bytes, GuestAddress};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
pub const NX: u64 = 1 << 63;
/// Physical-address bits of an entry (12..51).
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Why an address cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// Not present, or not allowed for this access (the address is the first bad one).
    NotMapped(u64),
    /// Mapped read-only and a write was asked for.
    ReadOnly(u64),
    /// Not a canonical address.
    NonCanonical(u64),
    /// The page tables lie outside guest RAM.
    BadTables,
}

impl std::fmt::Display for WalkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalkError::NotMapped(a) => write!(f, "address {a:#x} is not mapped"),
            WalkError::ReadOnly(a) => write!(f, "address {a:#x} is read-only"),
            WalkError::NonCanonical(a) => write!(f, "address {a:#x} is not canonical"),
            WalkError::BadTables => write!(f, "the page tables are outside guest RAM"),
        }
    }
}

/// A translation and the entries it went through (top level first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub pa: u64,
    pub writable: bool,
    pub user: bool,
    pub nx: bool,
    /// (physical address of the entry, its value), at most four.
    pub entries: Vec<(u64, u64)>,
}

fn canonical(va: u64) -> bool {
    ((va as i64) << 16 >> 16) as u64 == va
}

/// Translate `va` through the tables at `root` (a CR3 value; PCID bits ignored).
pub fn walk(mem: &GuestMem, root: u64, va: u64) -> Result<Mapping, WalkError> {
    if !canonical(va) {
        return Err(WalkError::NonCanonical(va));
    }
    let mut table = root & ADDR;
    let mut m = Mapping {
        pa: 0,
        writable: true,
        user: true,
        nx: false,
        entries: Vec::with_capacity(4),
    };
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let at = table + ((va >> shift) & 0x1ff) * 8;
        let e: u64 = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| WalkError::BadTables)?;
        m.entries.push((at, e));
        if e & PRESENT == 0 {
            return Err(WalkError::NotMapped(va));
        }
        m.writable &= e & WRITABLE != 0;
        m.user &= e & USER != 0;
        m.nx |= e & NX != 0;
        if level == 0 || (level < 3 && e & LARGE != 0) {
            let size = 1u64 << shift;
            m.pa = (e & ADDR & !(size - 1)) | (va & (size - 1));
            return Ok(m);
        }
        table = e & ADDR;
    }
    unreachable!("a 4-level walk ends at level 0")
}

/// Check that `va..va+len` is mapped for this access; the first page that is not is the error.
pub fn check(
    mem: &GuestMem,
    root: u64,
    va: u64,
    len: u64,
    user: bool,
    write: bool,
) -> Result<(), WalkError> {
    let mut page = va & !0xfff;
    let end = va.checked_add(len).ok_or(WalkError::NonCanonical(va))?;
    while page < end {
        let m = walk(mem, root, page)?;
        if user && !m.user {
            return Err(WalkError::NotMapped(page.max(va)));
        }
        if write && !m.writable {
            return Err(WalkError::ReadOnly(page.max(va)));
        }
        let Some(next) = page.checked_add(0x1000) else {
            break;
        };
        page = next;
    }
    Ok(())
}

/// Copy guest-virtual memory out (page by page through the tables).
pub fn read(
    mem: &GuestMem,
    root: u64,
    va: u64,
    out: &mut [u8],
    user: bool,
) -> Result<(), WalkError> {
    let mut done = 0usize;
    while done < out.len() {
        let a = va.wrapping_add(done as u64);
        let m = walk(mem, root, a)?;
        if user && !m.user {
            return Err(WalkError::NotMapped(a));
        }
        let n = (0x1000 - (a & 0xfff) as usize).min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], GuestAddress(m.pa))
            .map_err(|_| WalkError::NotMapped(a))?;
        done += n;
    }
    Ok(())
}

/// Copy into guest-virtual memory (the pages must be writable). All or nothing: the range is
/// checked before anything is written.
pub fn write(mem: &GuestMem, root: u64, va: u64, data: &[u8], user: bool) -> Result<(), WalkError> {
    check(mem, root, va, data.len() as u64, user, true)?;
    let mut done = 0usize;
    while done < data.len() {
        let a = va.wrapping_add(done as u64);
        let m = walk(mem, root, a)?;
        if user && !m.user {
            return Err(WalkError::NotMapped(a));
        }
        if !m.writable {
            return Err(WalkError::ReadOnly(a));
        }
        let n = (0x1000 - (a & 0xfff) as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], GuestAddress(m.pa))
            .map_err(|_| WalkError::NotMapped(a))?;
        done += n;
    }
    Ok(())
}

pub fn read_u64(mem: &GuestMem, root: u64, va: u64) -> Result<u64, WalkError> {
    let mut b = [0u8; 8];
    read(mem, root, va, &mut b, false)?;
    Ok(u64::from_le_bytes(b))
}

pub fn read_u32(mem: &GuestMem, root: u64, va: u64) -> Result<u32, WalkError> {
    let mut b = [0u8; 4];
    read(mem, root, va, &mut b, false)?;
    Ok(u32::from_le_bytes(b))
}

/// A NUL-terminated string of at most `max` bytes (lossy UTF-8).
pub fn read_cstr(
    mem: &GuestMem,
    root: u64,
    va: u64,
    max: usize,
    user: bool,
) -> Result<String, WalkError> {
    let mut out = Vec::new();
    let mut a = va;
    while out.len() < max {
        let n = ((0x1000 - (a & 0xfff)) as usize).min(max - out.len());
        let mut buf = vec![0u8; n];
        read(mem, root, a, &mut buf, user)?;
        if let Some(z) = buf.iter().position(|b| *b == 0) {
            out.extend_from_slice(&buf[..z]);
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&buf);
        a = a.wrapping_add(n as u64);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use palacios_vmm::test_support;

    /// Page tables at 0x1000.. mapping user VA 0x40_0000 (4 KiB, NX, writable) to 0x8000 and
    /// kernel VA 0xffff_8880_0000_0000 (2 MiB) to 0x20_0000. Returns the root.
    pub fn tables(mem: &GuestMem) -> u64 {
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
        // PML4 at 0x1000: entry 0 -> PDPT 0x2000, entry 0x111 -> PDPT 0x5000.
        w(0x1000, 0x2000 | 7);
        w(0x1000 + 0x111 * 8, 0x5000 | 3);
        w(0x2000, 0x3000 | 7); // PDPT[0] -> PD 0x3000
        w(0x3000 + 2 * 8, 0x4000 | 7); // PD[2] (0x40_0000) -> PT 0x4000
        w(0x4000, 0x8000 | 7 | NX); // PT[0] -> 0x8000
        w(0x4000 + 8, 0x9000 | 5); // PT[1] -> 0x9000, read-only
        w(0x5000, 0x6000 | 3); // PDPT[0] -> PD 0x6000
        w(0x6000, 0x20_0000 | 3 | LARGE); // 2 MiB page
        0x1000 | 0x5 // PCID bits are ignored
    }

    #[test]
    fn walks_small_and_large_pages_and_reports_nx_and_entries() {
        let mem = test_support::guest_mem(4 << 20);
        let root = tables(&mem);
        let m = walk(&mem, root, 0x40_0123).unwrap();
        assert_eq!(m.pa, 0x8123);
        assert!(m.nx && m.user && m.writable);
        assert_eq!(m.entries.len(), 4);
        assert_eq!(m.entries[3].0, 0x4000);
        let k = walk(&mem, root, 0xffff_8880_0001_2345).unwrap();
        assert_eq!(k.pa, 0x21_2345);
        assert!(!k.user && !k.nx);
        assert_eq!(k.entries.len(), 3);
        assert_eq!(
            walk(&mem, root, 0x40_2000),
            Err(WalkError::NotMapped(0x40_2000))
        );
        assert_eq!(
            walk(&mem, root, 0x8000_0000_0000),
            Err(WalkError::NonCanonical(0x8000_0000_0000))
        );
    }

    #[test]
    fn reads_and_writes_across_pages_and_respects_permissions() {
        let mem = test_support::guest_mem(4 << 20);
        let root = tables(&mem);
        write(&mem, root, 0x40_0ffc, b"abcd", true).unwrap();
        assert_eq!(
            write(&mem, root, 0x40_0ffe, b"abcd", true),
            Err(WalkError::ReadOnly(0x40_1000))
        );
        let mut b = [0u8; 4];
        read(&mem, root, 0x40_0ffc, &mut b, true).unwrap();
        assert_eq!(&b, b"abcd");
        assert!(read(&mem, root, 0xffff_8880_0000_0000, &mut b, true).is_err());
        write(&mem, root, 0xffff_8880_0000_0010, b"hi\0", false).unwrap();
        assert_eq!(
            read_cstr(&mem, root, 0xffff_8880_0000_0010, 64, false).unwrap(),
            "hi"
        );
        assert_eq!(
            check(&mem, root, 0x40_0000, 0x2000, true, true),
            Err(WalkError::ReadOnly(0x40_1000))
        );
        assert!(check(&mem, root, 0x40_0000, 0x2000, true, false).is_ok());
    }
}
