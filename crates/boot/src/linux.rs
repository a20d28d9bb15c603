//! Linux bzImage through the 64-bit boot protocol (Documentation/arch/x86/boot.rst), with the
//! rust-vmm linux-loader crate reading the setup header and loading the protected-mode kernel.
//!
//! Layout: the zero page (`struct boot_params`) at [`ZERO_PAGE`], the command line at
//! [`CMDLINE`], the kernel at 1 MiB, the initrd at the top of RAM below 4 GiB (and below the
//! kernel's `initrd_addr_max`). The core enters `startup_64` (load address + 0x200) in 64-bit
//! mode with the loader's flat GDT and identity page tables for the first 4 GiB, RSI = zero
//! page, interrupts off.

use std::io::Cursor;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams as ZeroPage};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use palacios_vmm::memory::RegionKind;
use palacios_vmm::{GuestMem, MemoryMap};
use palacios_x86::{CpuState, cr0, cr4, efer, paging};
use vm_memory::GuestAddress;

use crate::{BootParams, LoadError, PAGE_TABLES_ADDR, check_ram, write, write_gdt};

/// Where `struct boot_params` goes.
pub const ZERO_PAGE: u64 = 0x8000;
/// Where the kernel command line goes (up to the end of the loader's area).
pub const CMDLINE: u64 = 0x9000;
const CMDLINE_MAX: usize = 0x9_f000 - 0x9000;
/// The protected-mode kernel's load address.
pub const KERNEL_ADDR: u64 = 0x10_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// loadflags: the kernel is loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 1;

/// Whether `image` is a bzImage ("HdrS" at 0x202, boot protocol 2.00 or later).
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() > 0x206
        && &image[0x202..0x206] == b"HdrS"
        && image.get(0x1fe..0x200) == Some(&[0x55, 0xaa])
}

/// Write the initrd page aligned as high as possible in RAM below 4 GiB and below `limit`,
/// above `kernel_end`; returns its address.
pub(crate) fn place_initrd(
    mem: &GuestMem,
    map: &MemoryMap,
    data: &[u8],
    limit: u64,
    kernel_end: u64,
) -> Result<u64, LoadError> {
    let size = data.len() as u64;
    let low_end = map
        .regions()
        .iter()
        .filter(|r| r.kind == RegionKind::Ram && r.end() <= 1 << 32)
        .map(|r| r.end())
        .max()
        .unwrap_or(0);
    let start = low_end.min(limit).saturating_sub(size) & !0xfff;
    if size == 0 || start < kernel_end {
        return Err(LoadError::OutsideRam {
            what: "the initrd".into(),
            start,
            end: start + size,
            ram_mib: map.ram_bytes() >> 20,
        });
    }
    write(mem, start, data)?;
    Ok(start)
}

