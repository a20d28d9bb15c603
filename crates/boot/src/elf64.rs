//! 64-bit ELF kernels entered directly in long mode: the loader sets up the GDT and identity
//! page tables for the first 4 GiB (2 MiB pages). RAX = 0x2BADB002 and RBX = RDI = the address
//! of a Multiboot information structure (memory, command line, modules, memory map).

use palacios_vmm::{GuestMem, MemoryMap};
use palacios_x86::{CpuState, cr0, cr4, efer, paging};

use crate::multiboot::{BOOTLOADER_MAGIC, write_info};
use crate::{BootParams, LoadError, PAGE_TABLES_ADDR, elf, write, write_gdt};

/// Identity-mapped GiB.
pub const MAPPED_GIB: u64 = 4;

pub fn load(mem: &GuestMem, map: &MemoryMap, p: &BootParams) -> Result<CpuState, LoadError> {
    if !elf::is_elf64(p.image) {
        return Err(LoadError::Elf("not a 64-bit ELF file".into()));
    }
    let img = elf::parse64(p.image)?;
    let entry = p.entry.unwrap_or(img.entry);
    if entry >= MAPPED_GIB << 30 {
        return Err(LoadError::Invalid(format!(
            "entry {entry:#x} is outside the identity-mapped first {MAPPED_GIB} GiB"
        )));
    }
    elf::load_segments(mem, map, p.image, &img)?;
    let info = write_info(mem, map, p, img.end())?;
    let gdt = write_gdt(mem)?;
    write(
        mem,
        PAGE_TABLES_ADDR,
        &paging::identity_tables(PAGE_TABLES_ADDR, MAPPED_GIB),
    )?;

    let mut s = crate::flat_state(gdt, true);
    s.sregs.cr0 = cr0::PE | cr0::ET | cr0::PG | cr0::WP;
    s.sregs.cr3 = PAGE_TABLES_ADDR;
    s.sregs.cr4 = cr4::PAE;
    s.sregs.efer = efer::LME | efer::LMA;
    s.regs = palacios_x86::Regs {
        rax: u64::from(BOOTLOADER_MAGIC),
        rbx: info,
        rdi: info,
        rip: entry,
        rflags: palacios_x86::rflags::FIXED,
        ..Default::default()
    };
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn long_mode_entry_with_tables() {
        let (mem, map) = vm(16);
        let img = elf::build_test_elf(true, 0x100000, &[(0x100000, &[0xf4; 8], 8)]);
        let s = load(&mem, &map, &params(&img)).unwrap();
        assert_eq!(s.regs.rip, 0x100000);
        assert!(s.sregs.cs.l && !s.sregs.cs.db);
        assert_eq!(
            s.sregs.efer & (efer::LME | efer::LMA),
            efer::LME | efer::LMA
        );
        let tables = read(
            &mem,
            PAGE_TABLES_ADDR,
            paging::identity_tables_size(MAPPED_GIB) as usize,
        );
        for va in [0x100000u64, 0xfee0_0000, 0xffff_f000] {
            assert_eq!(paging::translate(&tables, PAGE_TABLES_ADDR, va), Some(va));
        }
        let gdt = read(&mem, crate::GDT_ADDR, 32);
        let code = u64::from_le_bytes(gdt[24..32].try_into().unwrap());
        assert_eq!(
            palacios_x86::segment::decode(palacios_x86::segment::SEL_CODE64, code),
            s.sregs.cs
        );
        assert_eq!(
            read(&mem, s.regs.rbx, 4)[0] & 1,
            1,
            "multiboot info has memory fields"
        );
    }

    #[test]
    fn empty_segment_at_the_top_of_the_address_space_does_not_panic() {
        // Found by fuzzing: modules were placed after the "end" of a zero-sized segment.
        let (mem, map) = vm(16);
        let img = elf::build_test_elf(
            true,
            0x100000,
            &[(0x100000, &[0xf4; 8], 8), (0xffff_ffff_ffff_f001, b"", 0)],
        );
        let p = BootParams {
            modules: vec![crate::Module {
                data: b"m",
                cmdline: "m",
            }],
            ..params(&img)
        };
        if let Ok(s) = load(&mem, &map, &p) {
            assert_eq!(s.regs.rip, 0x100000);
        }
    }

    #[test]
    fn refuses_entry_above_mapping_and_32_bit_files() {
        let (mem, map) = vm(16);
        let img = elf::build_test_elf(true, 0x1_0000_0000, &[(0x100000, &[0xf4; 8], 8)]);
        assert!(
            load(&mem, &map, &params(&img))
                .unwrap_err()
                .to_string()
                .contains("identity-mapped")
        );
        let img32 = elf::build_test_elf(false, 0x100000, &[(0x100000, &[0xf4; 8], 8)]);
        assert!(load(&mem, &map, &params(&img32)).is_err());
    }
}
