//! qcow2 images (QEMU's copy-on-write format), versions 2 and 3.
//!
//! What is implemented: the header and its extensions, the two-level cluster map (L1 and
//! L2 tables, with the v3 "reads as zeroes" flag), refcount tables and blocks of every
//! refcount width (1 to 64 bits), and backing files (raw or qcow2, relative to the image's
//! directory; unallocated clusters read from the backing file, or as zeroes past its end or
//! without one).
//!
//! Writes allocate whole clusters at the end of the file (copying the rest of the cluster
//! from the backing file when a write covers only part of it) and update the metadata in
//! an order that leaves at worst a leaked cluster if the host dies half-way: the refcount
//! first, then the cluster's data, then the L2 entry (and a new L2 table is zeroed and
//! counted before the L1 entry points to it). Freed clusters are never reused (discard is a
//! no-op), so a cluster's host offset never changes while it is mapped, and data reads and
//! writes to mapped clusters run outside the metadata lock. The refcount table grows when
//! it has to (a new table at the end of the file, then the header, then the old table's
//! clusters are released).
//!
//! Refused with a clear error: compressed clusters (when one is read or written),
//! encryption, external data files, extended L2 entries, unknown incompatible features,
//! and opening for writing an image that has internal snapshots (clusters may be shared),
//! is marked corrupt, or is dirty (lazy refcounts not yet repaired). Unknown "autoclear"
//! feature bits (e.g. persistent bitmaps) are cleared when an image is opened for writing,
//! as the specification requires of a writer that does not maintain them.
//!
//! A corrupt image (tables that are unaligned or point past the end of the file, truncated
//! headers, absurd sizes) gives [`DiskError::Format`], never a panic.

use crate::{BlockBackend, DiskError, check_range, make_serial};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// "QFI\xfb"
pub const MAGIC: u32 = 0x5146_49fb;

const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;

/// Bits 9..=55 of an L1 or L2 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster's refcount is exactly one: it may be written in place.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// v3: the cluster reads as zeroes.
const ZERO: u64 = 1;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Limits as in QEMU (a 32 MiB L1 table, an 8 MiB refcount table).
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Host offsets must fit the 56-bit field of the tables.
const MAX_HOST_OFFSET: u64 = 1 << 56;
const MAX_BACKING_NAME: u32 = 1023;
const MAX_BACKING_DEPTH: u32 = 16;
/// Memory for cached L2 tables, per image.
const L2_CACHE_BYTES: usize = 4 << 20;

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

fn fmt_err(msg: impl Into<String>) -> DiskError {
    DiskError::Format(msg.into())
}

fn be32(b: &[u8], at: usize) -> Result<u32, DiskError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| fmt_err(format!("qcow2 header truncated at byte {at}")))
}

fn be64(b: &[u8], at: usize) -> Result<u64, DiskError> {
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
fn check_table(what: &str, offset: u64, bytes: u64, cs: u64) -> Result<(), DiskError> {
    if offset == 0 || !offset.is_multiple_of(cs) || offset.saturating_add(bytes) > MAX_HOST_OFFSET {
        return Err(fmt_err(format!(
            "qcow2 {what} offset {offset:#x} is invalid (zero, unaligned or too large)"
        )));
    }
    Ok(())
}

/// True if the file at `path` starts with the qcow2 magic.
pub fn probe(path: &Path) -> Result<bool, DiskError> {
    let f = File::open(path)
        .map_err(|e| DiskError::io(format!("opening disk image {}", path.display()), e))?;
    let mut magic = [0u8; 4];
    let n = read_full(&f, &mut magic, 0)
        .map_err(|e| DiskError::io(format!("reading {}", path.display()), e))?;
    Ok(n == 4 && u32::from_be_bytes(magic) == MAGIC)
}

/// Read as much of `buf` as the file has at `offset`; returns the count (short at EOF).
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Not allocated here: the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is kept allocated (or none), `copied` as in the entry.
    Zero {
        host: u64,
        copied: bool,
    },
    Data {
        host: u64,
        copied: bool,
    },
    Compressed,
}

