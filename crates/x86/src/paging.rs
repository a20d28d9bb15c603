//! Identity page tables for direct long-mode entry.

/// Page-table entry bits.
pub const PTE_P: u64 = 1 << 0;
pub const PTE_RW: u64 = 1 << 1;
pub const PTE_PS: u64 = 1 << 7;

/// Bytes of page tables [`identity_tables`] produces for `gib` GiB.
pub fn identity_tables_size(gib: u64) -> u64 {
    (2 + gib) * 4096
}

/// Build tables identity-mapping the first `gib` GiB with 2 MiB pages, to be placed at
/// guest-physical `base` (4 KiB aligned). Layout: PML4, PDPT, then one PD per GiB.
/// Returns the bytes; CR3 = `base`.
pub fn identity_tables(base: u64, gib: u64) -> Vec<u8> {
    assert!(base % 4096 == 0 && (1..=512).contains(&gib));
    let mut out = vec![0u8; identity_tables_size(gib) as usize];
    let mut put = |table: u64, index: u64, val: u64| {
        let off = (table * 4096 + index * 8) as usize;
        out[off..off + 8].copy_from_slice(&val.to_le_bytes());
    };
    put(0, 0, (base + 4096) | PTE_P | PTE_RW);
    for g in 0..gib {
        put(1, g, (base + (2 + g) * 4096) | PTE_P | PTE_RW);
        for m in 0..512 {
            put(2 + g, m, ((g << 30) + (m << 21)) | PTE_P | PTE_RW | PTE_PS);
        }
    }
    out
}

/// Walk 4-level tables held in `tables` (placed at `base`) for `va`; the test oracle.
pub fn translate(tables: &[u8], base: u64, va: u64) -> Option<u64> {
    let rd = |pa: u64| -> Option<u64> {
        let off = pa.checked_sub(base)? as usize;
        Some(u64::from_le_bytes(
            tables.get(off..off + 8)?.try_into().ok()?,
        ))
    };
    let mask = 0x000f_ffff_ffff_f000;
    let e4 = rd(base + ((va >> 39) & 511) * 8)?;
    if e4 & PTE_P == 0 {
        return None;
    }
    let e3 = rd((e4 & mask) + ((va >> 30) & 511) * 8)?;
    if e3 & PTE_P == 0 {
        return None;
    }
    let e2 = rd((e3 & mask) + ((va >> 21) & 511) * 8)?;
    if e2 & PTE_P == 0 || e2 & PTE_PS == 0 {
        return None;
    }
    Some((e2 & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_maps_every_gib() {
        let t = identity_tables(0x2000, 4);
        for va in [
            0u64,
            0x1234,
            0x20_0000,
            0x7fff_ffff,
            0xfee0_0300,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&t, 0x2000, va), Some(va));
        }
        assert_eq!(translate(&t, 0x2000, 0x1_0000_0000), None);
    }
}
