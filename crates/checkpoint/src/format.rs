//! The checkpoint format: a fixed header, a JSON metadata block with one section per core,
//! device and VM-wide part, and the guest memory image (sparse: zero pages are holes).
//! Everything here is pure parsing over byte slices, so it can be fuzzed on its own.
//! `docs/checkpoint-format.md` describes the layout.

use serde::{Deserialize, Serialize};

/// The first 8 bytes of every checkpoint.
pub const MAGIC: [u8; 8] = *b"PALACKPT";
/// The format version this build writes (semver: a reader takes the same major version and a
/// minor version up to its own).
pub const VERSION: (u16, u16, u16) = (1, 0, 0);
/// Size of the header.
pub const HEADER_LEN: usize = 64;
/// Guest memory is stored in pages of this size; the memory image starts page aligned.
pub const PAGE: u64 = 4096;
/// The metadata may not be larger than this (a sanity bound for corrupt headers).
pub const MAX_META: u64 = 256 << 20;
/// Header flag: the memory image is in a separate file (`memory` next to the state file).
pub const FLAG_SEPARATE_MEMORY: u32 = 1;

/// The CRC every checkpoint carries: CRC-64/XZ.
pub const CRC: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);

/// Why a checkpoint cannot be read. Every message names the problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a Palacios-rs checkpoint (bad magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("the checkpoint is truncated: {what} needs {need} bytes, the file has {have}")]
    Truncated { what: String, need: u64, have: u64 },
    #[error(
        "checkpoint format {found} is newer than this build reads ({}.{}.x); use a newer v3",
        VERSION.0, VERSION.1
    )]
    Newer { found: String },
    #[error("checkpoint format {found} is not supported (this build reads {}.x.x)", VERSION.0)]
    Unsupported { found: String },
    #[error(
        "the checkpoint is corrupt: CRC-64 {found:#018x} does not match the recorded {expected:#018x}"
    )]
    Crc { expected: u64, found: u64 },
    #[error("the checkpoint is corrupt: {0}")]
    Corrupt(String),
    #[error("unknown section kind '{kind}' (this build knows: core, device, clock, backend)")]
    UnknownSection { kind: String },
}

/// The fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: (u16, u16, u16),
    pub flags: u32,
    pub meta_offset: u64,
    pub meta_len: u64,
    pub mem_offset: u64,
    pub mem_len: u64,
    pub crc: u64,
}

