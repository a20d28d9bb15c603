//! ELF program headers as loadable segments (guest-facing parsing, fuzzable).

use object::read::elf::{FileHeader, ProgramHeader};

use crate::LoadError;

/// A PT_LOAD segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Physical load address (p_paddr).
    pub paddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// The parts of an ELF file a loader needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

impl Image {
    /// End of the highest non-empty segment (where modules may follow).
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.memsz > 0)
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(0)
    }
}

pub fn is_elf64(data: &[u8]) -> bool {
    data.len() >= 5 && data[..4] == *b"\x7fELF" && data[4] == 2
}

pub fn is_elf32(data: &[u8]) -> bool {
    data.len() >= 5 && data[..4] == *b"\x7fELF" && data[4] == 1
}

/// Xen's `XEN_ELFNOTE_PHYS32_ENTRY` note type (the PVH entry point), in a note named "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn has_pvh_note_with<H: FileHeader<Endian = object::Endianness>>(data: &[u8]) -> bool {
    let Ok(h) = H::parse(data) else { return false };
    let Ok(e) = h.endian() else { return false };
    let Ok(phs) = h.program_headers(e, data) else {
        return false;
    };
    for ph in phs {
        if let Ok(Some(mut notes)) = ph.notes(e, data) {
            while let Ok(Some(n)) = notes.next() {
                if n.name() == b"Xen" && n.n_type(e).0 == XEN_ELFNOTE_PHYS32_ENTRY {
                    return true;
                }
            }
        }
    }
    false
}

/// An ELF file (either class) with a PVH entry note (Linux built with `CONFIG_PVH`).
pub fn has_pvh_note(data: &[u8]) -> bool {
    if is_elf64(data) {
        has_pvh_note_with::<object::elf::FileHeader64<object::Endianness>>(data)
    } else if is_elf32(data) {
        has_pvh_note_with::<object::elf::FileHeader32<object::Endianness>>(data)
    } else {
        false
    }
}

fn bad(e: impl std::fmt::Display) -> LoadError {
    LoadError::Elf(e.to_string())
}

fn parse_with<H: FileHeader<Endian = object::Endianness>>(
    data: &[u8],
    machine: u16,
    what: &str,
) -> Result<Image, LoadError> {
    let h = H::parse(data).map_err(bad)?;
    let e = h.endian().map_err(bad)?;
    if h.is_big_endian() {
        return Err(bad(format!("{what} must be little-endian")));
    }
    if h.e_machine(e).0 != machine {
        return Err(bad(format!(
            "{what}: wrong machine type {}",
            h.e_machine(e).0
        )));
    }
    if h.e_type(e) != object::elf::ET_EXEC {
        return Err(bad(format!("{what} must be an executable (ET_EXEC)")));
    }
    let ph_end = h
        .e_phoff(e)
        .into()
        .saturating_add(u64::from(h.e_phnum(e)) * u64::from(h.e_phentsize(e)));
    let phs = h.program_headers(e, data).map_err(|err| {
        if ph_end > data.len() as u64 {
            LoadError::Truncated {
                what: "ELF program headers".into(),
                need: ph_end,
                have: data.len() as u64,
            }
        } else if h.e_phoff(e).into() >= data.len() as u64 {
            LoadError::Truncated {
                what: "ELF program headers".into(),
                need: h.e_phoff(e).into(),
                have: data.len() as u64,
            }
        } else {
            bad(err)
        }
    })?;
    let mut segments = Vec::new();
    for ph in phs {
        if ph.p_type(e) != object::elf::PT_LOAD {
            continue;
        }
        let s = Segment {
            paddr: ph.p_paddr(e).into(),
            offset: ph.p_offset(e).into(),
            filesz: ph.p_filesz(e).into(),
            memsz: ph.p_memsz(e).into(),
        };
        if s.filesz > s.memsz {
            return Err(bad(format!(
                "segment at {:#x}: file size {:#x} exceeds memory size {:#x}",
                s.paddr, s.filesz, s.memsz
            )));
        }
        let need = s
            .offset
            .checked_add(s.filesz)
            .ok_or_else(|| bad("segment offset overflows"))?;
        if need > data.len() as u64 {
            return Err(LoadError::Truncated {
                what: format!("segment at {:#x}", s.paddr),
                need,
                have: data.len() as u64,
            });
        }
        if s.paddr.checked_add(s.memsz).is_none() {
            return Err(bad("segment address overflows"));
        }
        segments.push(s);
    }
    if segments.is_empty() {
        return Err(bad("no loadable segments"));
    }
    Ok(Image {
        entry: h.e_entry(e).into(),
        segments,
    })
}

/// Parse an ELF32 i386 executable.
pub fn parse32(data: &[u8]) -> Result<Image, LoadError> {
    parse_with::<object::elf::FileHeader32<object::Endianness>>(
        data,
        object::elf::EM_386.0,
        "a 32-bit ELF",
    )
}

/// Parse an ELF64 x86-64 executable.
pub fn parse64(data: &[u8]) -> Result<Image, LoadError> {
    parse_with::<object::elf::FileHeader64<object::Endianness>>(
        data,
        object::elf::EM_X86_64.0,
        "a 64-bit ELF",
    )
}

