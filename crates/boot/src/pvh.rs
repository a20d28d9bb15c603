//! PVH entry (Xen's direct boot ABI, which Linux implements with `CONFIG_PVH`): an ELF vmlinux
//! with a `XEN_ELFNOTE_PHYS32_ENTRY` note is loaded by its program headers and entered in
//! 32-bit protected mode (flat segments, paging off) with EBX pointing at `hvm_start_info`
//! (magic, command line, the memory map, the initrd as module 0). Loading and the note
//! parsing come from linux-loader; the start info is written with its PVH configurator.
//!
//! Given a bzImage instead, the VMM extracts the ELF vmlinux from the compressed payload
//! (LZ4 legacy frames, as Debian's cloud kernels are built; uncompressed payloads too), which
//! saves the guest its own decompression and relocation.

use std::borrow::Cow;
use std::io::Cursor;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams as StartInfo};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use palacios_vmm::memory::RegionKind;
use palacios_vmm::{GuestMem, MemoryMap};
use palacios_x86::{CpuState, cr0};
use vm_memory::GuestAddress;

use crate::{BootParams, LoadError, check_ram, write, write_gdt};

/// hvm_start_info, then the memory map, then the module list.
pub const START_INFO: u64 = 0x8000;
const MEMMAP: u64 = 0x8400;
const MODLIST: u64 = 0x8e00;
pub const CMDLINE: u64 = 0x9000;
const CMDLINE_MAX: usize = 0x9_f000 - 0x9000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// LZ4 legacy frame magic (what the kernel's `unlz4` reads).
const LZ4_LEGACY: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Largest uncompressed chunk of a legacy frame.
const LZ4_CHUNK: usize = 8 << 20;

/// The ELF vmlinux inside a bzImage's payload.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, LoadError> {
    let bad =
        |m: String| LoadError::Invalid(format!("cannot extract vmlinux from the bzImage: {m}"));
    let setup_sects = match image.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => return Err(bad("truncated setup header".into())),
    };
    let rd32 = |o: usize| -> Result<usize, LoadError> {
        image
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
            .ok_or_else(|| bad("truncated setup header".into()))
    };
    let pm = (setup_sects + 1) * 512;
    let (off, len) = (rd32(0x248)?, rd32(0x24c)?);
    let payload = image
        .get(pm + off..pm + off + len)
        .ok_or_else(|| bad(format!("payload {off:#x}+{len:#x} lies outside the file")))?;
    if payload.starts_with(b"\x7fELF") {
        return Ok(payload.to_vec());
    }
    if !payload.starts_with(&LZ4_LEGACY) {
        let kind = match payload {
            [0x1f, 0x8b, ..] => "gzip",
            [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
            [0xfd, b'7', b'z', b'X', b'Z', ..] => "xz",
            [b'B', b'Z', b'h', ..] => "bzip2",
            [0x5d, 0, 0, ..] => "lzma",
            [0x89, b'L', b'Z', b'O', ..] => "lzo",
            _ => "unknown",
        };
        return Err(bad(format!(
            "its payload is {kind}-compressed; only LZ4 and uncompressed payloads are \
             extracted (pass the ELF vmlinux instead)"
        )));
    }
    // The payload ends with the decompressed size (4 bytes).
    let body = &payload[4..payload.len().saturating_sub(4)];
    let mut out = Vec::new();
    let mut p = 0;
    let mut chunk = vec![0u8; LZ4_CHUNK];
    while p + 4 <= body.len() {
        let n = u32::from_le_bytes(body[p..p + 4].try_into().unwrap()) as usize;
        p += 4;
        if n == u32::from_le_bytes(LZ4_LEGACY) as usize {
            continue; // concatenated frames
        }
        let src = body
            .get(p..p + n)
            .ok_or_else(|| bad(format!("LZ4 chunk of {n} bytes runs past the payload")))?;
        let got = lz4_flex::block::decompress_into(src, &mut chunk)
            .map_err(|e| bad(format!("LZ4: {e}")))?;
        out.extend_from_slice(&chunk[..got]);
        p += n;
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(bad("the decompressed payload is not an ELF file".into()));
    }
    Ok(out)
}