/// Load a bzImage and its initrd (`p.modules[0]`, if any).
pub fn load(mem: &GuestMem, map: &MemoryMap, p: &BootParams) -> Result<CpuState, LoadError> {
    if !is_bzimage(p.image) {
        return Err(LoadError::Invalid(
            "not a Linux bzImage (no 'HdrS' setup header)".into(),
        ));
    }
    let version = u16::from_le_bytes([p.image[0x206], p.image[0x207]]);
    if version < 0x020c {
        return Err(LoadError::Invalid(format!(
            "Linux boot protocol {}.{:02} is too old: the 64-bit entry needs 2.12",
            version >> 8,
            version & 0xff
        )));
    }
    // Room for the kernel before it is copied: its payload, or the init_size it unpacks into.
    let setup_sects = match p.image[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let payload = (p.image.len() as u64).saturating_sub((setup_sects + 1) * 512);
    let init_size = p
        .image
        .get(0x260..0x264)
        .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .unwrap_or(0);
    let need = KERNEL_ADDR + payload.max(init_size);
    if !map.is_backed(KERNEL_ADDR, need - KERNEL_ADDR) {
        return Err(LoadError::Invalid(format!(
            "too little memory for this kernel: it is loaded at 1 MiB and needs {} MiB up to \
             {need:#x} (its init_size), but the VM has {} MiB of RAM",
            need.div_ceil(1 << 20),
            map.ram_bytes() >> 20
        )));
    }
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(KERNEL_ADDR)),
        &mut Cursor::new(p.image),
        Some(GuestAddress(KERNEL_ADDR)),
    )
    .map_err(|e| LoadError::Invalid(format!("cannot load the bzImage: {e}")))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| LoadError::Invalid("the bzImage has no setup header".into()))?;
    // XLF_KERNEL_64: the kernel has the 64-bit entry point at +0x200.
    if hdr.xloadflags & 1 == 0 {
        return Err(LoadError::Invalid(
            "the kernel has no 64-bit entry point (xloadflags)".into(),
        ));
    }
    let kernel_end = loaded.kernel_load.0
        + u64::from(hdr.init_size).max(loaded.kernel_end - loaded.kernel_load.0);
    check_ram(
        map,
        "the kernel (init_size)",
        loaded.kernel_load.0,
        kernel_end - loaded.kernel_load.0,
    )?;

    // Command line.
    let cmdline = p.cmdline.as_bytes();
    let max = (hdr.cmdline_size as usize).clamp(1, CMDLINE_MAX) - 1;
    if cmdline.len() > max {
        return Err(LoadError::Invalid(format!(
            "the command line is {} bytes; this kernel takes at most {max}",
            cmdline.len()
        )));
    }
    let mut c = cmdline.to_vec();
    c.push(0);
    write(mem, CMDLINE, &c)?;

    // Initrd: page aligned, as high as allowed below the 4 GiB hole.
    if let Some(initrd) = p.modules.first() {
        let limit = u64::from(hdr.initrd_addr_max) + 1;
        let start = place_initrd(mem, map, initrd.data, limit, kernel_end)?;
        hdr.ramdisk_image = start as u32;
        hdr.ramdisk_size = initrd.data.len() as u32;
    }

    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.loadflags |= LOADED_HIGH;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let mut n = 0;
    for r in map.regions() {
        let typ = match r.kind {
            RegionKind::Ram => E820_RAM,
            RegionKind::Reserved | RegionKind::Mmio => E820_RESERVED,
        };
        if n < params.e820_table.len() {
            params.e820_table[n] = boot_e820_entry {
                addr: r.start,
                size: r.size,
                r#type: typ,
            };
            n += 1;
        }
    }
    params.e820_entries = n as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMem>(
        &ZeroPage::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| LoadError::Invalid(format!("cannot write the zero page: {e}")))?;

    let gdt = write_gdt(mem)?;
    write(
        mem,
        PAGE_TABLES_ADDR,
        &paging::identity_tables(PAGE_TABLES_ADDR, 4),
    )?;
    let mut s = crate::flat_state(gdt, true);
    s.sregs.cr0 = cr0::PE | cr0::ET | cr0::PG | cr0::WP;
    s.sregs.cr3 = PAGE_TABLES_ADDR;
    s.sregs.cr4 = cr4::PAE;
    s.sregs.efer = efer::LME | efer::LMA;
    s.regs = palacios_x86::Regs {
        rsi: ZERO_PAGE,
        rip: loaded.kernel_load.0 + 0x200,
        rflags: palacios_x86::rflags::FIXED,
        ..Default::default()
    };
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Module;
    use crate::testutil::*;
    use vm_memory::Bytes;

    /// A minimal image with a real-mode setup header that linux-loader accepts.
    fn fake_bzimage(protocol: u16, xloadflags: u16) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512 + 4096];
        img[0x1f1] = setup_sects;
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&protocol.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
        let k = (setup_sects as usize + 1) * 512;
        img[k..k + 4].copy_from_slice(&[0xf4, 0xf4, 0xf4, 0xf4]);
        img
    }

    #[test]
    fn zero_page_e820_cmdline_and_initrd() {
        let (mem, map) = vm(64);
        let img = fake_bzimage(0x020f, 1);
        assert!(is_bzimage(&img));
        let initrd = vec![0x5au8; 10_000];
        let mut p = params(&img);
        p.format = palacios_vmm::config::BootFormat::Linux;
        p.cmdline = "console=ttyS0";
        p.modules = vec![Module {
            data: &initrd,
            cmdline: "initrd",
        }];
        let s = load(&mem, &map, &p).unwrap();
        assert_eq!(s.regs.rip, KERNEL_ADDR + 0x200);
        assert_eq!(s.regs.rsi, ZERO_PAGE);
        assert!(s.sregs.cs.l);
        let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!(zp.hdr.type_of_loader, 0xff);
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!(read(&mem, CMDLINE, 14), b"console=ttyS0\0");
        let (start, size) = ({ zp.hdr.ramdisk_image } as u64, { zp.hdr.ramdisk_size }
            as u64);
        assert_eq!(size, 10_000);
        assert_eq!(start & 0xfff, 0);
        assert!(start + size <= 64 << 20 && start >= KERNEL_ADDR + 0x40_0000);
        assert_eq!(read(&mem, start, 4), vec![0x5a; 4]);
        let n = zp.e820_entries as usize;
        let e820: Vec<(u64, u64, u32)> = zp.e820_table[..n]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(e820.len(), map.regions().len());
        assert_eq!(e820[0], (0, 0x9_fc00, E820_RAM));
        assert!(e820.contains(&(0x10_0000, (64 << 20) - 0x10_0000, E820_RAM)));
        assert_eq!(read(&mem, KERNEL_ADDR, 4), vec![0xf4; 4]);
    }

    #[test]
    fn bad_images_are_clear_errors() {
        let (mem, map) = vm(64);
        let mut p = params(b"not a kernel at all");
        p.format = palacios_vmm::config::BootFormat::Linux;
        assert!(
            matches!(load(&mem, &map, &p), Err(LoadError::Invalid(m)) if m.contains("bzImage"))
        );
        let old = fake_bzimage(0x0206, 1);
        let mut p = params(&old);
        p.format = palacios_vmm::config::BootFormat::Linux;
        assert!(
            matches!(load(&mem, &map, &p), Err(LoadError::Invalid(m)) if m.contains("too old"))
        );
        let no64 = fake_bzimage(0x020f, 0);
        let mut p = params(&no64);
        p.format = palacios_vmm::config::BootFormat::Linux;
        assert!(matches!(load(&mem, &map, &p), Err(LoadError::Invalid(m)) if m.contains("64-bit")));
        let img = fake_bzimage(0x020f, 1);
        let long = "x".repeat(5000);
        let mut p = params(&img);
        p.format = palacios_vmm::config::BootFormat::Linux;
        p.cmdline = &long;
        assert!(
            matches!(load(&mem, &map, &p), Err(LoadError::Invalid(m)) if m.contains("command line"))
        );
    }
}
