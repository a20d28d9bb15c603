//! Messages on the APIC bus and destination matching.
//!
//! An [`Interrupt`] is what an I/O APIC redirection entry or a local APIC's
//! interrupt command register (ICR) puts on the bus. Whether a given local
//! APIC is a target is decided by [`matches`] from that APIC's addressing
//! state ([`LapicIdent`]).

/// Delivery mode of an interrupt message (ICR / redirection entry bits 8-10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    /// `000`: deliver `vector` to every destination.
    Fixed,
    /// `001`: deliver `vector` to the destination with the lowest priority.
    LowestPriority,
    /// `010`: system management interrupt.
    Smi,
    /// `100`: non-maskable interrupt.
    Nmi,
    /// `101`: INIT (or INIT level de-assert, see [`Interrupt::assert`]).
    Init,
    /// `110`: start-up IPI; `vector` is the start page number.
    StartUp,
    /// `111`: external (8259-compatible) interrupt; the vector comes from an
    /// INTA cycle to the PIC.
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit delivery-mode field. `011` is reserved and yields
    /// `None`; the caller drops such messages.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits & 7 {
            0 => Some(Self::Fixed),
            1 => Some(Self::LowestPriority),
            2 => Some(Self::Smi),
            4 => Some(Self::Nmi),
            5 => Some(Self::Init),
            6 => Some(Self::StartUp),
            7 => Some(Self::ExtInt),
            _ => None,
        }
    }

    /// The 3-bit encoding of this mode.
    pub fn bits(self) -> u32 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::ExtInt => 7,
        }
    }
}

/// ICR destination shorthand (bits 18-19).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Shorthand {
    /// `00`: use the destination field.
    #[default]
    None,
    /// `01`: only the sender.
    SelfOnly,
    /// `10`: every local APIC, the sender included.
    AllIncludingSelf,
    /// `11`: every local APIC except the sender.
    AllExcludingSelf,
}

impl Shorthand {
    /// Decodes the 2-bit shorthand field.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 3 {
            0 => Self::None,
            1 => Self::SelfOnly,
            2 => Self::AllIncludingSelf,
            _ => Self::AllExcludingSelf,
        }
    }

    /// The 2-bit encoding.
    pub fn bits(self) -> u32 {
        match self {
            Self::None => 0,
            Self::SelfOnly => 1,
            Self::AllIncludingSelf => 2,
            Self::AllExcludingSelf => 3,
        }
    }
}

/// An interrupt message travelling on the APIC bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Interrupt {
    /// Vector (for `StartUp`: the start page; ignored for NMI/INIT/SMI/ExtINT).
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Physical APIC ID (8-bit in xAPIC, 32-bit in x2APIC) or logical
    /// destination, depending on [`Interrupt::logical`].
    pub dest: u32,
    /// Destination mode: `true` = logical.
    pub logical: bool,
    /// Trigger mode: `true` = level. Level-triggered fixed/lowest-priority
    /// interrupts set the receiver's TMR bit so that its EOI is broadcast.
    pub level_triggered: bool,
    /// Level. Only meaningful for level-triggered messages: `false` marks a
    /// de-assert message (the INIT level de-assert), which modern local APICs
    /// ignore. Edge-triggered messages always carry `true`.
    pub assert: bool,
    /// Destination shorthand (ICR only; I/O APIC messages use `None`).
    pub shorthand: Shorthand,
    /// Sender's APIC ID, used to resolve `SelfOnly` / `AllExcludingSelf`.
    pub source: u32,
}

impl Interrupt {
    /// The interrupt an MSI write carries (Intel SDM vol. 3, 11.11): address bits 19:12 the
    /// destination ID (bits 11:4 extend it for x2APIC-style 15-bit IDs; ignored here), bit 2 the
    /// destination mode; data bits 7:0 the vector, 10:8 the delivery mode, 15 the trigger mode,
    /// 14 the level. `None` for a reserved delivery mode (the message is dropped, as hardware
    /// leaves it undefined).
    pub fn from_msi(addr: u64, data: u32) -> Option<Self> {
        let mode = DeliveryMode::from_bits(data >> 8)?;
        let level_triggered = data & (1 << 15) != 0;
        Some(Self {
            vector: data as u8,
            mode,
            dest: ((addr >> 12) & 0xff) as u32,
            logical: addr & (1 << 2) != 0,
            level_triggered,
            assert: !level_triggered || data & (1 << 14) != 0,
            shorthand: Shorthand::None,
            source: 0,
        })
    }

    /// A plain edge-triggered fixed interrupt to a physical destination.
    pub fn fixed(vector: u8, dest: u32) -> Self {
        Self {
            vector,
            mode: DeliveryMode::Fixed,
            dest,
            logical: false,
            level_triggered: false,
            assert: true,
            shorthand: Shorthand::None,
            source: 0,
        }
    }
}

/// The addressing state of one local APIC, as needed for destination
/// matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LapicIdent {
    /// APIC ID: 8-bit xAPIC ID or 32-bit x2APIC ID.
    pub id: u32,
    /// Whether the APIC is in x2APIC mode.
    pub x2apic: bool,
    /// Logical destination register as read by the guest (xAPIC: logical ID
    /// in bits 24-31; x2APIC: `cluster << 16 | 1 << (id & 15)`).
    pub ldr: u32,
    /// Destination format register (xAPIC only; model in bits 28-31:
    /// `0xF` flat, `0x0` cluster).
    pub dfr: u32,
}

/// The x2APIC logical ID derived from an x2APIC ID:
/// `(id >> 4) << 16 | 1 << (id & 15)`.
pub fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 15))
}

