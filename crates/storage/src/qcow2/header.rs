//! The qcow2 header and its extensions, parsed and checked (pure: no I/O; fuzzed by
//! `fuzz/fuzz_targets/qcow2_header.rs`), and the format's constants.

use crate::DiskError;

/// "QFI\xfb"
pub const MAGIC: u32 = 0x5146_49fb;

pub(crate) const V2_HEADER_LEN: usize = 72;
pub(crate) const V3_HEADER_LEN: usize = 104;

/// Bits 9..=55 of an L1 or L2 entry: the host offset.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster's refcount is exactly one: it may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// v3: the cluster reads as zeroes.
pub(crate) const ZERO: u64 = 1;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub(crate) const INCOMPAT_KNOWN: u64 = 0x1f;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Limits as in QEMU (a 32 MiB L1 table, an 8 MiB refcount table).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Host offsets must fit the 56-bit field of the tables.
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;
pub(crate) const MAX_BACKING_NAME: u32 = 1023;
pub(crate) const MAX_BACKING_DEPTH: u32 = 16;
/// Memory for cached L2 tables, per image.
pub(crate) const L2_CACHE_BYTES: usize = 4 << 20;

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    /// The backing file's name as stored (relative to the image's directory unless absolute).
    pub backing_file: Option<String>,
    /// From the backing format extension ("raw", "qcow2", ...).
    pub backing_format: Option<String>,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    /// Refcounts are `1 << refcount_order` bits wide (4 for version 2).
    pub refcount_order: u32,
    /// 72 for version 2.
    pub header_length: u32,
    pub compression_type: u8,
}

pub(crate) fn fmt_err(msg: impl Into<String>) -> DiskError {
    DiskError::Format(msg.into())
}

pub(crate) fn be32(b: &[u8], at: usize) -> Result<u32, DiskError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| fmt_err(format!("qcow2 header truncated at byte {at}")))
}