/// Check and copy segments into RAM (zeroing each segment's tail).
pub fn load_segments(
    mem: &palacios_vmm::GuestMem,
    map: &palacios_vmm::MemoryMap,
    data: &[u8],
    img: &Image,
) -> Result<(), LoadError> {
    load_segments_in(mem, map, data, img, true)
}

/// [`load_segments`]; `boot_area`: refuse segments in the loaders' fixed low area (a
/// Multiboot kernel may use it: its loader then finds room elsewhere).
pub fn load_segments_in(
    mem: &palacios_vmm::GuestMem,
    map: &palacios_vmm::MemoryMap,
    data: &[u8],
    img: &Image,
    boot_area: bool,
) -> Result<(), LoadError> {
    let ranges: Vec<(u64, u64)> = img.segments.iter().map(|s| (s.paddr, s.memsz)).collect();
    crate::check_disjoint(&ranges)?;
    for s in &img.segments {
        crate::check_ram(map, "ELF segment", s.paddr, s.memsz)?;
        if boot_area {
            crate::check_boot_area("ELF segment", s.paddr, s.memsz)?;
        }
    }
    for s in &img.segments {
        crate::write(
            mem,
            s.paddr,
            &data[s.offset as usize..(s.offset + s.filesz) as usize],
        )?;
        crate::zero(mem, s.paddr + s.filesz, s.memsz - s.filesz)?;
    }
    Ok(())
}

/// A minimal ELF executable with the given segments (paddr, bytes, memsz); for tests and fuzz seeds.
pub fn build_test_elf(class64: bool, entry: u64, segs: &[(u64, &[u8], u64)]) -> Vec<u8> {
    let (ehsize, phsize) = if class64 {
        (64usize, 56usize)
    } else {
        (52, 32)
    };
    let mut out = vec![0u8; ehsize + phsize * segs.len()];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = if class64 { 2 } else { 1 };
    out[5] = 1;
    out[6] = 1;
    let w16 = |o: &mut Vec<u8>, at: usize, v: u16| o[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let w32 = |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let w64 = |o: &mut Vec<u8>, at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_le_bytes());
    w16(&mut out, 16, 2);
    w16(&mut out, 18, if class64 { 62 } else { 3 });
    w32(&mut out, 20, 1);
    let mut offsets = Vec::new();
    let mut data_off = out.len();
    for (_, bytes, _) in segs {
        offsets.push(data_off);
        data_off += bytes.len();
    }
    if class64 {
        w64(&mut out, 24, entry);
        w64(&mut out, 32, ehsize as u64);
        w16(&mut out, 52, ehsize as u16);
        w16(&mut out, 54, phsize as u16);
        w16(&mut out, 56, segs.len() as u16);
    } else {
        w32(&mut out, 24, entry as u32);
        w32(&mut out, 28, ehsize as u32);
        w16(&mut out, 40, ehsize as u16);
        w16(&mut out, 42, phsize as u16);
        w16(&mut out, 44, segs.len() as u16);
    }
    for (i, (paddr, bytes, memsz)) in segs.iter().enumerate() {
        let at = ehsize + i * phsize;
        w32(&mut out, at, 1);
        if class64 {
            w64(&mut out, at + 8, offsets[i] as u64);
            w64(&mut out, at + 16, *paddr);
            w64(&mut out, at + 24, *paddr);
            w64(&mut out, at + 32, bytes.len() as u64);
            w64(&mut out, at + 40, *memsz);
        } else {
            w32(&mut out, at + 4, offsets[i] as u32);
            w32(&mut out, at + 8, *paddr as u32);
            w32(&mut out, at + 12, *paddr as u32);
            w32(&mut out, at + 16, bytes.len() as u32);
            w32(&mut out, at + 20, *memsz as u32);
        }
    }
    for (_, bytes, _) in segs {
        out.extend_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_builds() {
        let f = build_test_elf(true, 0x100010, &[(0x100000, b"abcd", 0x10)]);
        let img = parse64(&f).unwrap();
        assert_eq!(img.entry, 0x100010);
        assert_eq!(
            img.segments,
            vec![Segment {
                paddr: 0x100000,
                offset: 120,
                filesz: 4,
                memsz: 0x10
            }]
        );
        assert!(parse32(&f).is_err(), "a 64-bit file is not a 32-bit one");
        let f32 = build_test_elf(false, 0x100000, &[(0x100000, b"xy", 2)]);
        assert_eq!(parse32(&f32).unwrap().segments[0].offset, 84);
    }

    #[test]
    fn truncation_is_reported() {
        let f = build_test_elf(false, 0x100000, &[(0x100000, &[7u8; 64], 64)]);
        for cut in [10usize, 60, f.len() - 1] {
            let e = parse32(&f[..cut]).unwrap_err();
            assert!(
                matches!(e, LoadError::Truncated { .. } | LoadError::Elf(_)),
                "{cut}: {e}"
            );
        }
        assert!(matches!(
            parse32(&f[..f.len() - 1]).unwrap_err(),
            LoadError::Truncated { .. }
        ));
    }

    #[test]
    fn filesz_above_memsz_is_refused() {
        let f = build_test_elf(true, 0, &[(0x100000, b"abcd", 2)]);
        assert!(parse64(&f).unwrap_err().to_string().contains("exceeds"));
    }
}