struct State {
    l1: Vec<u64>,
    /// First free byte at the end of the file (cluster-aligned): where clusters are allocated.
    end: u64,
    /// Loaded for writable images only.
    refcount_table: Vec<u64>,
    rt_offset: u64,
    rt_clusters: u64,
    /// L2 tables by host offset (write-through).
    l2_cache: HashMap<u64, Vec<u64>>,
    /// A metadata update failed half-way: refuse writes until reopened.
    failed: Option<String>,
}

/// A qcow2 image.
pub struct Qcow2Backend {
    file: File,
    name: String,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    l2_bits: u32,
    read_only: bool,
    backing: Option<Arc<dyn BlockBackend>>,
    state: Mutex<State>,
    serial: String,
}

impl std::fmt::Debug for Qcow2Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Backend")
            .field("name", &self.name)
            .field("header", &self.header)
            .field("read_only", &self.read_only)
            .field("backing", &self.backing.as_ref().map(|b| b.kind()))
            .finish()
    }
}

impl Qcow2Backend {
    pub fn open(path: &Path, writable: bool) -> Result<Qcow2Backend, DiskError> {
        Self::open_depth(path, writable, 0)
    }

    fn open_depth(path: &Path, writable: bool, depth: u32) -> Result<Qcow2Backend, DiskError> {
        let name = path.display().to_string();
        let mode = if writable { "read-write" } else { "read-only" };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| DiskError::io(format!("opening qcow2 image {name} ({mode})"), e))?;
        let ctx = |what: &str| format!("{what} of qcow2 image {name}");
        let file_len = file
            .metadata()
            .map_err(|e| DiskError::io(ctx("reading the metadata"), e))?
            .len();

        // The fixed header tells the cluster size; then parse the whole first cluster.
        let mut first = [0u8; V3_HEADER_LEN];
        let n = read_full(&file, &mut first, 0)
            .map_err(|e| DiskError::io(ctx("reading the header"), e))?;
        let cluster_bits = if n >= 24 {
            u32::from_be_bytes([first[20], first[21], first[22], first[23]])
        } else {
            0
        };
        let head_len = if (9..=21).contains(&cluster_bits) {
            1usize << cluster_bits
        } else {
            n
        };
        let mut head = vec![0u8; head_len];
        let n = read_full(&file, &mut head, 0)
            .map_err(|e| DiskError::io(ctx("reading the header"), e))?;
        head.truncate(n);
        let header = Header::parse(&head).map_err(|e| fmt_err(format!("{name}: {e}")))?;
        let cs = header.cluster_size();
        let end = file_len.div_ceil(cs) * cs;

