//! Intel MultiProcessor Specification 1.4 tables.
//!
//! [`build`] produces a 16-byte MP floating pointer structure immediately
//! followed by the MP configuration table (base table only, no extended
//! entries, no OEM table). Feature byte 1 is 0 (a configuration table is
//! present) and feature byte 2 is 0 (no IMCR: the platform is in virtual-wire
//! mode, so the guest does not touch ports 0x22/0x23).
//!
//! Entries, in the order the specification requires:
//! 1. one processor entry per CPU: local APIC id = index, APIC version 0x14,
//!    enabled, BSP flag on CPU 0, signature family 6 model 15 stepping 1,
//!    feature flags FPU | TSC | MSR | CX8 | APIC;
//! 2. bus 0, type `"ISA   "`;
//! 3. the I/O APIC (version 0x11, enabled);
//! 4. fifteen I/O interrupt assignments (type INT, polarity/trigger
//!    "conforms to bus") for ISA IRQs 0-15: IRQ 0 → pin 2, IRQ n → pin n, IRQ 2
//!    skipped (it is the cascade and has no device);
//! 5. local interrupts: ExtINT on LINT0 and NMI on LINT1, destination 0xFF
//!    (all local APICs).
//!
//! `cpus` is clamped to 1..=255 (APIC ids 0-254; 0xFF means broadcast). The
//! I/O APIC id is used as given; choosing one that does not collide with a
//! CPU's APIC id is the caller's job.

/// Floating pointer signature.
pub const FP_SIGNATURE: &[u8; 4] = b"_MP_";
/// Configuration table signature.
pub const CT_SIGNATURE: &[u8; 4] = b"PCMP";
/// OEM id in the configuration table (8 bytes).
pub const OEM_ID: &[u8; 8] = b"PALACIOS";
/// Product id in the configuration table (12 bytes).
pub const PRODUCT_ID: &[u8; 12] = b"PALACIOS-RS ";
/// Local APIC version reported for every CPU.
pub const LAPIC_VERSION: u8 = 0x14;
/// I/O APIC version reported.
pub const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature (family 6, model 15, stepping 1).
pub const CPU_SIGNATURE: u32 = (6 << 8) | (15 << 4) | 1;
/// CPUID.1:EDX feature flags reported: FPU, TSC, MSR, CX8, APIC.
pub const CPU_FEATURES: u32 = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9);

const FP_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROC_LEN: usize = 20;
const OTHER_LEN: usize = 8;

/// Entry type codes.
const T_PROC: u8 = 0;
const T_BUS: u8 = 1;
const T_IOAPIC: u8 = 2;
const T_IOINT: u8 = 3;
const T_LINT: u8 = 4;

/// Interrupt type: vectored interrupt.
pub const INT_INT: u8 = 0;
/// Interrupt type: NMI.
pub const INT_NMI: u8 = 1;
/// Interrupt type: ExtINT (8259-compatible).
pub const INT_EXTINT: u8 = 3;

/// Platform description for [`build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpConfig {
    /// Number of CPUs (clamped to 1..=255).
    pub cpus: u32,
    /// I/O APIC id.
    pub ioapic_id: u8,
    /// I/O APIC MMIO base (normally 0xFEC00000).
    pub ioapic_addr: u32,
    /// Local APIC MMIO base (normally 0xFEE00000).
    pub lapic_addr: u32,
}

/// A processor entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processor {
    /// Local APIC id.
    pub apic_id: u8,
    /// Local APIC version.
    pub apic_version: u8,
    /// CPU usable.
    pub enabled: bool,
    /// Bootstrap processor.
    pub bsp: bool,
    /// CPUID signature.
    pub signature: u32,
    /// CPUID feature flags.
    pub features: u32,
}

/// An I/O APIC entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApic {
    /// I/O APIC id.
    pub id: u8,
    /// Version.
    pub version: u8,
    /// Usable.
    pub enabled: bool,
    /// MMIO base.
    pub addr: u32,
}

/// An I/O or local interrupt assignment entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntAssign {
    /// Interrupt type ([`INT_INT`], [`INT_NMI`], [`INT_EXTINT`], ...).
    pub kind: u8,
    /// Polarity (bits 0-1) and trigger mode (bits 2-3).
    pub flags: u16,
    /// Source bus id.
    pub src_bus: u8,
    /// Source bus IRQ.
    pub src_irq: u8,
    /// Destination I/O APIC id, or local APIC id (0xFF = all).
    pub dst_id: u8,
    /// Destination I/O APIC pin, or LINTIN number.
    pub dst_pin: u8,
}

