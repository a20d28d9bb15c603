//! Multiboot v1: header parsing (guest-facing, fuzzable), the information structure, and the
//! loader itself (ELF32 program headers, or the a.out address fields when flags bit 16 is set).

use palacios_vmm::memory::RegionKind;
use palacios_vmm::{GuestMem, MemoryMap};
use palacios_x86::{CpuState, cr0};

use crate::{BootParams, INFO_AREA, LoadError, check_ram, elf, write, zero};

pub const HEADER_MAGIC: u32 = 0x1bad_b002;
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie in the first 8 KiB, 4-byte aligned.
pub const SEARCH_LIMIT: usize = 8192;

const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
const KNOWN_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// The a.out kludge address fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AoutFields {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// A parsed Multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// File offset of the header.
    pub offset: usize,
    pub flags: u32,
    pub aout: Option<AoutFields>,
}

fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    d.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Find and check the header. `Ok(None)`: no header; `Err`: a header that is wrong.
pub fn find_header(image: &[u8]) -> Result<Option<Header>, LoadError> {
    let limit = image.len().min(SEARCH_LIMIT);
    let mut off = 0;
    while off + 12 <= limit {
        let (magic, flags, sum) = (
            u32_at(image, off),
            u32_at(image, off + 4),
            u32_at(image, off + 8),
        );
        if let (Some(HEADER_MAGIC), Some(flags), Some(sum)) = (magic, flags, sum) {
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) == 0 {
                return parse_at(image, off, flags).map(Some);
            }
        }
        off += 4;
    }
    Ok(None)
}

fn parse_at(image: &[u8], offset: usize, flags: u32) -> Result<Header, LoadError> {
    let unknown = flags & 0xffff & !KNOWN_REQUIRED;
    if unknown != 0 {
        return Err(LoadError::Multiboot(format!(
            "the kernel requires unsupported features (flags {unknown:#x})"
        )));
    }
    if flags & FLAG_VIDEO_MODE != 0 {
        tracing::warn!(
            "multiboot: the kernel asks for a video mode; there is no framebuffer, the request is ignored"
        );
    }
    let aout = if flags & FLAG_AOUT_KLUDGE != 0 {
        let f = |i: usize| {
            u32_at(image, offset + 12 + 4 * i).ok_or_else(|| LoadError::Truncated {
                what: "Multiboot header address fields".into(),
                need: (offset + 16 + 4 * i) as u64,
                have: image.len() as u64,
            })
        };
        Some(AoutFields {
            header_addr: f(0)?,
            load_addr: f(1)?,
            load_end_addr: f(2)?,
            bss_end_addr: f(3)?,
            entry_addr: f(4)?,
        })
    } else {
        None
    };
    Ok(Header {
        offset,
        flags,
        aout,
    })
}

/// Where the a.out fields say the image goes: (file offset, load address, bytes from file,
/// bytes of memory including bss, entry).
pub fn aout_layout(
    image_len: usize,
    h: &Header,
    a: &AoutFields,
) -> Result<(u64, u64, u64, u64, u64), LoadError> {
    let bad = |m: String| LoadError::Multiboot(m);
    if a.header_addr < a.load_addr {
        return Err(bad(format!(
            "header_addr {:#x} is below load_addr {:#x}",
            a.header_addr, a.load_addr
        )));
    }
    let delta = u64::from(a.header_addr - a.load_addr);
    let file_off = (h.offset as u64).checked_sub(delta).ok_or_else(|| {
        bad(format!(
            "load_addr {:#x} would start before the file",
            a.load_addr
        ))
    })?;
    let avail = image_len as u64 - file_off;
    let file_len = if a.load_end_addr == 0 {
        avail
    } else if a.load_end_addr < a.load_addr {
        return Err(bad(format!(
            "load_end_addr {:#x} is below load_addr {:#x}",
            a.load_end_addr, a.load_addr
        )));
    } else {
        u64::from(a.load_end_addr - a.load_addr)
    };
    if file_len > avail {
        return Err(LoadError::Truncated {
            what: "the Multiboot a.out image".into(),
            need: file_off + file_len,
            have: image_len as u64,
        });
    }
    let load = u64::from(a.load_addr);
    let mem_len = if a.bss_end_addr == 0 {
        file_len
    } else if u64::from(a.bss_end_addr) < load + file_len {
        return Err(bad(format!(
            "bss_end_addr {:#x} is below the end of the loaded image",
            a.bss_end_addr
        )));
    } else {
        u64::from(a.bss_end_addr) - load
    };
    Ok((file_off, load, file_len, mem_len, u64::from(a.entry_addr)))
}