        if writable {
            let refuse = |why: &str| {
                Err(DiskError::Unsupported(format!(
                    "{name}: cannot open for writing: {why}"
                )))
            };
            if header.nb_snapshots > 0 {
                return refuse("the image has internal snapshots (clusters may be shared)");
            }
            if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return refuse("the image is marked corrupt (run qemu-img check -r all)");
            }
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                return refuse(
                    "the image is dirty: its refcounts need repair (run qemu-img check -r all)",
                );
            }
        }

        // Tables must lie inside the file.
        let inside = |what: &str, off: u64, bytes: u64| {
            if off.saturating_add(bytes) > end {
                Err(fmt_err(format!(
                    "{name}: qcow2 {what} at {off:#x} ({bytes} bytes) lies past the end of the file ({file_len} bytes)"
                )))
            } else {
                Ok(())
            }
        };
        let l1_bytes = u64::from(header.l1_size) * 8;
        if header.l1_size > 0 {
            inside("L1 table", header.l1_table_offset, l1_bytes)?;
        }
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        inside("refcount table", header.refcount_table_offset, rt_bytes)?;

        let read_table = |off: u64, bytes: u64, what: &str| -> Result<Vec<u64>, DiskError> {
            let mut raw = vec![0u8; bytes as usize];
            read_full(&file, &mut raw, off)
                .map_err(|e| DiskError::io(ctx(&format!("reading the {what}")), e))?;
            Ok(raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect())
        };
        let l1 = read_table(header.l1_table_offset, l1_bytes, "L1 table")?;
        let refcount_table = if writable {
            read_table(header.refcount_table_offset, rt_bytes, "refcount table")?
        } else {
            Vec::new()
        };

        let backing = match &header.backing_file {
            None => None,
            Some(b) => Some(open_backing(
                path,
                b,
                header.backing_format.as_deref(),
                depth,
            )?),
        };

        if writable && header.version == 3 && header.autoclear_features != 0 {
            tracing::info!(image = %name, bits = header.autoclear_features, "clearing qcow2 autoclear feature bits");
            file.write_all_at(&[0u8; 8], 88)
                .map_err(|e| DiskError::io(ctx("clearing the autoclear features"), e))?;
        }

        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        tracing::debug!(image = %name, version = header.version, size = header.size,
            cluster_size = cs, backing = ?header.backing_file, writable, "opened qcow2 image");
        Ok(Qcow2Backend {
            file,
            serial: make_serial(&base, &key),
            name,
            cluster_bits: header.cluster_bits,
            cluster_size: cs,
            l2_bits: header.l2_bits(),
            read_only: !writable,
            backing,
            state: Mutex::new(State {
                l1,
                end,
                refcount_table,
                rt_offset: header.refcount_table_offset,
                rt_clusters: u64::from(header.refcount_table_clusters),
                l2_cache: HashMap::new(),
                failed: None,
            }),
            header,
        })
    }

    /// The image's header as read at open.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Metadata updates that fail half-way set `failed` themselves; a panic inside the
        // lock (a bug) leaves the state as unusable for writes as such a failure.
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => {
                let mut g = p.into_inner();
                g.failed
                    .get_or_insert_with(|| "a thread panicked while updating metadata".into());
                g
            }
        }
    }

    fn ctx(&self, what: impl std::fmt::Display) -> String {
        format!("{what} in qcow2 image {}", self.name)
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let n = read_full(&self.file, buf, offset).map_err(|e| {
            DiskError::io(
                self.ctx(format_args!("reading {} bytes at {offset:#x}", buf.len())),
                e,
            )
        })?;
        buf[n..].fill(0); // past the end of the file reads as zeroes
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            DiskError::io(
                self.ctx(format_args!("writing {} bytes at {offset:#x}", buf.len())),
                e,
            )
        })
    }

    fn write_u64(&self, value: u64, offset: u64) -> Result<(), DiskError> {
        self.pwrite(&value.to_be_bytes(), offset)
    }

    /// A host cluster offset found in a table: aligned and inside the file.
    fn check_host(
        &self,
        st: &State,
        off: u64,
        what: impl std::fmt::Display,
    ) -> Result<(), DiskError> {
        if !off.is_multiple_of(self.cluster_size) {
            return Err(fmt_err(format!(
                "{}: {what} points to unaligned offset {off:#x} (image corrupt)",
                self.name
            )));
        }
        if off >= st.end {
            return Err(fmt_err(format!(
                "{}: {what} points to offset {off:#x}, past the end of the file (image corrupt)",
                self.name
            )));
        }
        Ok(())
    }

    /// The L2 table at `off` (validated), from the cache or the file.
    fn l2_table<'a>(&self, st: &'a mut State, off: u64) -> Result<&'a mut Vec<u64>, DiskError> {
        if !st.l2_cache.contains_key(&off) {
            let mut raw = vec![0u8; self.cluster_size as usize];
            self.pread(&mut raw, off)?;
            let table: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            let max_tables = (L2_CACHE_BYTES / self.cluster_size as usize).max(1);
            if st.l2_cache.len() >= max_tables
                && let Some(k) = st.l2_cache.keys().next().copied()
            {
                st.l2_cache.remove(&k);
            }
            st.l2_cache.insert(off, table);
        }
        st.l2_cache
            .get_mut(&off)
            .ok_or_else(|| fmt_err("L2 cache miss after insertion"))
    }

    fn split(&self, guest_cluster: u64) -> (usize, usize) {
        let l1i = (guest_cluster >> self.l2_bits) as usize;
        let l2i = (guest_cluster & ((1 << self.l2_bits) - 1)) as usize;
        (l1i, l2i)
    }

    /// The L2 table's offset for L1 index `l1i`, if one is allocated.
    fn l2_offset(&self, st: &State, l1i: usize) -> Result<Option<u64>, DiskError> {
        let e = *st
            .l1
            .get(l1i)
            .ok_or_else(|| fmt_err(format!("{}: L1 index {l1i} beyond the L1 table", self.name)))?;
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        self.check_host(st, off, format_args!("L1 entry {l1i}"))?;
        Ok(Some(off))
    }

    fn lookup(&self, st: &mut State, guest_cluster: u64) -> Result<Mapping, DiskError> {
        let (l1i, l2i) = self.split(guest_cluster);
        let Some(l2_off) = self.l2_offset(st, l1i)? else {
            return Ok(Mapping::Unallocated);
        };
        let e = *self
            .l2_table(st, l2_off)?
            .get(l2i)
            .ok_or_else(|| fmt_err("L2 index beyond the table"))?;
        if e & COMPRESSED != 0 {
            return Ok(Mapping::Compressed);
        }
        let host = e & OFFSET_MASK;
        let copied = e & COPIED != 0;
        if host != 0 {
            self.check_host(
                st,
                host,
                format_args!("L2 entry {l2i} of the table at {l2_off:#x}"),
            )?;
        }
        Ok(if e & ZERO != 0 {
            Mapping::Zero { host, copied }
        } else if host == 0 {
            Mapping::Unallocated
        } else {
            Mapping::Data { host, copied }
        })
    }

    fn compressed_err(&self, guest_off: u64) -> DiskError {
        DiskError::Unsupported(format!(
            "{}: the cluster at guest offset {guest_off:#x} is compressed; compressed qcow2 clusters are not supported (convert the image with qemu-img convert -O qcow2)",
            self.name
        ))
    }

    fn shared_err(&self, guest_off: u64) -> DiskError {
        DiskError::Unsupported(format!(
            "{}: the cluster at guest offset {guest_off:#x} is shared (no COPIED flag); writing to shared qcow2 clusters is not supported",
            self.name
        ))
    }

    /// Read from the backing file (zeroes past its end, or without one).
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let cap = b.capacity();
        let n = if offset >= cap {
            0
        } else {
            (cap - offset).min(buf.len() as u64) as usize
        };
        if n > 0 {
            b.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Calls `f(guest_cluster, offset_in_cluster, range_of_request)` for each cluster piece.
    fn chunks(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, std::ops::Range<usize>) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let gc = pos >> self.cluster_bits;
            let in_off = pos & (self.cluster_size - 1);
            let n = (self.cluster_size - in_off).min(len - done);
            f(gc, in_off, done as usize..(done + n) as usize)?;
            done += n;
        }
        Ok(())
    }

    fn check_writable(&self, st: &State, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.header.size)?;
        if let Some(why) = &st.failed {
            return Err(fmt_err(format!(
                "{}: an earlier metadata update failed ({why}); writes are refused until the image is reopened",
                self.name
            )));
        }
        Ok(())
    }

    /// Runs a metadata update; a failure marks the image failed for writes.
    fn guarded<T>(
        &self,
        st: &mut State,
        f: impl FnOnce(&Self, &mut State) -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        let r = f(self, st);
        if let Err(e) = &r
            && st.failed.is_none()
        {
            tracing::error!(image = %self.name, error = %e, "qcow2 metadata update failed");
            st.failed = Some(e.to_string());
        }
        r
    }

    // ---- refcounts ----

    fn refcount_bits(&self) -> u64 {
        1 << self.header.refcount_order
    }

    /// Refcount entries per refcount block.
    fn refcounts_per_block(&self) -> u64 {
        (self.cluster_size * 8) >> self.header.refcount_order
    }

    /// The refcount block for table index `rti`, validated; `None` if unallocated.
    fn refcount_block(&self, st: &State, rti: usize) -> Result<Option<u64>, DiskError> {
        let Some(&e) = st.refcount_table.get(rti) else {
            return Ok(None);
        };
        let off = e & !0x1ff;
        if off == 0 {
            return Ok(None);
        }
        self.check_host(st, off, format_args!("refcount table entry {rti}"))?;
        Ok(Some(off))
    }

    /// Byte offset (in the block) and bit shift of cluster `idx`'s refcount entry.
    fn refcount_pos(&self, idx: u64) -> (u64, u32) {
        let bit = (idx % self.refcounts_per_block()) * self.refcount_bits();
        (bit / 8, (bit % 8) as u32)
    }

    fn get_refcount(&self, st: &State, idx: u64) -> Result<u64, DiskError> {
        let rti = usize::try_from(idx / self.refcounts_per_block()).unwrap_or(usize::MAX);
        let Some(block) = self.refcount_block(st, rti)? else {
            return Ok(0);
        };
        let (byte, shift) = self.refcount_pos(idx);
        let w = self.refcount_bits();
        if w >= 8 {
            let mut b = [0u8; 8];
            let n = (w / 8) as usize;
            self.pread(&mut b[8 - n..], block + byte)?;
            Ok(u64::from_be_bytes(b))
        } else {
            let mut b = [0u8; 1];
            self.pread(&mut b, block + byte)?;
            Ok(u64::from(b[0] >> shift) & ((1 << w) - 1))
        }
    }

    fn set_refcount(&self, st: &mut State, idx: u64, value: u64) -> Result<(), DiskError> {
        let epb = self.refcounts_per_block();
        let rti = usize::try_from(idx / epb)
            .map_err(|_| fmt_err(format!("{}: cluster index {idx} too large", self.name)))?;
        if rti >= st.refcount_table.len() {
            self.grow_refcount_table(st, rti)?;
        }
        let block = match self.refcount_block(st, rti)? {
            Some(b) => b,
            None => {
                // A new refcount block at the end of the file, then its own refcount.
                let block = st.end;
                st.end += self.cluster_size;
                self.pwrite(&vec![0u8; self.cluster_size as usize], block)?;
                self.write_u64(block, st.rt_offset + rti as u64 * 8)?;
                st.refcount_table[rti] = block;
                self.set_refcount(st, block >> self.cluster_bits, 1)?;
                block
            }
        };
        let (byte, shift) = self.refcount_pos(idx);
        let w = self.refcount_bits();
        if w < 64 && value >> w != 0 {
            return Err(fmt_err(format!("refcount {value} does not fit {w} bits")));
        }
        if w >= 8 {
            let n = (w / 8) as usize;
            self.pwrite(&value.to_be_bytes()[8 - n..], block + byte)
        } else {
            let mut b = [0u8; 1];
            self.pread(&mut b, block + byte)?;
            let mask = (((1u16 << w) - 1) << shift) as u8;
            b[0] = (b[0] & !mask) | ((value as u8) << shift);
            self.pwrite(&b, block + byte)
        }
    }

    /// Replace the refcount table by a larger one (at the end of the file) covering
    /// refcount table index `min_index` and the clusters the new table itself needs.
    fn grow_refcount_table(&self, st: &mut State, min_index: usize) -> Result<(), DiskError> {
        let cs = self.cluster_size;
        let epb = self.refcounts_per_block();
        let mut clusters = (st.rt_clusters * 2).max(1);
        loop {
            let entries = clusters * cs / 8;
            // Clusters in the file afterwards: what is there, the table, and at most one
            // refcount block per table cluster or block (+2), counted generously.
            let covered = entries * epb;
            let needed = st.end / cs + 2 * clusters + 2;
            if entries > min_index as u64 && covered >= needed {
                break;
            }
            clusters *= 2;
            if clusters * cs > MAX_REFTABLE_BYTES {
                return Err(fmt_err(format!(
                    "{}: the refcount table cannot grow past {MAX_REFTABLE_BYTES} bytes",
                    self.name
                )));
            }
        }
        let entries = (clusters * cs / 8) as usize;
        let old_offset = st.rt_offset;
        let old_clusters = st.rt_clusters;
        let new_offset = st.end;
        st.end += clusters * cs;
        tracing::debug!(image = %self.name, old_clusters, clusters, "growing the qcow2 refcount table");

        st.refcount_table.resize(entries, 0);
        st.rt_offset = new_offset;
        st.rt_clusters = clusters;
        for c in 0..clusters {
            self.set_refcount(st, (new_offset >> self.cluster_bits) + c, 1)?;
        }
        let raw: Vec<u8> = st
            .refcount_table
            .iter()
            .flat_map(|e| e.to_be_bytes())
            .collect();
        self.pwrite(&raw, new_offset)?;
        // The new table must be on disk before the header points to it.
        self.file
            .sync_data()
            .map_err(|e| DiskError::io(self.ctx("flushing the new refcount table"), e))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.pwrite(&hdr, 48)?;
        self.file
            .sync_data()
            .map_err(|e| DiskError::io(self.ctx("flushing the header"), e))?;
        for c in 0..old_clusters {
            self.set_refcount(st, (old_offset >> self.cluster_bits) + c, 0)?;
        }
        Ok(())
    }

    /// A new cluster at the end of the file, its refcount set to one.
    fn alloc_cluster(&self, st: &mut State) -> Result<u64, DiskError> {
        let off = st.end;
        if off + self.cluster_size > MAX_HOST_OFFSET {
            return Err(fmt_err(format!("{}: the image file is full", self.name)));
        }
        st.end += self.cluster_size;
        let idx = off >> self.cluster_bits;
        let old = self.get_refcount(st, idx)?;
        if old != 0 {
            return Err(fmt_err(format!(
                "{}: cluster {off:#x} past the end of the file has refcount {old} (image corrupt; run qemu-img check -r all)",
                self.name
            )));
        }
        self.set_refcount(st, idx, 1)?;
        Ok(off)
    }

    /// The L2 table for `l1i`, allocating (zeroed, counted, then linked) if there is none.
    fn ensure_l2(&self, st: &mut State, l1i: usize) -> Result<u64, DiskError> {
        if let Some(off) = self.l2_offset(st, l1i)? {
            if st.l1[l1i] & COPIED == 0 {
                return Err(DiskError::Unsupported(format!(
                    "{}: L2 table {off:#x} is shared (no COPIED flag); writing to shared qcow2 tables is not supported",
                    self.name
                )));
            }
            return Ok(off);
        }
        let off = self.alloc_cluster(st)?;
        self.pwrite(&vec![0u8; self.cluster_size as usize], off)?;
        let entry = off | COPIED;
        self.write_u64(entry, self.header.l1_table_offset + l1i as u64 * 8)?;
        st.l1[l1i] = entry;
        st.l2_cache
            .insert(off, vec![0u64; (self.cluster_size / 8) as usize]);
        Ok(off)
    }

    fn set_l2_entry(
        &self,
        st: &mut State,
        guest_cluster: u64,
        entry: u64,
    ) -> Result<(), DiskError> {
        let (l1i, l2i) = self.split(guest_cluster);
        let l2_off = self.ensure_l2(st, l1i)?;
        self.write_u64(entry, l2_off + l2i as u64 * 8)?;
        if let Some(t) = st.l2_cache.get_mut(&l2_off)
            && let Some(e) = t.get_mut(l2i)
        {
            *e = entry;
        }
        Ok(())
    }

    /// Write `data` at `in_off` of guest cluster `gc`, which is not writable in place
    /// (`m`): build the whole cluster, allocate it if needed, write it, map it.
    fn write_cluster_cow(
        &self,
        st: &mut State,
        gc: u64,
        in_off: u64,
        data: &[u8],
        m: Mapping,
    ) -> Result<(), DiskError> {
        let guest_off = gc << self.cluster_bits;
        let cs = self.cluster_size as usize;
        let (reuse, from_backing) = match m {
            Mapping::Compressed => return Err(self.compressed_err(guest_off)),
            Mapping::Data { copied: false, .. }
            | Mapping::Zero {
                copied: false,
                host: 1..,
            } => {
                return Err(self.shared_err(guest_off));
            }
            Mapping::Data { host, copied: true } => (Some(host), false), // not reached: in place
            Mapping::Zero { host: 0, .. } => (None, false),
            Mapping::Zero { host, copied: true } => (Some(host), false),
            Mapping::Unallocated => (None, true),
        };
        let mut cluster = vec![0u8; cs];
        if data.len() != cs && from_backing {
            self.read_backing(&mut cluster, guest_off)?;
        }
        cluster[in_off as usize..in_off as usize + data.len()].copy_from_slice(data);
        self.guarded(st, |me, st| {
            let (l1i, _) = me.split(gc);
            me.ensure_l2(st, l1i)?;
            let host = match reuse {
                Some(h) => h,
                None => me.alloc_cluster(st)?,
            };
            me.pwrite(&cluster, host)?;
            me.set_l2_entry(st, gc, host | COPIED)
        })
    }
}

