//! Guest loaders. Each takes the image bytes, writes the guest into RAM and returns the
//! [`CpuState`] the boot core starts in.
//!
//! Guest-facing parsing (the Multiboot header, ELF program headers) lives in [`multiboot`] and
//! [`elf`] as pure functions over byte slices, so it can be fuzzed on its own.
//!
//! Low-memory layout used by the loaders:
//! | range              | use                                                   |
//! |--------------------|-------------------------------------------------------|
//! | 0x1000–0x101f      | boot GDT (null, code32, data, code64)                 |
//! | 0x2000–0x7fff      | identity page tables for long-mode entry (4 GiB)      |
//! | 0x8000–0x9efff     | Multiboot information, memory map, strings            |
//! | after the kernel   | modules (page aligned)                                |
//!
//! A Multiboot kernel linked into that low area is not refused: the GDT and the information
//! go in the largest part of 0x1000–0x9efff the kernel leaves free, and modules start at
//! 1 MiB or after the kernel, whichever is higher ([`multiboot::load`]).

pub mod elf;
pub mod elf64;
pub mod flat;
pub mod linux;
pub mod multiboot;
pub mod pvh;

use palacios_vmm::config::BootFormat;
use palacios_vmm::{GuestMem, MemoryMap};
use palacios_x86::CpuState;
use vm_memory::{Bytes, GuestAddress};

/// Where the boot GDT goes.
pub const GDT_ADDR: u64 = 0x1000;
/// Where the long-mode identity page tables go.
pub const PAGE_TABLES_ADDR: u64 = 0x2000;
/// The Multiboot information area.
pub const INFO_AREA: (u64, u64) = (0x8000, 0x9_f000);
/// Everything the loaders themselves write below the kernel.
pub const BOOT_AREA: (u64, u64) = (GDT_ADDR, INFO_AREA.1);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("{what} is truncated: needs {need} bytes, the file has {have}")]
    Truncated { what: String, need: u64, have: u64 },
    #[error("segments overlap: {a_start:#x}-{a_end:#x} and {b_start:#x}-{b_end:#x}")]
    Overlap {
        a_start: u64,
        a_end: u64,
        b_start: u64,
        b_end: u64,
    },
    #[error("{what} at {start:#x}-{end:#x} is outside guest RAM (the VM has {ram_mib} MiB)")]
    OutsideRam {
        what: String,
        start: u64,
        end: u64,
        ram_mib: u64,
    },
    #[error(
        "{what} at {start:#x}-{end:#x} overlaps the loader's boot area {area_start:#x}-{area_end:#x}"
    )]
    BootArea {
        what: String,
        start: u64,
        end: u64,
        area_start: u64,
        area_end: u64,
    },
    #[error("bad Multiboot header: {0}")]
    Multiboot(String),
    #[error("bad ELF file: {0}")]
    Elf(String),
    #[error("{0}")]
    Invalid(String),
}

/// A module to hand to a Multiboot kernel.
pub struct Module<'a> {
    pub data: &'a [u8],
    pub cmdline: &'a str,
}

/// What to load.
pub struct BootParams<'a> {
    pub format: BootFormat,
    pub image: &'a [u8],
    pub load_addr: Option<u64>,
    pub entry: Option<u64>,
    pub cmdline: &'a str,
    pub modules: Vec<Module<'a>>,
}

/// What `--format auto` tried, for its error message.
pub const AUTO_FORMATS: &str = "a Linux bzImage, a Multiboot kernel (ELF or a.out kludge), an ELF \
     with a PVH note, a 64-bit ELF, or a flat boot sector (0x55 0xAA at offset 510)";

/// Recognise the format of a kernel image, strictly: a bzImage, a Multiboot header in the
/// first 8 KiB (ELF or the a.out kludge), an ELF with a PVH entry note, a 64-bit ELF, or a
/// flat image only when it carries the boot-sector signature. Anything else is an error that
/// says what was tried (a flat image without the signature needs an explicit `flat`).
pub fn detect(image: &[u8]) -> Result<BootFormat, LoadError> {
    if linux::is_bzimage(image) {
        return Ok(BootFormat::Linux);
    }
    if matches!(multiboot::find_header(image), Ok(Some(_)) | Err(_)) {
        return Ok(BootFormat::Multiboot);
    }
    if image.len() >= 4 && image[..4] == *b"\x7fELF" {
        if elf::has_pvh_note(image) {
            return Ok(BootFormat::Pvh);
        }
        if elf::is_elf64(image) {
            return Ok(BootFormat::Elf64);
        }
        return Err(LoadError::Invalid(format!(
            "the kernel is an ELF file ({} bytes) but not one this loader runs: it has no \
             Multiboot header in its first 8 KiB, no PVH entry note, and it is not a complete \
             64-bit ELF",
            image.len()
        )));
    }
    if image.len() >= 512 && image[510..512] == [0x55, 0xaa] {
        return Ok(BootFormat::Flat);
    }
    Err(LoadError::Invalid(format!(
        "cannot tell the kernel's format ({} bytes, starting {}): it is not {AUTO_FORMATS}; \
         to load it as a raw real-mode binary anyway, give --format flat (<boot format=\"flat\">)",
        image.len(),
        image
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    )))
}