/// Bump allocator over the information area.
struct InfoArea {
    next: u64,
    start: u64,
    end: u64,
}

impl InfoArea {
    fn alloc(&mut self, len: u64, align: u64) -> Result<u64, LoadError> {
        let at = self.next.div_ceil(align) * align;
        let end = at.checked_add(len).filter(|&e| e <= self.end).ok_or_else(|| {
            LoadError::Invalid(format!("the Multiboot information does not fit in {:#x}-{:#x} (command line too long?)", self.start, self.end))
        })?;
        self.next = end;
        Ok(at)
    }
    fn string(&mut self, mem: &GuestMem, s: &str) -> Result<u64, LoadError> {
        let mut b = s.as_bytes().to_vec();
        b.retain(|&c| c != 0);
        b.push(0);
        let at = self.alloc(b.len() as u64, 1)?;
        write(mem, at, &b)?;
        Ok(at)
    }
}

const BOOTLOADER_NAME: &str = "Palacios-rs";

/// Load the modules page-aligned from `after` and write the information structure in
/// [`INFO_AREA`]. Returns its address. Used by the Multiboot and the 64-bit ELF loaders.
pub fn write_info(
    mem: &GuestMem,
    map: &MemoryMap,
    p: &BootParams,
    after: u64,
) -> Result<u64, LoadError> {
    write_info_in(mem, map, p, after, INFO_AREA)
}