/// Decoded tables, see [`parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Physical address of the configuration table (from the pointer).
    pub config_addr: u32,
    /// Specification revision in the floating pointer (4 = 1.4).
    pub spec_rev: u8,
    /// Feature byte 2 bit 7.
    pub imcr_present: bool,
    /// OEM id, trailing spaces kept.
    pub oem_id: String,
    /// Product id, trailing spaces kept.
    pub product_id: String,
    /// Local APIC address.
    pub lapic_addr: u32,
    /// Processor entries.
    pub processors: Vec<Processor>,
    /// Bus entries: (bus id, type string).
    pub buses: Vec<(u8, String)>,
    /// I/O APIC entries.
    pub ioapics: Vec<IoApic>,
    /// I/O interrupt assignments.
    pub io_ints: Vec<IntAssign>,
    /// Local interrupt assignments.
    pub local_ints: Vec<IntAssign>,
}

fn checksum_fix(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

fn int_entry(out: &mut Vec<u8>, ty: u8, a: IntAssign) {
    out.push(ty);
    out.push(a.kind);
    out.extend_from_slice(&a.flags.to_le_bytes());
    out.extend_from_slice(&[a.src_bus, a.src_irq, a.dst_id, a.dst_pin]);
}

/// Builds the floating pointer (at offset 0) and the configuration table (at
/// offset 16, i.e. physical address `base + 16`) for placement at `base`.
pub fn build(cfg: &MpConfig, base: u32) -> Vec<u8> {
    let cpus = cfg.cpus.clamp(1, 255) as u8;
    let mut t = Vec::new();
    t.extend_from_slice(CT_SIGNATURE);
    t.extend_from_slice(&[0, 0]); // base table length, patched below
    t.push(4); // spec revision 1.4
    t.push(0); // checksum, patched below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(PRODUCT_ID);
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&[0, 0]); // entry count, patched below
    t.extend_from_slice(&cfg.lapic_addr.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved
    let mut count: u16 = 0;

    for id in 0..cpus {
        t.extend_from_slice(&[
            T_PROC,
            id,
            LAPIC_VERSION,
            0x01 | if id == 0 { 0x02 } else { 0 },
        ]);
        t.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        count += 1;
    }
    t.extend_from_slice(&[T_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    count += 1;
    t.extend_from_slice(&[T_IOAPIC, cfg.ioapic_id, IOAPIC_VERSION, 0x01]);
    t.extend_from_slice(&cfg.ioapic_addr.to_le_bytes());
    count += 1;
    for irq in (0u8..16).filter(|&i| i != 2) {
        let pin = if irq == 0 { 2 } else { irq };
        let a = IntAssign {
            kind: INT_INT,
            flags: 0,
            src_bus: 0,
            src_irq: irq,
            dst_id: cfg.ioapic_id,
            dst_pin: pin,
        };
        int_entry(&mut t, T_IOINT, a);
        count += 1;
    }
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        let a = IntAssign {
            kind,
            flags: 0,
            src_bus: 0,
            src_irq: 0,
            dst_id: 0xFF,
            dst_pin: lint,
        };
        int_entry(&mut t, T_LINT, a);
        count += 1;
    }
    let len = t.len() as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[7] = checksum_fix(&t);

    let mut fp = Vec::with_capacity(FP_LEN + t.len());
    fp.extend_from_slice(FP_SIGNATURE);
    fp.extend_from_slice(&base.wrapping_add(FP_LEN as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 paragraph, rev 1.4
    fp[10] = checksum_fix(&fp);
    fp.extend_from_slice(&t);
    fp
}

fn le16(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("truncated at {at:#x}"))
}

fn le32(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| format!("truncated at {at:#x}"))
}

/// Parses bytes produced by [`build`]: the floating pointer at offset 0 and
/// the configuration table it points to, assumed to be placed right after it
/// (so the base address is taken as `pointer - 16`). Use [`parse_at`] to check
/// the pointer against a known base.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let ptr = le32(bytes, 4)?;
    parse_at(bytes, ptr.wrapping_sub(FP_LEN as u32))
}

/// Parses tables whose first byte sits at physical address `base`, verifying
/// signatures, lengths, checksums and entry layout.
pub fn parse_at(bytes: &[u8], base: u32) -> Result<Parsed, String> {
    let fp = bytes.get(..FP_LEN).ok_or("floating pointer truncated")?;
    if &fp[..4] != FP_SIGNATURE {
        return Err("bad floating pointer signature".into());
    }
    if fp[8] != 1 {
        return Err(format!("floating pointer length {} paragraphs", fp[8]));
    }
    if sum(fp) != 0 {
        return Err("floating pointer checksum".into());
    }
    if fp[11] != 0 {
        return Err(format!(
            "default configuration {} instead of a table",
            fp[11]
        ));
    }
    let config_addr = le32(fp, 4)?;
    let off = config_addr
        .checked_sub(base)
        .ok_or("config table below base")? as usize;
    let t = bytes.get(off..).ok_or("config table outside bytes")?;
    if t.get(..4) != Some(&CT_SIGNATURE[..]) {
        return Err("bad config table signature".into());
    }
    let len = usize::from(le16(t, 4)?);
    let t = t.get(..len).ok_or("config table length exceeds bytes")?;
    if len < HEADER_LEN {
        return Err("config table shorter than its header".into());
    }
    if sum(t) != 0 {
        return Err("config table checksum".into());
    }
    if le16(t, 40)? != 0 {
        return Err("unexpected extended table".into());
    }
    let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&t[r]).into_owned();
    let mut p = Parsed {
        config_addr,
        spec_rev: fp[9],
        imcr_present: fp[12] & 0x80 != 0,
        oem_id: text(8..16),
        product_id: text(16..28),
        lapic_addr: le32(t, 36)?,
        processors: Vec::new(),
        buses: Vec::new(),
        ioapics: Vec::new(),
        io_ints: Vec::new(),
        local_ints: Vec::new(),
    };
    let count = le16(t, 34)?;
    let mut at = HEADER_LEN;
    let mut last_type = 0;
    for i in 0..count {
        let ty = *t
            .get(at)
            .ok_or_else(|| format!("entry {i} beyond table length"))?;
        if ty < last_type {
            return Err(format!("entry {i} of type {ty} out of order"));
        }
        last_type = ty;
        let size = if ty == T_PROC { PROC_LEN } else { OTHER_LEN };
        let e = t
            .get(at..at + size)
            .ok_or_else(|| format!("entry {i} truncated"))?;
        match ty {
            T_PROC => p.processors.push(Processor {
                apic_id: e[1],
                apic_version: e[2],
                enabled: e[3] & 1 != 0,
                bsp: e[3] & 2 != 0,
                signature: le32(e, 4)?,
                features: le32(e, 8)?,
            }),
            T_BUS => p.buses.push((e[1], text(at + 2..at + 8))),
            T_IOAPIC => p.ioapics.push(IoApic {
                id: e[1],
                version: e[2],
                enabled: e[3] & 1 != 0,
                addr: le32(e, 4)?,
            }),
            T_IOINT | T_LINT => {
                let a = IntAssign {
                    kind: e[1],
                    flags: le16(e, 2)?,
                    src_bus: e[4],
                    src_irq: e[5],
                    dst_id: e[6],
                    dst_pin: e[7],
                };
                if ty == T_IOINT {
                    p.io_ints.push(a)
                } else {
                    p.local_ints.push(a)
                }
            }
            _ => return Err(format!("entry {i} has unknown type {ty}")),
        }
        at += size;
    }
    if at != len {
        return Err(format!("entries end at {at:#x}, table length {len:#x}"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cpus: u32) -> MpConfig {
        MpConfig {
            cpus,
            ioapic_id: cpus as u8,
            ioapic_addr: 0xFEC0_0000,
            lapic_addr: 0xFEE0_0000,
        }
    }

    #[test]
    fn floating_pointer_layout_and_checksum() {
        let b = build(&cfg(1), 0x9FC00);
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 0x9FC10);
        assert_eq!((b[8], b[9], b[11], b[12]), (1, 4, 0, 0));
        assert_eq!(sum(&b[..16]), 0);
        assert_eq!(&b[16..20], b"PCMP");
    }

    #[test]
    fn config_table_checksum_and_length() {
        for n in [1, 2, 4, 255] {
            let b = build(&cfg(n), 0xF0000);
            let len = usize::from(u16::from_le_bytes([b[20], b[21]]));
            assert_eq!(len, b.len() - 16);
            assert_eq!(len, 44 + 20 * n as usize + 8 + 8 + 15 * 8 + 2 * 8);
            assert_eq!(sum(&b[16..]), 0);
            assert_eq!(b[16 + 6], 4);
            let count = u16::from_le_bytes([b[16 + 34], b[16 + 35]]);
            assert_eq!(u32::from(count), n + 1 + 1 + 15 + 2);
        }
    }

    #[test]
    fn one_cpu() {
        let p = parse_at(&build(&cfg(1), 0xF0000), 0xF0000).unwrap();
        assert_eq!(p.config_addr, 0xF0010);
        assert_eq!(p.spec_rev, 4);
        assert!(!p.imcr_present);
        assert_eq!(p.oem_id, "PALACIOS");
        assert_eq!(p.product_id, "PALACIOS-RS ");
        assert_eq!(p.lapic_addr, 0xFEE0_0000);
        assert_eq!(p.processors.len(), 1);
        let c = p.processors[0];
        assert_eq!(
            (c.apic_id, c.apic_version, c.enabled, c.bsp),
            (0, 0x14, true, true)
        );
        assert_eq!(c.signature, 0x6F1);
        assert_ne!(c.features & (1 << 9), 0); // APIC
        assert_ne!(c.features & 1, 0); // FPU
    }

    #[test]
    fn four_cpus_only_first_is_bsp() {
        let p = parse(&build(&cfg(4), 0x9FC00)).unwrap();
        assert_eq!(p.config_addr, 0x9FC10);
        let ids: Vec<u8> = p.processors.iter().map(|c| c.apic_id).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        assert!(p.processors.iter().all(|c| c.enabled));
        let bsps: Vec<bool> = p.processors.iter().map(|c| c.bsp).collect();
        assert_eq!(bsps, [true, false, false, false]);
    }

    #[test]
    fn bus_and_ioapic_entries() {
        let p = parse(&build(&cfg(4), 0xF0000)).unwrap();
        assert_eq!(p.buses, vec![(0, "ISA   ".to_string())]);
        assert_eq!(
            p.ioapics,
            vec![IoApic {
                id: 4,
                version: 0x11,
                enabled: true,
                addr: 0xFEC0_0000
            }]
        );
    }

    #[test]
    fn isa_interrupt_routing() {
        let p = parse(&build(&cfg(2), 0xF0000)).unwrap();
        assert_eq!(p.io_ints.len(), 15);
        let pairs: Vec<(u8, u8)> = p.io_ints.iter().map(|a| (a.src_irq, a.dst_pin)).collect();
        let mut want = vec![(0, 2), (1, 1)];
        want.extend((3..16).map(|i| (i, i)));
        assert_eq!(pairs, want);
        for a in &p.io_ints {
            assert_eq!((a.kind, a.flags, a.src_bus, a.dst_id), (INT_INT, 0, 0, 2));
        }
    }

    #[test]
    fn local_interrupts() {
        let p = parse(&build(&cfg(1), 0xF0000)).unwrap();
        assert_eq!(
            p.local_ints,
            vec![
                IntAssign {
                    kind: INT_EXTINT,
                    flags: 0,
                    src_bus: 0,
                    src_irq: 0,
                    dst_id: 0xFF,
                    dst_pin: 0
                },
                IntAssign {
                    kind: INT_NMI,
                    flags: 0,
                    src_bus: 0,
                    src_irq: 0,
                    dst_id: 0xFF,
                    dst_pin: 1
                },
            ]
        );
    }

    #[test]
    fn cpu_count_clamped() {
        let p = parse(&build(&cfg(0), 0xF0000)).unwrap();
        assert_eq!(p.processors.len(), 1);
        let p = parse(&build(&cfg(1000), 0xF0000)).unwrap();
        assert_eq!(p.processors.len(), 255);
        assert_eq!(p.processors[254].apic_id, 254);
    }

    #[test]
    fn parser_rejects_corruption() {
        let good = build(&cfg(2), 0xF0000);
        assert!(parse_at(&good, 0xF0000).is_ok());
        assert!(parse_at(&good, 0xF0010 + 1).is_err()); // wrong base
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            // Any single-bit flip breaks a checksum (or a signature).
            assert!(parse_at(&bad, 0xF0000).is_err(), "flip at {i} accepted");
        }
        for n in 0..good.len() {
            assert!(parse_at(&good[..n], 0xF0000).is_err());
        }
        assert!(parse(&[]).is_err());
    }
}