/// Load a guest; returns the boot core's initial state.
pub fn load(mem: &GuestMem, map: &MemoryMap, p: &BootParams) -> Result<CpuState, LoadError> {
    let format = if p.format == BootFormat::Auto {
        detect(p.image)?
    } else {
        p.format
    };
    let linux_initrd =
        matches!(format, BootFormat::Linux | BootFormat::Pvh) && p.modules.len() <= 1;
    if format != BootFormat::Multiboot
        && format != BootFormat::Elf64
        && !linux_initrd
        && !p.modules.is_empty()
    {
        return Err(LoadError::Invalid(
            "modules are only passed to multiboot and elf64 kernels (a Linux kernel takes one initrd)"
                .into(),
        ));
    }
    match format {
        BootFormat::Flat => flat::load(mem, map, p),
        BootFormat::Multiboot => multiboot::load(mem, map, p),
        BootFormat::Elf64 => elf64::load(mem, map, p),
        BootFormat::Linux => linux::load(mem, map, p),
        BootFormat::Pvh => pvh::load(mem, map, p),
        BootFormat::Auto => unreachable!("resolved above"),
    }
}

/// A range the loader is about to fill, checked against RAM.
pub(crate) fn check_ram(
    map: &MemoryMap,
    what: &str,
    start: u64,
    len: u64,
) -> Result<(), LoadError> {
    if len > 0 && !map.is_backed(start, len) {
        return Err(LoadError::OutsideRam {
            what: what.into(),
            start,
            end: start.saturating_add(len),
            ram_mib: map.ram_bytes() >> 20,
        });
    }
    Ok(())
}

/// Refuse a range that collides with the loader's own structures.
pub(crate) fn check_boot_area(what: &str, start: u64, len: u64) -> Result<(), LoadError> {
    let end = start.saturating_add(len);
    if len > 0 && start < BOOT_AREA.1 && end > BOOT_AREA.0 {
        return Err(LoadError::BootArea {
            what: what.into(),
            start,
            end,
            area_start: BOOT_AREA.0,
            area_end: BOOT_AREA.1,
        });
    }
    Ok(())
}

/// Refuse overlapping (start, len) ranges.
pub(crate) fn check_disjoint(ranges: &[(u64, u64)]) -> Result<(), LoadError> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| r.1 > 0)
        .map(|&(s, l)| (s, s.saturating_add(l)))
        .collect();
    v.sort_unstable();
    for w in v.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(LoadError::Overlap {
                a_start: w[0].0,
                a_end: w[0].1,
                b_start: w[1].0,
                b_end: w[1].1,
            });
        }
    }
    Ok(())
}

/// Write bytes into checked RAM.
pub(crate) fn write(mem: &GuestMem, addr: u64, data: &[u8]) -> Result<(), LoadError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| LoadError::Invalid(format!("writing guest memory at {addr:#x}: {e}")))
}

/// Zero a range of checked RAM.
pub(crate) fn zero(mem: &GuestMem, addr: u64, len: u64) -> Result<(), LoadError> {
    const CHUNK: [u8; 4096] = [0; 4096];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(4096);
        write(mem, addr + off, &CHUNK[..n as usize])?;
        off += n;
    }
    Ok(())
}

/// Protected-mode state with the boot GDT's flat segments (`long`: 64-bit code segment), a
/// busy TSS placeholder, an empty IDT and IF=0; the caller sets control registers and GPRs.
pub(crate) fn flat_state(gdt: palacios_x86::DescriptorTable, long: bool) -> CpuState {
    use palacios_x86::segment::{
        SEL_CODE32, SEL_CODE64, SEL_DATA, TYPE_CODE, TYPE_DATA, TYPE_TSS_BUSY, flat,
    };
    let mut s = CpuState::reset();
    s.sregs.cs = if long {
        flat(SEL_CODE64, TYPE_CODE, true)
    } else {
        flat(SEL_CODE32, TYPE_CODE, false)
    };
    let data = flat(SEL_DATA, TYPE_DATA, false);
    for seg in [
        &mut s.sregs.ds,
        &mut s.sregs.es,
        &mut s.sregs.fs,
        &mut s.sregs.gs,
        &mut s.sregs.ss,
    ] {
        *seg = data;
    }
    s.sregs.tr = palacios_x86::Segment {
        limit: 0x67,
        type_: TYPE_TSS_BUSY,
        present: true,
        ..Default::default()
    };
    s.sregs.gdt = gdt;
    s.sregs.idt = palacios_x86::DescriptorTable { base: 0, limit: 0 };
    s
}