/// Load an ELF vmlinux (or a bzImage's) for PVH entry, with the initrd (`p.modules[0]`).
pub fn load(mem: &GuestMem, map: &MemoryMap, p: &BootParams) -> Result<CpuState, LoadError> {
    let elf: Cow<[u8]> = if crate::linux::is_bzimage(p.image) {
        Cow::Owned(extract_vmlinux(p.image)?)
    } else {
        Cow::Borrowed(p.image)
    };
    let loaded = Elf::load(mem, None, &mut Cursor::new(&elf[..]), None)
        .map_err(|e| LoadError::Invalid(format!("cannot load the vmlinux ELF: {e}")))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => {
            return Err(LoadError::Invalid(
                "the kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY; Linux needs \
                 CONFIG_PVH)"
                    .into(),
            ));
        }
    };
    check_ram(
        map,
        "the kernel",
        loaded.kernel_load.0,
        loaded.kernel_end - loaded.kernel_load.0,
    )?;

    let cmdline = p.cmdline.as_bytes();
    if cmdline.len() >= CMDLINE_MAX {
        return Err(LoadError::Invalid(format!(
            "the command line is {} bytes; at most {} fit",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut c = cmdline.to_vec();
    c.push(0);
    write(mem, CMDLINE, &c)?;

    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: MEMMAP,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some(initrd) = p.modules.first() {
        let size = initrd.data.len() as u64;
        let start = crate::linux::place_initrd(mem, map, initrd.data, u64::MAX, loaded.kernel_end)?;
        modules.push(hvm_modlist_entry {
            paddr: start,
            size,
            ..Default::default()
        });
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST;
    }
    let memmap: Vec<hvm_memmap_table_entry> = map
        .regions()
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.start,
            size: r.size,
            type_: if r.kind == RegionKind::Ram { 1 } else { 2 },
            reserved: 0,
        })
        .collect();
    if memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>() > (MODLIST - MEMMAP) as usize {
        return Err(LoadError::Invalid(
            "the memory map has too many regions".into(),
        ));
    }
    info.memmap_entries = memmap.len() as u32;
    let mut params = StartInfo::new::<hvm_start_info>(&info, GuestAddress(START_INFO));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP));
    if !modules.is_empty() {
        params.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(MODLIST));
    }
    PvhBootConfigurator::write_bootparams::<GuestMem>(&params, mem)
        .map_err(|e| LoadError::Invalid(format!("cannot write the PVH start info: {e}")))?;

    let gdt = write_gdt(mem)?;
    let mut s = crate::flat_state(gdt, false);
    s.sregs.cr0 = cr0::PE | cr0::ET;
    s.regs = palacios_x86::Regs {
        rbx: START_INFO,
        rip: entry,
        rflags: palacios_x86::rflags::FIXED,
        ..Default::default()
    };
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file whose payload is `payload`.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 4u8;
        let pm = (usize::from(setup_sects) + 1) * 512;
        let mut img = vec![0u8; pm];
        img[0x1f1] = setup_sects;
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.resize(pm + 0x100, 0);
        img.extend_from_slice(payload);
        img
    }

    /// The kernel's LZ4 legacy framing of `data` in chunks of `chunk` bytes.
    fn lz4_legacy(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut v = LZ4_LEGACY.to_vec();
        for c in data.chunks(chunk) {
            let z = lz4_flex::block::compress(c);
            v.extend_from_slice(&(z.len() as u32).to_le_bytes());
            v.extend_from_slice(&z);
        }
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v
    }

    #[test]
    fn extracts_lz4_and_plain_payloads_and_names_other_compressions() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..300_000u32).map(|i| (i % 251) as u8));
        assert_eq!(
            extract_vmlinux(&fake_bzimage(&lz4_legacy(&elf, 100_000))).unwrap(),
            elf
        );
        assert_eq!(extract_vmlinux(&fake_bzimage(&elf)).unwrap(), elf);
        let e = extract_vmlinux(&fake_bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0])).unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
        // A truncated chunk is an error, not a panic.
        let mut z = lz4_legacy(&elf, 100_000);
        z.truncate(z.len() / 2);
        assert!(extract_vmlinux(&fake_bzimage(&z)).is_err());
        // A payload that points outside the file.
        let mut img = fake_bzimage(&elf);
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            extract_vmlinux(&img)
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
    }

    #[test]
    fn an_elf_without_a_pvh_note_is_refused() {
        let (mem, map) = crate::testutil::vm(64);
        let elf = crate::elf::build_test_elf(true, 0x20_0000, &[(0x20_0000, &[0xf4], 1)]);
        let p = BootParams {
            format: palacios_vmm::config::BootFormat::Pvh,
            image: &elf,
            load_addr: None,
            entry: None,
            cmdline: "",
            modules: Vec::new(),
        };
        let e = load(&mem, &map, &p).unwrap_err();
        assert!(e.to_string().contains("PVH entry"), "{e}");
    }
}
