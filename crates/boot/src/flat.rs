//! Flat binaries: copied to the load address (default 0x7c00) and entered in real mode.

use palacios_vmm::{GuestMem, MemoryMap};
use palacios_x86::CpuState;

use crate::{BootParams, LoadError, check_ram, write};

pub const DEFAULT_LOAD_ADDR: u64 = 0x7c00;
/// Real mode reaches the first MiB.
const REAL_MODE_LIMIT: u64 = 0x10_0000;

pub fn load(mem: &GuestMem, map: &MemoryMap, p: &BootParams) -> Result<CpuState, LoadError> {
    let addr = p.load_addr.unwrap_or(DEFAULT_LOAD_ADDR);
    let len = p.image.len() as u64;
    if len == 0 {
        return Err(LoadError::Invalid("the flat image is empty".into()));
    }
    let end = addr.checked_add(len).filter(|&e| e <= REAL_MODE_LIMIT).ok_or_else(|| {
        LoadError::Invalid(format!("a flat image must fit below 1 MiB for real mode (load address {addr:#x}, {len} bytes)"))
    })?;
    check_ram(map, "flat image", addr, len)?;
    let entry = p.entry.unwrap_or(addr);
    if entry >= REAL_MODE_LIMIT {
        return Err(LoadError::Invalid(format!(
            "entry {entry:#x} is not reachable in real mode"
        )));
    }
    if !(addr..end).contains(&entry) {
        tracing::warn!("flat entry {entry:#x} lies outside the image {addr:#x}-{end:#x}");
    }
    write(mem, addr, p.image)?;
    Ok(CpuState::real_mode_at(entry as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn loads_at_7c00_in_real_mode() {
        let (mem, map) = vm(1);
        let s = load(&mem, &map, &params(&[0xf4, 0x90])).unwrap();
        assert_eq!(read(&mem, 0x7c00, 2), vec![0xf4, 0x90]);
        assert_eq!((s.sregs.cs.selector, s.regs.rip), (0, 0x7c00));
        assert_eq!(s.sregs.cr0 & 1, 0);
    }

    #[test]
    fn high_load_address_uses_a_segment() {
        let (mem, map) = vm(2);
        let p = BootParams {
            load_addr: Some(0x9_0000),
            ..params(&[1, 2, 3])
        };
        let s = load(&mem, &map, &p).unwrap();
        assert_eq!(s.sregs.cs.base + s.regs.rip, 0x9_0000);
        assert!(s.regs.rip <= 0xffff);
    }

    #[test]
    fn refuses_what_real_mode_cannot_reach() {
        let (mem, map) = vm(2);
        let img = vec![0u8; 0x1000];
        let p = BootParams {
            load_addr: Some(0xff800),
            ..params(&img)
        };
        assert!(
            load(&mem, &map, &p)
                .unwrap_err()
                .to_string()
                .contains("below 1 MiB")
        );
        assert!(load(&mem, &map, &params(&[])).is_err());
        let p = BootParams {
            entry: Some(0x20_0000),
            ..params(&[1])
        };
        assert!(load(&mem, &map, &p).is_err());
    }
}
