//! Descriptor encoding for the flat segments that loaders hand to a guest.

use crate::regs::Segment;

/// Code segment type: execute/read, accessed.
pub const TYPE_CODE: u8 = 0xb;
/// Data segment type: read/write, accessed.
pub const TYPE_DATA: u8 = 0x3;
/// 32-bit busy TSS.
pub const TYPE_TSS_BUSY: u8 = 0xb;

/// Standard boot GDT selectors (same layout for 32- and 64-bit entry).
pub const SEL_CODE32: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_CODE64: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;

/// A flat 4 GiB segment as the hidden cache holds it.
pub fn flat(selector: u16, type_: u8, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl: 0,
        db: !long,
        s: true,
        l: long,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Encode the 8-byte GDT entry of a code/data segment.
pub fn encode(seg: &Segment) -> u64 {
    let limit = if seg.g { seg.limit >> 12 } else { seg.limit } as u64;
    let base = seg.base & 0xffff_ffff;
    let access = u64::from(seg.type_ & 0xf)
        | (u64::from(seg.s) << 4)
        | (u64::from(seg.dpl & 3) << 5)
        | (u64::from(seg.present) << 7);
    let flags = (u64::from(seg.avl))
        | (u64::from(seg.l) << 1)
        | (u64::from(seg.db) << 2)
        | (u64::from(seg.g) << 3);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// Decode an 8-byte GDT entry into the cached form (for checks and tests).
pub fn decode(selector: u16, raw: u64) -> Segment {
    let g = raw >> 55 & 1 == 1;
    let mut limit = ((raw & 0xffff) | ((raw >> 32) & 0xf_0000)) as u32;
    if g {
        limit = (limit << 12) | 0xfff;
    }
    Segment {
        base: ((raw >> 16) & 0xff_ffff) | ((raw >> 32) & 0xff00_0000),
        limit,
        selector,
        type_: ((raw >> 40) & 0xf) as u8,
        s: raw >> 44 & 1 == 1,
        dpl: ((raw >> 45) & 3) as u8,
        present: raw >> 47 & 1 == 1,
        avl: raw >> 52 & 1 == 1,
        l: raw >> 53 & 1 == 1,
        db: raw >> 54 & 1 == 1,
        g,
        unusable: false,
    }
}

/// The boot GDT: null, 32-bit code, data, 64-bit code.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        encode(&flat(SEL_CODE32, TYPE_CODE, false)),
        encode(&flat(SEL_DATA, TYPE_DATA, false)),
        encode(&flat(SEL_CODE64, TYPE_CODE, true)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        // The classic flat descriptors every OS tutorial spells out.
        assert_eq!(encode(&flat(8, TYPE_CODE, false)), 0x00cf_9b00_0000_ffff);
        assert_eq!(encode(&flat(16, TYPE_DATA, false)), 0x00cf_9300_0000_ffff);
        assert_eq!(encode(&flat(24, TYPE_CODE, true)), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn decode_inverts_encode() {
        for (sel, seg) in [
            (8, flat(8, TYPE_CODE, false)),
            (24, flat(24, TYPE_CODE, true)),
        ] {
            assert_eq!(decode(sel, encode(&seg)), seg);
        }
        let odd = Segment {
            base: 0x1234_5678,
            limit: 0xabcde,
            selector: 0x28,
            type_: 3,
            present: true,
            s: true,
            dpl: 3,
            ..Default::default()
        };
        assert_eq!(decode(0x28, encode(&odd)), odd);
    }
}
