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

mod header;
pub use header::*;

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
mod tests;