/// Write the boot GDT.
pub(crate) fn write_gdt(mem: &GuestMem) -> Result<palacios_x86::DescriptorTable, LoadError> {
    write_gdt_at(mem, GDT_ADDR)
}

/// Write the boot GDT at `at`.
pub(crate) fn write_gdt_at(
    mem: &GuestMem,
    at: u64,
) -> Result<palacios_x86::DescriptorTable, LoadError> {
    let gdt = palacios_x86::segment::boot_gdt();
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, at, &bytes)?;
    Ok(palacios_x86::DescriptorTable {
        base: at,
        limit: (bytes.len() - 1) as u16,
    })
}

/// The largest page-aligned part of the low boot area (0x1000-0x9efff) that none of `taken`
/// ((start, len) ranges) overlaps: where a Multiboot kernel linked low leaves room for the
/// loader's own structures. At least 3 pages (the GDT and two of information).
pub(crate) fn free_boot_area(taken: &[(u64, u64)]) -> Result<(u64, u64), LoadError> {
    let mut cuts: Vec<(u64, u64)> = taken
        .iter()
        .filter(|r| r.1 > 0)
        .map(|&(s, l)| (s & !0xfff, s.saturating_add(l).div_ceil(0x1000) * 0x1000))
        .collect();
    cuts.sort_unstable();
    let mut best = (0u64, 0u64);
    let mut at = BOOT_AREA.0;
    for &(s, e) in cuts.iter().chain([(BOOT_AREA.1, BOOT_AREA.1)].iter()) {
        let gap_end = s.min(BOOT_AREA.1);
        if gap_end > at && gap_end - at > best.1 - best.0 {
            best = (at, gap_end);
        }
        at = at.max(e);
        if at >= BOOT_AREA.1 {
            break;
        }
    }
    if best.1 - best.0 < 0x3000 {
        return Err(LoadError::Invalid(format!(
            "the kernel leaves no room below {:#x} for the loader's GDT and Multiboot information (3 pages needed)",
            BOOT_AREA.1
        )));
    }
    Ok(best)
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    pub fn vm(mib: u64) -> (GuestMem, MemoryMap) {
        let map = MemoryMap::pc(mib << 20);
        (map.create_memory().unwrap(), map)
    }
    pub fn read(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
    pub fn params(image: &[u8]) -> BootParams<'_> {
        BootParams {
            format: BootFormat::Auto,
            image,
            load_addr: None,
            entry: None,
            cmdline: "",
            modules: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_checks() {
        assert!(check_disjoint(&[(0, 10), (10, 5), (100, 0), (100, 0)]).is_ok());
        let e = check_disjoint(&[(0x2000, 0x1000), (0x1000, 0x1001)]).unwrap_err();
        assert_eq!(
            e,
            LoadError::Overlap {
                a_start: 0x1000,
                a_end: 0x2001,
                b_start: 0x2000,
                b_end: 0x3000
            }
        );
    }

    #[test]
    fn detect_formats() {
        // Without the boot-sector signature a flat image is not guessed.
        let e = detect(&[0x90; 16]).unwrap_err().to_string();
        assert!(e.contains("--format flat"), "{e}");
        assert!(
            e.contains("cannot tell the kernel's format (16 bytes"),
            "{e}"
        );
        let mut sector = vec![0x90u8; 512];
        sector[510..].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(detect(&sector), Ok(BootFormat::Flat));
        let mut mb = vec![0u8; 64];
        mb[8..12].copy_from_slice(&0x1bad_b002u32.to_le_bytes());
        mb[16..20].copy_from_slice(&0u32.wrapping_sub(0x1bad_b002).to_le_bytes());
        assert_eq!(detect(&mb), Ok(BootFormat::Multiboot));
        let elf64 = elf::build_test_elf(true, 0x10_0000, &[(0x10_0000, &[0x90; 16], 16)]);
        assert_eq!(detect(&elf64), Ok(BootFormat::Elf64));
        let elf32 = elf::build_test_elf(false, 0x10_0000, &[(0x10_0000, &[0x90; 16], 16)]);
        let e = detect(&elf32).unwrap_err().to_string();
        assert!(
            e.contains("ELF file") && e.contains("no Multiboot header"),
            "{e}"
        );
        // A PNG is not a kernel.
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        assert!(
            detect(&png)
                .unwrap_err()
                .to_string()
                .contains("89 50 4e 47")
        );
    }
}