impl Header {
    /// The 64 header bytes; `with_crc: false` writes 0 in the CRC field (what the CRC covers).
    pub fn encode(&self, with_crc: bool) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.0.to_le_bytes());
        b[10..12].copy_from_slice(&self.version.1.to_le_bytes());
        b[12..14].copy_from_slice(&self.version.2.to_le_bytes());
        b[16..24].copy_from_slice(&self.meta_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.meta_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.mem_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.mem_len.to_le_bytes());
        if with_crc {
            b[48..56].copy_from_slice(&self.crc.to_le_bytes());
        }
        b[56..60].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// Parse and check a header read from a file of `file_len` bytes (the state file).
    pub fn decode(b: &[u8], file_len: u64) -> Result<Header, FormatError> {
        if b.len() < HEADER_LEN {
            if b.len() >= 8 && b[..8] != MAGIC {
                return Err(FormatError::Magic(b[..8].try_into().unwrap_or_default()));
            }
            return Err(FormatError::Truncated {
                what: "the header".into(),
                need: HEADER_LEN as u64,
                have: b.len() as u64,
            });
        }
        let magic: [u8; 8] = b[..8].try_into().unwrap_or_default();
        if magic != MAGIC {
            return Err(FormatError::Magic(magic));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let version = (u16_at(8), u16_at(10), u16_at(12));
        let found = format!("{}.{}.{}", version.0, version.1, version.2);
        if version.0 > VERSION.0 || (version.0 == VERSION.0 && version.1 > VERSION.1) {
            return Err(FormatError::Newer { found });
        }
        if version.0 < VERSION.0 || version.0 == 0 {
            return Err(FormatError::Unsupported { found });
        }
        let h = Header {
            version,
            flags: u32::from_le_bytes(b[56..60].try_into().unwrap_or_default()),
            meta_offset: u64_at(16),
            meta_len: u64_at(24),
            mem_offset: u64_at(32),
            mem_len: u64_at(40),
            crc: u64_at(48),
        };
        if h.flags & !FLAG_SEPARATE_MEMORY != 0 {
            return Err(FormatError::Corrupt(format!(
                "unknown header flags {:#x}",
                h.flags
            )));
        }
        if h.meta_offset < HEADER_LEN as u64 || h.meta_len > MAX_META {
            return Err(FormatError::Corrupt(format!(
                "metadata at {:#x}+{:#x} is out of bounds",
                h.meta_offset, h.meta_len
            )));
        }
        let meta_end = h
            .meta_offset
            .checked_add(h.meta_len)
            .ok_or_else(|| FormatError::Corrupt("metadata size overflows".into()))?;
        if meta_end > file_len {
            return Err(FormatError::Truncated {
                what: "the metadata".into(),
                need: meta_end,
                have: file_len,
            });
        }
        if h.mem_offset % PAGE != 0 || h.mem_len % PAGE != 0 {
            return Err(FormatError::Corrupt(format!(
                "the memory image at {:#x}+{:#x} is not page aligned",
                h.mem_offset, h.mem_len
            )));
        }
        if h.flags & FLAG_SEPARATE_MEMORY == 0 {
            let mem_end = h
                .mem_offset
                .checked_add(h.mem_len)
                .ok_or_else(|| FormatError::Corrupt("memory size overflows".into()))?;
            if h.mem_len > 0
                && (h.mem_offset < HEADER_LEN as u64
                    || (h.mem_offset < meta_end && h.meta_offset < mem_end))
            {
                return Err(FormatError::Corrupt(
                    "the memory image overlaps the header or the metadata".into(),
                ));
            }
            if mem_end > file_len {
                return Err(FormatError::Truncated {
                    what: "the memory image".into(),
                    need: mem_end,
                    have: file_len,
                });
            }
        }
        Ok(h)
    }
}

/// The layout of guest memory in the image: guest-physical ranges in image order, and the
/// extents of the image that hold data (everything else reads as zero).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// (guest-physical start, length), in the order they follow each other in the image.
    pub slots: Vec<(u64, u64)>,
    /// (offset in the image, length) of the non-zero data, ascending, page aligned.
    pub extents: Vec<(u64, u64)>,
}

impl MemoryLayout {
    /// Total bytes of the image.
    pub fn image_len(&self) -> u64 {
        self.slots.iter().fold(0u64, |a, s| a.saturating_add(s.1))
    }

    /// Check the extents: ascending, disjoint, page aligned, inside the image.
    pub fn check(&self) -> Result<(), FormatError> {
        let len = self.image_len();
        let mut end = 0u64;
        for &(o, n) in &self.extents {
            let e = o
                .checked_add(n)
                .ok_or_else(|| FormatError::Corrupt("a memory extent overflows".into()))?;
            if o % PAGE != 0 || n % PAGE != 0 || n == 0 || o < end || e > len {
                return Err(FormatError::Corrupt(format!(
                    "memory extent {o:#x}+{n:#x} is misplaced (image of {len:#x} bytes)"
                )));
            }
            end = e;
        }
        for &(gpa, n) in &self.slots {
            if gpa % PAGE != 0 || n % PAGE != 0 || gpa.checked_add(n).is_none() {
                return Err(FormatError::Corrupt(format!(
                    "memory slot {gpa:#x}+{n:#x} is not page aligned"
                )));
            }
        }
        Ok(())
    }
}