/// Open the backing file `name` of the image at `image` (read-only).
fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    depth: u32,
) -> Result<Arc<dyn BlockBackend>, DiskError> {
    if depth >= MAX_BACKING_DEPTH {
        return Err(fmt_err(format!(
            "{}: backing chain deeper than {MAX_BACKING_DEPTH} images (a loop?)",
            image.display()
        )));
    }
    let p = Path::new(name);
    let path: PathBuf = if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    };
    let wrap = |e: DiskError| {
        fmt_err(format!(
            "{}: cannot open backing file {}: {e}",
            image.display(),
            path.display()
        ))
    };
    let qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => {
            return Err(DiskError::Unsupported(format!(
                "{}: backing file format {other:?} is not supported (raw and qcow2 are)",
                image.display()
            )));
        }
        None => probe(&path).map_err(wrap)?,
    };
    if qcow2 {
        Ok(Arc::new(
            Qcow2Backend::open_depth(&path, false, depth + 1).map_err(wrap)?,
        ))
    } else {
        Ok(Arc::new(
            crate::file::FileBackend::open(&path, false).map_err(wrap)?,
        ))
    }
}

impl BlockBackend for Qcow2Backend {
    fn capacity(&self) -> u64 {
        self.header.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.header.size)?;
        self.chunks(offset, buf.len() as u64, |gc, in_off, r| {
            let m = {
                let mut st = self.lock();
                self.lookup(&mut st, gc)?
            };
            let out = &mut buf[r];
            match m {
                Mapping::Unallocated => self.read_backing(out, (gc << self.cluster_bits) + in_off),
                Mapping::Zero { .. } => {
                    out.fill(0);
                    Ok(())
                }
                Mapping::Data { host, .. } => self.pread(out, host + in_off),
                Mapping::Compressed => Err(self.compressed_err(gc << self.cluster_bits)),
            }
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_writable(&self.lock(), offset, buf.len() as u64)?;
        self.chunks(offset, buf.len() as u64, |gc, in_off, r| {
            let data = &buf[r];
            let mut st = self.lock();
            let m = self.lookup(&mut st, gc)?;
            if let Mapping::Data { host, copied: true } = m {
                // Mapped clusters never move: write outside the lock.
                drop(st);
                return self.pwrite(data, host + in_off);
            }
            self.check_writable(&st, offset, buf.len() as u64)?;
            self.write_cluster_cow(&mut st, gc, in_off, data, m)
        })
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| DiskError::io(format!("flushing qcow2 image {}", self.name), e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        // Allowed to keep the old data: nothing is deallocated.
        self.check_writable(&self.lock(), offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
        self.check_writable(&self.lock(), offset, len)?;
        let cs = self.cluster_size;
        self.chunks(offset, len, |gc, in_off, r| {
            let n = (r.end - r.start) as u64;
            let mut st = self.lock();
            let m = self.lookup(&mut st, gc)?;
            let guest_off = gc << self.cluster_bits;
            // Does the cluster read as zeroes already?
            let zero_already = match m {
                Mapping::Zero { .. } => true,
                Mapping::Unallocated => match &self.backing {
                    None => true,
                    Some(b) => guest_off >= b.capacity(),
                },
                _ => false,
            };
            if zero_already {
                return Ok(());
            }
            if in_off == 0 && n == cs && self.header.version >= 3 {
                // A whole cluster: set the zero flag, keeping any allocation.
                let entry = match m {
                    Mapping::Unallocated => ZERO,
                    Mapping::Data { host, copied: true } => host | COPIED | ZERO,
                    Mapping::Data { copied: false, .. } => return Err(self.shared_err(guest_off)),
                    Mapping::Compressed => return Err(self.compressed_err(guest_off)),
                    Mapping::Zero { .. } => return Ok(()),
                };
                return self.guarded(&mut st, |me, st| me.set_l2_entry(st, gc, entry));
            }
            let zeros = vec![0u8; n as usize];
            if let Mapping::Data { host, copied: true } = m {
                drop(st);
                return self.pwrite(&zeros, host + in_off);
            }
            self.write_cluster_cow(&mut st, gc, in_off, &zeros, m)
        })
    }

    fn serial(&self) -> String {
        self.serial.clone()
    }

    fn kind(&self) -> &'static str {
        "qcow2"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header in a 64 KiB cluster.
    fn v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, 16);
        put64(&mut b, 24, 64 << 20);
        put32(&mut b, 36, 1);
        put64(&mut b, 40, 3 << 16);
        put64(&mut b, 48, 1 << 16);
        put32(&mut b, 56, 1);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 104);
        b
    }