/// Whether `apic` is a destination of `intr` (shorthands included).
///
/// This does not look at whether the APIC is enabled, nor perform
/// lowest-priority arbitration; see [`crate::pc::chips::apic::bus::deliver`] for that.
pub fn matches(apic: &LapicIdent, intr: &Interrupt) -> bool {
    match intr.shorthand {
        Shorthand::SelfOnly => apic.id == intr.source,
        Shorthand::AllIncludingSelf => true,
        Shorthand::AllExcludingSelf => apic.id != intr.source,
        Shorthand::None => dest_matches(apic, intr.dest, intr.logical),
    }
}

/// Whether the destination field `dest` in destination mode `logical`
/// selects `apic`.
///
/// * xAPIC physical: `dest & 0xff` equals the ID, or is the broadcast `0xff`.
/// * xAPIC logical flat (DFR model `0xF`): `dest & LDR[31:24] != 0`.
/// * xAPIC logical cluster (DFR model `0x0`): the high nibbles (cluster)
///   are equal, or the destination cluster is the broadcast `0xF`, and the
///   low nibbles (member bitmaps) intersect. Other DFR models are reserved
///   and match nothing.
/// * x2APIC physical: `dest` equals the ID, or is the broadcast
///   `0xffff_ffff`.
/// * x2APIC logical: `0xffff_ffff` is a broadcast; otherwise
///   `dest[31:16]` equals the cluster and `dest[15:0]` intersects the
///   member bitmap of the LDR.
///
/// 8-bit destinations from an I/O APIC (e.g. the xAPIC broadcast `0xff`)
/// are not widened for x2APIC receivers; a router that wants the legacy
/// broadcast to reach x2APIC-mode cores must translate it to `0xffff_ffff`.
pub fn dest_matches(apic: &LapicIdent, dest: u32, logical: bool) -> bool {
    if apic.x2apic {
        if dest == 0xffff_ffff {
            return true;
        }
        if !logical {
            return dest == apic.id;
        }
        let cluster = dest >> 16;
        let members = dest & 0xffff;
        cluster == apic.ldr >> 16 && members & apic.ldr & 0xffff != 0
    } else {
        let d = dest & 0xff;
        if !logical {
            return d == 0xff || d == apic.id & 0xff;
        }
        let l = (apic.ldr >> 24) & 0xff;
        match (apic.dfr >> 28) & 0xf {
            0xf => d & l != 0,
            0x0 => {
                let (dc, dm) = (d >> 4, d & 0xf);
                let (lc, lm) = (l >> 4, l & 0xf);
                (dc == 0xf || dc == lc) && dm & lm != 0
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xapic(id: u32, ldr: u8, dfr: u32) -> LapicIdent {
        LapicIdent {
            id,
            x2apic: false,
            ldr: (ldr as u32) << 24,
            dfr,
        }
    }

    #[test]
    fn delivery_mode_roundtrip() {
        for b in 0..8 {
            match DeliveryMode::from_bits(b) {
                Some(m) => assert_eq!(m.bits(), b),
                None => assert_eq!(b, 3),
            }
        }
        for b in 0..4 {
            assert_eq!(Shorthand::from_bits(b).bits(), b);
        }
    }

    #[test]
    fn physical_xapic() {
        let a = xapic(3, 0, 0xffff_ffff);
        assert!(dest_matches(&a, 3, false));
        assert!(!dest_matches(&a, 4, false));
        assert!(dest_matches(&a, 0xff, false));
    }

    #[test]
    fn logical_flat_and_cluster() {
        let flat = xapic(0, 0b0000_0100, 0xffff_ffff);
        assert!(dest_matches(&flat, 0b0000_0110, true));
        assert!(!dest_matches(&flat, 0b0000_0011, true));
        assert!(dest_matches(&flat, 0xff, true));
        // Cluster 2, member bit 1.
        let cl = xapic(0, 0x22, 0x0fff_ffff);
        assert!(dest_matches(&cl, 0x23, true));
        assert!(!dest_matches(&cl, 0x21, true));
        assert!(!dest_matches(&cl, 0x32, true));
        assert!(dest_matches(&cl, 0xf2, true));
        assert!(dest_matches(&cl, 0xff, true));
        // Reserved model.
        let bad = xapic(0, 0xff, 0x5fff_ffff);
        assert!(!dest_matches(&bad, 0xff, true));
    }

    #[test]
    fn x2apic_matching() {
        let id = 0x23; // cluster 2, member bit 3
        let a = LapicIdent {
            id,
            x2apic: true,
            ldr: x2apic_ldr(id),
            dfr: 0,
        };
        assert_eq!(a.ldr, 0x0002_0008);
        assert!(dest_matches(&a, 0x23, false));
        assert!(!dest_matches(&a, 0xff, false));
        assert!(dest_matches(&a, 0xffff_ffff, false));
        assert!(dest_matches(&a, 0x0002_000c, true));
        assert!(!dest_matches(&a, 0x0003_0008, true));
        assert!(dest_matches(&a, 0xffff_ffff, true));
    }

    #[test]
    fn shorthands() {
        let a = xapic(1, 0, 0xffff_ffff);
        let mut i = Interrupt::fixed(0x40, 7);
        i.source = 1;
        i.shorthand = Shorthand::SelfOnly;
        assert!(matches(&a, &i));
        i.shorthand = Shorthand::AllExcludingSelf;
        assert!(!matches(&a, &i));
        i.shorthand = Shorthand::AllIncludingSelf;
        assert!(matches(&a, &i));
        i.source = 2;
        i.shorthand = Shorthand::AllExcludingSelf;
        assert!(matches(&a, &i));
        i.shorthand = Shorthand::SelfOnly;
        assert!(!matches(&a, &i));
        i.shorthand = Shorthand::None;
        assert!(!matches(&a, &i));
    }
}