/// [`write_info`] with the information in `area` (start, end).
fn write_info_in(
    mem: &GuestMem,
    map: &MemoryMap,
    p: &BootParams,
    after: u64,
    area: (u64, u64),
) -> Result<u64, LoadError> {
    let mut area = InfoArea {
        next: area.0,
        start: area.0,
        end: area.1,
    };
    let info = area.alloc(88, 8)?;
    let mut flags = 1 | (1 << 2) | (1 << 6) | (1 << 9);
    let mut fields = [0u32; 22];
    // mem_lower / mem_upper in KiB.
    let ram: Vec<_> = map
        .regions()
        .iter()
        .filter(|r| r.kind == RegionKind::Ram)
        .collect();
    let lower = ram
        .iter()
        .find(|r| r.start == 0)
        .map(|r| r.end().min(0xa_0000))
        .unwrap_or(0);
    let upper = ram
        .iter()
        .find(|r| r.start == 0x10_0000)
        .map(|r| r.size)
        .unwrap_or(0);
    fields[1] = (lower / 1024) as u32;
    fields[2] = (upper / 1024).min(u64::from(u32::MAX)) as u32;
    fields[3] = 0xffff_ffff; // boot_device: none
    fields[4] = area.string(mem, p.cmdline)? as u32;
    // Modules.
    if !p.modules.is_empty() {
        flags |= 1 << 3;
        let list = area.alloc(16 * p.modules.len() as u64, 4)?;
        let page_up = |a: u64| {
            a.checked_next_multiple_of(4096)
                .ok_or_else(|| LoadError::Invalid("modules do not fit below 4 GiB".into()))
        };
        let mut at = page_up(after)?;
        for (i, m) in p.modules.iter().enumerate() {
            let len = m.data.len() as u64;
            let end = at
                .checked_add(len)
                .filter(|&e| e <= u64::from(u32::MAX))
                .ok_or_else(|| LoadError::Invalid("modules do not fit below 4 GiB".into()))?;
            check_ram(map, &format!("module {}", i + 1), at, len.max(1))?;
            write(mem, at, m.data)?;
            let s = area.string(mem, m.cmdline)?;
            let entry: Vec<u8> = [at as u32, end as u32, s as u32, 0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            write(mem, list + 16 * i as u64, &entry)?;
            at = page_up(end)?;
        }
        fields[5] = p.modules.len() as u32;
        fields[6] = list as u32;
    }
    // Memory map: every RAM/reserved region below 4 GiB and above, plus the APIC/firmware window.
    let mut entries: Vec<(u64, u64, u32)> = map
        .regions()
        .iter()
        .filter_map(|r| match r.kind {
            RegionKind::Ram => Some((r.start, r.size, 1)),
            RegionKind::Reserved => Some((r.start, r.size, 2)),
            RegionKind::Mmio => None,
        })
        .collect();
    entries.push((0xfec0_0000, 0x1_0000_0000 - 0xfec0_0000, 2));
    entries.sort_unstable();
    let mmap = area.alloc(24 * entries.len() as u64, 4)?;
    for (i, (base, len, kind)) in entries.iter().enumerate() {
        let mut e = Vec::with_capacity(24);
        e.extend_from_slice(&20u32.to_le_bytes());
        e.extend_from_slice(&base.to_le_bytes());
        e.extend_from_slice(&len.to_le_bytes());
        e.extend_from_slice(&kind.to_le_bytes());
        write(mem, mmap + 24 * i as u64, &e)?;
    }
    fields[11] = (24 * entries.len()) as u32;
    fields[12] = mmap as u32;
    fields[16] = area.string(mem, BOOTLOADER_NAME)? as u32;
    fields[0] = flags;
    let bytes: Vec<u8> = fields.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(mem, info, &bytes)?;
    Ok(info)
}

/// 32-bit protected mode, flat segments, paging off, IF=0; EAX/EBX per the specification.
fn entry_state(gdt: palacios_x86::DescriptorTable, entry: u64, info: u64) -> CpuState {
    let mut s = crate::flat_state(gdt, false);
    s.sregs.cr0 = cr0::PE | cr0::ET;
    s.regs = palacios_x86::Regs {
        rax: u64::from(BOOTLOADER_MAGIC),
        rbx: info,
        rip: entry,
        rflags: palacios_x86::rflags::FIXED,
        ..Default::default()
    };
    s
}

pub fn load(mem: &GuestMem, map: &MemoryMap, p: &BootParams) -> Result<CpuState, LoadError> {
    let h = find_header(p.image)?
        .ok_or_else(|| LoadError::Multiboot("no Multiboot header in the first 8 KiB".into()))?;
    let (entry, end, taken) = match &h.aout {
        Some(a) => {
            let (off, load, flen, mlen, entry) = aout_layout(p.image.len(), &h, a)?;
            check_ram(map, "kernel image", load, mlen)?;
            write(mem, load, &p.image[off as usize..(off + flen) as usize])?;
            zero(mem, load + flen, mlen - flen)?;
            (entry, load + mlen, vec![(load, mlen)])
        }
        None => {
            if !elf::is_elf32(p.image) {
                return Err(LoadError::Multiboot(
                    "flags bit 16 is clear, so the kernel must be an ELF32 file (or set the a.out address fields)".into(),
                ));
            }
            let img = elf::parse32(p.image)?;
            elf::load_segments_in(mem, map, p.image, &img, false)?;
            let taken = img.segments.iter().map(|s| (s.paddr, s.memsz)).collect();
            (img.entry, img.end(), taken)
        }
    };
    let entry = p.entry.unwrap_or(entry);
    if entry > u64::from(u32::MAX) {
        return Err(LoadError::Invalid(format!(
            "entry {entry:#x} is above 4 GiB"
        )));
    }
    // The GDT and the information go where the kernel is not (the usual 0x1000 and
    // 0x8000-0x9efff for a kernel above 1 MiB); modules from 1 MiB or the kernel's end.
    let (gdt_at, info_area) = if taken.iter().all(|&(s, l)| {
        l == 0 || s >= crate::BOOT_AREA.1 || s.saturating_add(l) <= crate::BOOT_AREA.0
    }) {
        (crate::GDT_ADDR, INFO_AREA)
    } else {
        let (a, b) = crate::free_boot_area(&taken)?;
        (a, (a + 0x1000, b))
    };
    let info = write_info_in(mem, map, p, end.max(0x10_0000), info_area)?;
    let gdt = crate::write_gdt_at(mem, gdt_at)?;
    Ok(entry_state(gdt, entry, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Module;
    use crate::testutil::*;

    fn header(flags: u32, aout: Option<[u32; 5]>) -> Vec<u8> {
        let mut h = Vec::new();
        for v in [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        for v in aout.iter().flatten() {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    fn u32_in(mem: &GuestMem, addr: u64) -> u32 {
        u32::from_le_bytes(read(mem, addr, 4).try_into().unwrap())
    }

    #[test]
    fn header_search_rules() {
        let mut img = vec![0u8; 100];
        img.extend(header(3, None));
        let h = find_header(&img).unwrap().unwrap();
        assert_eq!((h.offset, h.flags), (100, 3));
        // Misaligned or beyond 8 KiB: not found.
        let mut img = vec![0u8; 101];
        img.extend(header(3, None));
        assert_eq!(find_header(&img).unwrap(), None);
        let mut img = vec![0u8; 8192];
        img.extend(header(3, None));
        assert_eq!(find_header(&img).unwrap(), None);
        // Bad checksum: not a header.
        let mut img = header(3, None);
        img[8] ^= 1;
        assert_eq!(find_header(&img).unwrap(), None);
        // Unknown required feature bits are refused.
        assert!(find_header(&header(1 << 5, None)).is_err());
        // Address fields cut off.
        assert!(matches!(
            find_header(&header(1 << 16, None)),
            Err(LoadError::Truncated { .. })
        ));
    }

    #[test]
    fn elf_kernel_with_info_modules_and_mmap() {
        let code = [0xf4u8; 16];
        let mut text = header(3, None);
        text.extend_from_slice(&code);
        let img = elf::build_test_elf(false, 0x100000 + 12, &[(0x100000, &text, 0x2000)]);
        let (mem, map) = vm(32);
        let p = BootParams {
            cmdline: "hello world",
            modules: vec![Module {
                data: b"KEY=VALUE\n",
                cmdline: "mod1",
            }],
            ..params(&img)
        };
        let s = load(&mem, &map, &p).unwrap();
        assert_eq!(s.regs.rax, 0x2bad_b002);
        assert_eq!(s.regs.rip, 0x10000c);
        assert_eq!(s.regs.rflags & 0x200, 0, "IF=0");
        assert_eq!(s.sregs.cr0 & (cr0::PE | cr0::PG), cr0::PE);
        assert!(s.sregs.cs.db && s.sregs.cs.g && s.sregs.cs.limit == 0xffff_ffff);
        let info = s.regs.rbx;
        let flags = u32_in(&mem, info);
        assert_eq!(
            flags & 0b10_0100_1101,
            0b10_0100_1101,
            "mem, cmdline, mods, mmap, name"
        );
        assert_eq!(u32_in(&mem, info + 4), 639);
        assert_eq!(u32_in(&mem, info + 8), 31 * 1024);
        let cmd = u32_in(&mem, info + 16) as u64;
        assert_eq!(read(&mem, cmd, 12), b"hello world\0");
        assert_eq!(u32_in(&mem, info + 20), 1);
        let m = u32_in(&mem, info + 24) as u64;
        let (ms, me) = (u32_in(&mem, m) as u64, u32_in(&mem, m + 4) as u64);
        assert_eq!(ms % 4096, 0);
        assert!(ms >= 0x102000, "module after the kernel's bss");
        assert_eq!(read(&mem, ms, (me - ms) as usize), b"KEY=VALUE\n");
        // Bss zeroed, code loaded.
        assert_eq!(read(&mem, 0x10000c, 16), code.to_vec());
        assert_eq!(read(&mem, 0x101000, 8), vec![0; 8]);
        // Memory map: RAM at 0 and 1 MiB; total type-1 = 32 MiB minus the legacy hole.
        let (len, addr) = (
            u32_in(&mem, info + 44) as u64,
            u32_in(&mem, info + 48) as u64,
        );
        let mut ram = 0;
        for i in 0..len / 24 {
            let e = read(&mem, addr + 24 * i, 24);
            assert_eq!(u32::from_le_bytes(e[0..4].try_into().unwrap()), 20);
            if u32::from_le_bytes(e[20..24].try_into().unwrap()) == 1 {
                ram += u64::from_le_bytes(e[12..20].try_into().unwrap());
            }
        }
        assert_eq!(ram, (32 << 20) - 0x6_0400);
        // Page 0 is untouched RAM.
        assert_eq!(read(&mem, 0, 16), vec![0; 16]);
    }

    #[test]
    fn aout_kludge_uses_the_address_fields() {
        // Image: header at file offset 0 describing load at 0x200000, 0x40 bytes + 0x100 bss.
        let mut img = header(
            1 << 16 | 2,
            Some([0x20_0000, 0x20_0000, 0x20_0040, 0x20_0140, 0x20_0020]),
        );
        img.resize(0x40, 0x90);
        let (mem, map) = vm(8);
        let s = load(&mem, &map, &params(&img)).unwrap();
        assert_eq!(s.regs.rip, 0x20_0020);
        assert_eq!(read(&mem, 0x20_0000, 0x40), img);
        // bss_end below load_end is refused; load_end past the file is truncation.
        let mut bad = header(
            1 << 16,
            Some([0x20_0000, 0x20_0000, 0x20_0040, 0x20_0010, 0x20_0000]),
        );
        bad.resize(0x40, 0);
        assert!(load(&mem, &map, &params(&bad)).is_err());
        let short = header(
            1 << 16,
            Some([0x20_0000, 0x20_0000, 0x20_1000, 0, 0x20_0000]),
        );
        assert!(matches!(
            load(&mem, &map, &params(&short)).unwrap_err(),
            LoadError::Truncated { .. }
        ));
    }

    /// A kernel linked at 0x8000 (where the information area usually is) loads: the GDT and
    /// the information go where it is not, and its bytes are left intact.
    #[test]
    fn a_kernel_linked_low_gets_the_loader_structures_elsewhere() {
        let mut text = header(3, None);
        text.extend_from_slice(&[0xf4; 4]);
        let (mem, map) = vm(4);
        let low = elf::build_test_elf(false, 0x8000, &[(0x8000, &text, 0x2000)]);
        let st = load(&mem, &map, &params(&low)).unwrap();
        let (info, gdt) = (st.regs.rbx, st.sregs.gdt.base);
        let kernel = 0x8000..0xa000u64;
        assert!(
            !kernel.contains(&info) && !kernel.contains(&gdt),
            "{info:#x} {gdt:#x}"
        );
        assert!(info < 0x9_f000 && gdt < 0x9_f000);
        assert_eq!(read(&mem, 0x8000, text.len()), text);
        let flags = u32::from_le_bytes(read(&mem, info, 4).try_into().unwrap());
        assert_eq!(flags & 1, 1, "mem_lower/upper valid");
        // The usual places for a kernel above 1 MiB.
        let high = elf::build_test_elf(false, 0x10_0000, &[(0x10_0000, &text, 16)]);
        let st = load(&mem, &map, &params(&high)).unwrap();
        assert_eq!(
            (st.regs.rbx, st.sregs.gdt.base),
            (INFO_AREA.0, crate::GDT_ADDR)
        );
    }

    #[test]
    fn bad_placements_are_errors() {
        let mut text = header(3, None);
        text.extend_from_slice(&[0xf4; 4]);
        let (mem, map) = vm(4);
        let outside = elf::build_test_elf(false, 0x800000, &[(0x800000, &text, 16)]);
        assert!(matches!(
            load(&mem, &map, &params(&outside)).unwrap_err(),
            LoadError::OutsideRam { .. }
        ));
        let overlap = elf::build_test_elf(
            false,
            0x100000,
            &[(0x100000, &text, 0x100), (0x100080, b"x", 1)],
        );
        assert!(matches!(
            load(&mem, &map, &params(&overlap)).unwrap_err(),
            LoadError::Overlap { .. }
        ));
        // Linked into the whole low area: no room left for the loader's structures.
        let all_low = elf::build_test_elf(false, 0x1000, &[(0x1000, &text, 0x9e000)]);
        assert!(
            load(&mem, &map, &params(&all_low))
                .unwrap_err()
                .to_string()
                .contains("no room")
        );
        let not_elf = header(3, None);
        assert!(
            load(&mem, &map, &params(&not_elf))
                .unwrap_err()
                .to_string()
                .contains("ELF32")
        );
    }
}