    #[test]
    fn parses_a_minimal_header() {
        let h = Header::parse(&v3()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 64 << 20);
        assert_eq!(h.backing_file, None);
    }

    #[test]
    fn parses_backing_name_and_format() {
        let mut b = v3();
        // extension: backing format "raw", then end; name at 0x200.
        b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[108..112].copy_from_slice(&3u32.to_be_bytes());
        b[112..115].copy_from_slice(b"raw");
        b[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        b[0x200..0x208].copy_from_slice(b"base.img");
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn refuses_bad_headers() {
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("magic", Box::new(|b| b[0] = 0)),
            ("version", Box::new(|b| b[7] = 4)),
            ("cluster", Box::new(|b| b[23] = 22)),
            ("cluster8", Box::new(|b| b[23] = 8)),
            ("crypt", Box::new(|b| b[35] = 1)),
            ("incompat", Box::new(|b| b[72] = 0x80)),
            ("data file", Box::new(|b| b[79] = 4)),
            ("extl2", Box::new(|b| b[79] = 16)),
            ("refcount order", Box::new(|b| b[99] = 7)),
            ("l1 unaligned", Box::new(|b| b[47] = 8)),
            ("l1 zero", Box::new(|b| b[40..48].fill(0))),
            ("l1 small", Box::new(|b| b[39] = 0)),
            ("l1 huge", Box::new(|b| b[36..40].fill(0xff))),
            ("rt empty", Box::new(|b| b[59] = 0)),
            ("rt huge", Box::new(|b| b[56..60].fill(0xff))),
            ("header length", Box::new(|b| b[103] = 100)),
            (
                "extension overflow",
                Box::new(|b| {
                    b[104..108].copy_from_slice(&1u32.to_be_bytes());
                    b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
                }),
            ),
            (
                "backing name past cluster",
                Box::new(|b| {
                    b[8..16].copy_from_slice(&0xfff0u64.to_be_bytes());
                    b[16..20].copy_from_slice(&100u32.to_be_bytes());
                }),
            ),
            ("size", Box::new(|b| b[24..32].fill(0xff))),
        ];
        for (what, f) in cases {
            let mut b = v3();
            f(&mut b);
            assert!(Header::parse(&b).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn never_panics_on_truncation() {
        let b = v3();
        for n in 0..200 {
            let _ = Header::parse(&b[..n]);
        }
        // No end marker within a short buffer.
        let mut b = v3();
        b[104..112].copy_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0]);
        assert!(Header::parse(&b[..112]).is_err());
    }
}