/// One part of the VM's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// `core`, `device`, `clock` or `backend`.
    pub kind: String,
    /// Core index, device id, or the backend part (`irqchip`).
    pub id: String,
    /// The device class (devices only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub class: String,
    /// Version of the state layout.
    pub version: u32,
    pub state: serde_json::Value,
}

/// The section kinds this build reads.
pub const SECTION_KINDS: &[&str] = &["core", "device", "clock", "backend"];

/// Everything but guest memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Seconds since the epoch when it was taken.
    pub created_unix: u64,
    /// The program that wrote it (for example `palacios-rs 0.1.0`).
    pub writer: String,
    /// The backend the VM ran on (`kvm`, `emu`).
    pub backend: String,
    /// The VM's configuration (the core's serde form of its config).
    pub config: serde_json::Value,
    /// The CPUID model the guest saw: (leaf, subleaf, [eax, ebx, ecx, edx]).
    pub cpuid: Vec<(u32, u32, [u32; 4])>,
    pub memory: MemoryLayout,
    pub sections: Vec<Section>,
}

impl Meta {
    /// Parse the metadata block and check it.
    pub fn decode(b: &[u8]) -> Result<Meta, FormatError> {
        let m: Meta = serde_json::from_slice(b)
            .map_err(|e| FormatError::Corrupt(format!("unreadable metadata: {e}")))?;
        for s in &m.sections {
            if !SECTION_KINDS.contains(&s.kind.as_str()) {
                return Err(FormatError::UnknownSection {
                    kind: s.kind.clone(),
                });
            }
        }
        m.memory.check()?;
        Ok(m)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The sections of one kind.
    pub fn sections<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Section> + 'a {
        self.sections.iter().filter(move |s| s.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version: VERSION,
            flags: 0,
            meta_offset: 64,
            meta_len: 100,
            mem_offset: 4096,
            mem_len: 8192,
            crc: 0x1234,
        }
    }

    #[test]
    fn header_round_trips_and_bounds_are_checked() {
        let h = header();
        let b = h.encode(true);
        assert_eq!(Header::decode(&b, 4096 + 8192).unwrap(), h);
        assert!(matches!(
            Header::decode(&b, 4096),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            Header::decode(&b[..10], 100),
            Err(FormatError::Truncated { .. })
        ));
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            Header::decode(&bad, 1 << 20),
            Err(FormatError::Magic(_))
        ));
        let mut newer = h;
        newer.version = (1, 1, 0);
        let e = Header::decode(&newer.encode(true), 1 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "checkpoint format 1.1.0 is newer than this build reads (1.0.x); use a newer v3"
        );
        let mut odd = h;
        odd.mem_offset = 4097;
        assert!(matches!(
            Header::decode(&odd.encode(true), 1 << 20),
            Err(FormatError::Corrupt(_))
        ));
    }

    #[test]
    fn meta_refuses_unknown_sections_and_bad_extents() {
        let mut m = Meta {
            created_unix: 1,
            writer: "t".into(),
            backend: "emu".into(),
            config: serde_json::Value::Null,
            cpuid: vec![],
            memory: MemoryLayout {
                slots: vec![(0, 16 * PAGE)],
                extents: vec![(0, PAGE), (4 * PAGE, 2 * PAGE)],
            },
            sections: vec![Section {
                kind: "core".into(),
                id: "0".into(),
                class: String::new(),
                version: 1,
                state: serde_json::json!({}),
            }],
        };
        assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
        m.sections[0].kind = "gpu".into();
        assert_eq!(
            Meta::decode(&m.encode()).unwrap_err().to_string(),
            "unknown section kind 'gpu' (this build knows: core, device, clock, backend)"
        );
        m.sections.clear();
        m.memory.extents = vec![(4 * PAGE, PAGE), (0, PAGE)];
        assert!(Meta::decode(&m.encode()).is_err());
        m.memory.extents = vec![(15 * PAGE, 2 * PAGE)];
        assert!(Meta::decode(&m.encode()).is_err());
        assert!(Meta::decode(b"{not json").is_err());
    }
}