pub(crate) fn be64(b: &[u8], at: usize) -> Result<u64, DiskError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| fmt_err(format!("qcow2 header truncated at byte {at}")))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the number of entries in an L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    /// Parse and validate the start of an image: at least its first cluster (or the whole
    /// file, if shorter). See [`crate::parse_qcow2_header`].
    pub fn parse(b: &[u8]) -> Result<Header, DiskError> {
        if b.len() < V2_HEADER_LEN {
            return Err(fmt_err(format!(
                "not a qcow2 image: {} bytes is shorter than a qcow2 header",
                b.len()
            )));
        }
        let magic = be32(b, 0)?;
        if magic != MAGIC {
            return Err(fmt_err(format!("not a qcow2 image (magic {magic:#010x})")));
        }
        let version = be32(b, 4)?;
        if version != 2 && version != 3 {
            return Err(fmt_err(format!(
                "unsupported qcow2 version {version} (2 and 3 are supported)"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8)?,
            backing_file: None,
            backing_format: None,
            cluster_bits: be32(b, 20)?,
            size: be64(b, 24)?,
            crypt_method: be32(b, 32)?,
            l1_size: be32(b, 36)?,
            l1_table_offset: be64(b, 40)?,
            refcount_table_offset: be64(b, 48)?,
            refcount_table_clusters: be32(b, 56)?,
            nb_snapshots: be32(b, 60)?,
            snapshots_offset: be64(b, 64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
        };
        let backing_file_size = be32(b, 16)?;
        if version == 3 {
            h.incompatible_features = be64(b, 72)?;
            h.compatible_features = be64(b, 80)?;
            h.autoclear_features = be64(b, 88)?;
            h.refcount_order = be32(b, 96)?;
            h.header_length = be32(b, 100)?;
            if (h.header_length as usize) < V3_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(fmt_err(format!(
                    "invalid qcow2 header length {}",
                    h.header_length
                )));
            }
            if h.header_length > V3_HEADER_LEN as u32 {
                h.compression_type = *b
                    .get(V3_HEADER_LEN)
                    .ok_or_else(|| fmt_err("qcow2 header truncated"))?;
            }
        }

        if !(9..=21).contains(&h.cluster_bits) {
            return Err(fmt_err(format!(
                "unsupported qcow2 cluster size: 2^{} bytes (512 B to 2 MiB are supported)",
                h.cluster_bits
            )));
        }
        let cs = h.cluster_size();
        if u64::from(h.header_length) > cs {
            return Err(fmt_err("qcow2 header is larger than a cluster"));
        }
        if h.crypt_method != 0 {
            return Err(fmt_err(format!(
                "encrypted qcow2 images are not supported (crypt_method {})",
                h.crypt_method
            )));
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(fmt_err(format!(
                "qcow2 image uses unknown incompatible features {unknown:#x}"
            )));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(fmt_err(
                "qcow2 images with an external data file are not supported",
            ));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(fmt_err(
                "qcow2 images with extended L2 entries (subclusters) are not supported",
            ));
        }
        if h.refcount_order > 6 {
            return Err(fmt_err(format!(
                "invalid qcow2 refcount order {} (refcounts of at most 64 bits)",
                h.refcount_order
            )));
        }

        // Sizes and table placement.
        if h.size > i64::MAX as u64 {
            return Err(fmt_err(format!(
                "qcow2 virtual size {} is too large",
                h.size
            )));
        }
        let per_l1 = cs << h.l2_bits(); // bytes of disk mapped by one L1 entry
        let l1_needed = h.size.div_ceil(per_l1);
        if u64::from(h.l1_size) < l1_needed {
            return Err(fmt_err(format!(
                "qcow2 L1 table too small: {} entries for a {}-byte disk (needs {l1_needed})",
                h.l1_size, h.size
            )));
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(fmt_err(format!(
                "qcow2 L1 table too large ({} entries)",
                h.l1_size
            )));
        }
        if h.l1_size > 0 {
            check_table("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8, cs)?;
        }
        if h.refcount_table_clusters == 0 {
            return Err(fmt_err("qcow2 image has an empty refcount table"));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(fmt_err(format!(
                "qcow2 refcount table too large ({} clusters)",
                h.refcount_table_clusters
            )));
        }
        check_table("refcount table", h.refcount_table_offset, rt_bytes, cs)?;
        if h.nb_snapshots > 0 && (!h.snapshots_offset.is_multiple_of(cs) || h.snapshots_offset == 0)
        {
            return Err(fmt_err(format!(
                "qcow2 snapshot table offset {:#x} is invalid",
                h.snapshots_offset
            )));
        }

        // The backing file name lies in the first cluster, after the extensions.
        if h.backing_file_offset != 0 && backing_file_size != 0 {
            let off = h.backing_file_offset;
            let len = backing_file_size;
            if len > MAX_BACKING_NAME || off >= cs || off + u64::from(len) > cs {
                return Err(fmt_err(format!(
                    "qcow2 backing file name ({len} bytes at {off:#x}) is invalid"
                )));
            }
            let name = b
                .get(off as usize..off as usize + len as usize)
                .ok_or_else(|| fmt_err("qcow2 header truncated in the backing file name"))?;
            let name = std::str::from_utf8(name)
                .map_err(|_| fmt_err("qcow2 backing file name is not UTF-8"))?;
            h.backing_file = Some(name.to_string());
        }

        // Header extensions, up to the backing file name or the end of the first cluster.
        let mut end = (cs as usize).min(b.len());
        if h.backing_file.is_some() {
            end = end.min(h.backing_file_offset as usize);
        }
        let mut at = h.header_length as usize;
        loop {
            if at + 8 > end {
                return Err(fmt_err(
                    "qcow2 header extensions are truncated (no end marker)",
                ));
            }
            let ty = be32(b, at)?;
            let len = be32(b, at + 4)? as usize;
            if ty == EXT_END {
                break;
            }
            let data = b
                .get(at + 8..)
                .and_then(|d| d.get(..len))
                .filter(|_| at + 8 + len <= end)
                .ok_or_else(|| {
                    fmt_err(format!(
                        "qcow2 header extension {ty:#x} ({len} bytes at {at}) overflows the header"
                    ))
                })?;
            match ty {
                EXT_BACKING_FORMAT => {
                    let f = std::str::from_utf8(data)
                        .map_err(|_| fmt_err("qcow2 backing format name is not UTF-8"))?;
                    h.backing_format = Some(f.to_string());
                }
                EXT_DATA_FILE => {
                    return Err(fmt_err(
                        "qcow2 images with an external data file are not supported",
                    ));
                }
                EXT_FULL_DISK_ENCRYPTION => {
                    return Err(fmt_err("encrypted qcow2 images are not supported"));
                }
                _ => {} // feature names, bitmaps, unknown: nothing to do
            }
            at += 8 + len.div_ceil(8) * 8;
        }
        Ok(h)
    }
}

/// A table of `bytes` at `offset`: cluster-aligned, not over the header, addressable.
pub(crate) fn check_table(what: &str, offset: u64, bytes: u64, cs: u64) -> Result<(), DiskError> {
    if offset == 0 || !offset.is_multiple_of(cs) || offset.saturating_add(bytes) > MAX_HOST_OFFSET {
        return Err(fmt_err(format!(
            "qcow2 {what} offset {offset:#x} is invalid (zero, unaligned or too large)"
        )));
    }
    Ok(())
}
