//! The `shared` store: checkpoints of several VMs in one directory, each distinct page stored
//! once. ConCORD's collective checkpoint writes into it; any single VM can use it too
//! (`v3 save VM STORE/NAME.vm --store shared`), and `v3 load STORE/NAME.vm` restores one VM.
//!
//! In the store directory:
//! - `seg-W.pages`: pages appended by writer `W` (one writer per segment; a writer is the
//!   VM whose map is `W.vm`, so two VMs never append to the same file);
//! - `seg-W.idx`: 16-byte records (xxh3 of the page, page number in `seg-W.pages`),
//!   appended after the page itself, so a record always names a page that is there;
//! - `NAME.vm`: one VM's checkpoint: its metadata (whose extents say which pages are not
//!   zero) and a page map (for each non-zero page: a segment and page number, with the page's
//!   hash). Written atomically.
//!
//! A page is deduplicated only after its content was compared with the stored one, so two
//! pages with the same hash but different content are both kept. Loading checks every page's
//! hash against the map (a damaged segment is reported, not restored). `docs/concord.md`
//! describes the layout.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{CRC, FormatError, Header, Meta, PAGE, VERSION};
use crate::store::{CheckpointStore, Opened};
use crate::{CheckpointError, MemorySource, Progress};

/// First bytes of a page map.
pub const MAP_MAGIC: [u8; 8] = *b"PALASHRD";
pub const MAP_VERSION: u32 = 1;
const MAP_HEADER: usize = 64;
const ENTRY: usize = 20;
/// Map flag: the hashes are xxh3-64 of the pages (checked on load).
const FLAG_XXH3: u32 = 1;
const MAX_SEGMENTS: u64 = 1 << 16;

/// The content hash ConCORD and the store use for a 4 KiB page.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Whether `name` can name a writer (it becomes part of file names).
pub fn valid_writer(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CheckpointError {
    let what = what.into();
    move |source| CheckpointError::Io { what, source }
}

fn corrupt(msg: impl Into<String>) -> CheckpointError {
    CheckpointError::Format(FormatError::Corrupt(msg.into()))
}

/// Every stored page of a store directory, by hash.
#[derive(Default)]
pub struct PageIndex {
    segments: Vec<(String, File)>,
    by_hash: HashMap<u64, Vec<(u32, u64)>>,
}

impl PageIndex {
    /// Read the index of every segment in `dir` (records naming pages past the end of
    /// their segment are ignored).
    pub fn load(dir: &Path) -> Result<PageIndex, CheckpointError> {
        let mut ix = PageIndex::default();
        let rd = std::fs::read_dir(dir).map_err(io_err(format!("read {}", dir.display())))?;
        let mut names: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("seg-")?
                    .strip_suffix(".idx")
                    .map(str::to_string)
            })
            .filter(|n| valid_writer(n))
            .collect();
        names.sort();
        for name in names {
            let pages = match File::open(dir.join(format!("seg-{name}.pages"))) {
                Ok(f) => f,
                Err(_) => continue,
            };
            let npages = pages.metadata().map(|m| m.len() / PAGE).unwrap_or(0);
            let idx = std::fs::read(dir.join(format!("seg-{name}.idx")))
                .map_err(io_err(format!("read the index of segment {name}")))?;
            let seg = ix.segments.len() as u32;
            for r in idx.chunks_exact(16) {
                let h = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
                let p = u64::from_le_bytes(r[8..].try_into().unwrap_or_default());
                if p < npages {
                    ix.by_hash.entry(h).or_default().push((seg, p));
                }
            }
            ix.segments.push((name, pages));
        }
        Ok(ix)
    }

    /// The segment and page holding exactly `content`, whose hash is `hash`.
    pub fn find(&self, hash: u64, content: &[u8]) -> io::Result<Option<(u32, u64)>> {
        let Some(cands) = self.by_hash.get(&hash) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; PAGE as usize];
        for &(seg, p) in cands {
            self.segments[seg as usize]
                .1
                .read_exact_at(&mut buf, p * PAGE)?;
            if buf == content {
                return Ok(Some((seg, p)));
            }
        }
        Ok(None)
    }

    /// Whether some page with this hash is stored (without comparing content).
    pub fn has_hash(&self, hash: u64) -> bool {
        self.by_hash.contains_key(&hash)
    }

    fn segment_of(&mut self, name: &str, pages: &File) -> io::Result<u32> {
        if let Some(i) = self.segments.iter().position(|s| s.0 == name) {
            return Ok(i as u32);
        }
        self.segments.push((name.to_string(), pages.try_clone()?));
        Ok(self.segments.len() as u32 - 1)
    }

    fn add(&mut self, hash: u64, seg: u32, page: u64) {
        self.by_hash.entry(hash).or_default().push((seg, page));
    }

    /// Distinct pages stored.
    pub fn pages(&self) -> usize {
        self.by_hash.values().map(Vec::len).sum()
    }
}

/// Appends pages to one writer's segment (locked against a second writer of that name).
pub struct SegmentWriter {
    name: String,
    pages: File,
    idx: File,
    next: u64,
    written: u64,
}

impl SegmentWriter {
    pub fn open(dir: &Path, name: &str) -> Result<SegmentWriter, CheckpointError> {
        if !valid_writer(name) {
            return Err(CheckpointError::Usage(format!(
                "'{name}' cannot name a writer of a shared store (letters, digits, - _ .)"
            )));
        }
        std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        let open = |p: PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(io_err(format!("open {}", p.display())))
        };
        let pages = open(dir.join(format!("seg-{name}.pages")))?;
        let idx = open(dir.join(format!("seg-{name}.idx")))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; it only takes an advisory lock.
        if unsafe { libc::flock(pages.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(CheckpointError::Usage(format!(
                "segment {name} of {} is being written by another process",
                dir.display()
            )));
        }
        // A page without its index record (a writer killed in between) is overwritten.
        let ilen = idx.metadata().map_err(io_err("stat the index"))?.len() / 16;
        idx.set_len(ilen * 16).map_err(io_err("trim the index"))?;
        let plen = pages.metadata().map_err(io_err("stat the segment"))?.len() / PAGE;
        let mut next = 0u64;
        if ilen > 0 {
            let mut r = [0u8; 16];
            idx.read_exact_at(&mut r, (ilen - 1) * 16)
                .map_err(io_err("read the index"))?;
            next = u64::from_le_bytes(r[8..].try_into().unwrap_or_default()) + 1;
        }
        let next = next.min(plen);
        Ok(SegmentWriter {
            name: name.to_string(),
            pages,
            idx,
            next,
            written: 0,
        })
    }

    /// Append `page` (hash `hash`); returns its page number in the segment.
    pub fn append(&mut self, hash: u64, page: &[u8]) -> io::Result<u64> {
        let n = self.next;
        self.pages.write_all_at(page, n * PAGE)?;
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&hash.to_le_bytes());
        r[8..].copy_from_slice(&n.to_le_bytes());
        let ilen = self.idx.metadata()?.len();
        self.idx.write_all_at(&r, ilen)?;
        self.next += 1;
        self.written += 1;
        Ok(n)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pages this writer appended since it was opened.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn sync(&self) -> io::Result<()> {
        self.pages.sync_data()?;
        self.idx.sync_data()
    }
}

/// The `shared` checkpoint store (see the module documentation).
#[derive(Default)]
pub struct SharedStore {
    /// A content hash replacing xxh3 (tests force collisions with it; the map then records
    /// that its hashes cannot be checked on load).
    pub test_hasher: Option<fn(&[u8]) -> u64>,
}

/// What a save into a shared store did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedSave {
    pub pages: u64,
    pub zero: u64,
    /// Pages found in the store already (written by this or another VM).
    pub deduplicated: u64,
    /// Pages this save appended.
    pub appended: u64,
}

/// The writer name and store directory of a map path `DIR/NAME.vm`.
fn split_map_path(path: &Path) -> Result<(PathBuf, String), CheckpointError> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !valid_writer(&name) {
        return Err(CheckpointError::Usage(format!(
            "{}: a shared-store checkpoint is named DIR/NAME.vm, NAME of letters, digits, - _ .",
            path.display()
        )));
    }
    Ok((crate::store::parent_dir(path), name))
}

impl SharedStore {
    /// Save `mem` into the store holding `path`; the page map and report.
    pub fn save_report(
        &self,
        path: &Path,
        mut meta: Meta,
        mem: &dyn MemorySource,
        progress: &mut Progress,
    ) -> Result<(Meta, SharedSave), CheckpointError> {
        let (dir, name) = split_map_path(path)?;
        let mut writer = SegmentWriter::open(&dir, &name)?;
        let mut index = PageIndex::load(&dir)?;
        let own = index
            .segment_of(&name, &writer.pages)
            .map_err(io_err("open the segment"))?;
        let total = meta.memory.image_len();
        let mut entries: Vec<(u32, u64, u64)> = Vec::new();
        let mut extents: Vec<(u64, u64)> = Vec::new();
        let mut rep = SharedSave::default();
        let mut buf = vec![0u8; PAGE as usize];
        let mut image_off = 0u64;
        for &(gpa, len) in &meta.memory.slots.clone() {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(1 << 20);
                let known = mem.known_zero(gpa + done, n);
                for k in 0..n / PAGE {
                    let at = gpa + done + k * PAGE;
                    rep.pages += 1;
                    if known
                        .as_ref()
                        .is_some_and(|z| z.get(k as usize).copied().unwrap_or(false))
                    {
                        rep.zero += 1;
                        continue;
                    }
                    let page: &[u8] = match mem.slice(at, PAGE) {
                        Some(s) => s,
                        None => {
                            mem.read(at, &mut buf)
                                .map_err(io_err(format!("read guest memory at {at:#x}")))?;
                            &buf
                        }
                    };
                    if crate::store::is_zero(page) {
                        rep.zero += 1;
                        continue;
                    }
                    let h = self
                        .test_hasher
                        .map_or_else(|| page_hash(page), |f| f(page));
                    let found = index
                        .find(h, page)
                        .map_err(io_err("read the shared store"))?;
                    let (seg, p) = match found {
                        Some(x) => {
                            rep.deduplicated += 1;
                            x
                        }
                        None => {
                            let p = writer
                                .append(h, page)
                                .map_err(io_err(format!("append to segment {name}")))?;
                            index.add(h, own, p);
                            rep.appended += 1;
                            (own, p)
                        }
                    };
                    entries.push((seg + 1, p, h));
                    let off = image_off + done + k * PAGE;
                    match extents.last_mut() {
                        Some(e) if e.0 + e.1 == off => e.1 += PAGE,
                        _ => extents.push((off, PAGE)),
                    }
                }
                done += n;
                progress(image_off + done, total);
            }
            image_off += len;
        }
        writer.sync().map_err(io_err("fsync the segment"))?;
        meta.memory.extents = extents;
        let names: Vec<&str> = index.segments.iter().map(|s| s.0.as_str()).collect();
        let flags = if self.test_hasher.is_none() {
            FLAG_XXH3
        } else {
            0
        };
        let bytes = encode_map(&meta, &names, &entries, flags);
        write_atomic(path, &bytes)?;
        Ok((meta, rep))
    }
}

impl CheckpointStore for SharedStore {
    fn name(&self) -> &'static str {
        "shared"
    }
    fn help(&self) -> &'static str {
        "DIR/NAME.vm in a directory shared by several checkpoints: each distinct page stored once"
    }
    fn save(
        &self,
        path: &Path,
        meta: Meta,
        mem: &dyn MemorySource,
        progress: &mut Progress,
    ) -> Result<Meta, CheckpointError> {
        self.save_report(path, meta, mem, progress).map(|r| r.0)
    }
    fn open(&self, path: &Path, progress: &mut Progress) -> Result<Opened, CheckpointError> {
        open_map(path, progress)
    }
}

fn encode_map(meta: &Meta, segs: &[&str], entries: &[(u32, u64, u64)], flags: u32) -> Vec<u8> {
    let mb = meta.encode();
    let mut out = vec![0u8; MAP_HEADER];
    out[..8].copy_from_slice(&MAP_MAGIC);
    out[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&flags.to_le_bytes());
    out[16..24].copy_from_slice(&(mb.len() as u64).to_le_bytes());
    out[24..32].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    out[32..40].copy_from_slice(&(segs.len() as u64).to_le_bytes());
    out.extend_from_slice(&mb);
    for s in segs {
        out.extend_from_slice(&(s.len() as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    for &(seg, p, h) in entries {
        out.extend_from_slice(&seg.to_le_bytes());
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
    }
    let crc = CRC.checksum(&out);
    out[40..48].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A decoded page map.
pub struct PageMap {
    pub meta: Meta,
    pub flags: u32,
    pub segments: Vec<String>,
    /// Per non-zero guest page (the pages of the metadata's extents, in order): (segment
    /// + 1, page number in the segment, hash).
    pub entries: Vec<(u32, u64, u64)>,
    pub crc: u64,
}

/// Parse a page map (every length and reference checked; never panics on any input).
pub fn decode_map(b: &[u8]) -> Result<PageMap, FormatError> {
    let bad = |m: &str| FormatError::Corrupt(format!("shared-store page map: {m}"));
    if b.len() < MAP_HEADER || b[..8] != MAP_MAGIC {
        return Err(bad("not a page map (bad magic or too short)"));
    }
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    let version = u32at(8);
    if version != MAP_VERSION {
        return Err(bad(&format!(
            "version {version} (this build reads {MAP_VERSION})"
        )));
    }
    let flags = u32at(12);
    let (meta_len, npages, nsegs, crc) = (u64at(16), u64at(24), u64at(32), u64at(40));
    let mut z = b.to_vec();
    z[40..48].fill(0);
    if CRC.checksum(&z) != crc {
        return Err(bad("CRC mismatch (the file is damaged)"));
    }
    if nsegs > MAX_SEGMENTS || meta_len > crate::format::MAX_META {
        return Err(bad("impossible sizes"));
    }
    let mut at = MAP_HEADER;
    let meta_end = at
        .checked_add(meta_len as usize)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| bad("truncated metadata"))?;
    let meta = Meta::decode(&b[at..meta_end])?;
    at = meta_end;
    let mut segments = Vec::new();
    for _ in 0..nsegs {
        let l = b
            .get(at..at + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
            .ok_or_else(|| bad("truncated segment table"))?;
        let s = b
            .get(at + 2..at + 2 + l)
            .ok_or_else(|| bad("truncated segment table"))?;
        let s = String::from_utf8(s.to_vec()).map_err(|_| bad("segment name is not UTF-8"))?;
        if !valid_writer(&s) {
            return Err(bad("invalid segment name"));
        }
        segments.push(s);
        at += 2 + l;
    }
    let need = (npages as usize)
        .checked_mul(ENTRY)
        .and_then(|n| n.checked_add(at))
        .ok_or_else(|| bad("impossible page count"))?;
    if need != b.len() {
        return Err(bad("page table length does not match the page count"));
    }
    meta.memory.check()?;
    let in_extents: u64 = meta.memory.extents.iter().map(|e| e.1 / PAGE).sum();
    if npages != in_extents {
        return Err(bad("page count does not match the memory layout's extents"));
    }
    let mut entries = Vec::with_capacity(npages as usize);
    for e in b[at..].chunks_exact(ENTRY) {
        let seg = u32::from_le_bytes(e[..4].try_into().unwrap_or_default());
        let p = u64::from_le_bytes(e[4..12].try_into().unwrap_or_default());
        let h = u64::from_le_bytes(e[12..20].try_into().unwrap_or_default());
        if seg == 0 || seg as usize > segments.len() {
            return Err(bad("a page names a segment that is not in the table"));
        }
        entries.push((seg, p, h));
    }
    Ok(PageMap {
        meta,
        flags,
        segments,
        entries,
        crc,
    })
}

/// Whether `path` holds a shared-store page map.
pub fn is_map(path: &Path) -> bool {
    let mut m = [0u8; 8];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut m, 0))
        .is_ok()
        && m == MAP_MAGIC
}

/// Open one VM's checkpoint from a shared store: its memory image is assembled in an
/// anonymous memory file (zero pages left as holes), every page checked against its hash.
pub fn open_map(path: &Path, progress: &mut Progress) -> Result<Opened, CheckpointError> {
    let b = std::fs::read(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CheckpointError::Usage(format!("no checkpoint at {}", path.display()))
        } else {
            CheckpointError::Io {
                what: format!("read {}", path.display()),
                source: e,
            }
        }
    })?;
    let map = decode_map(&b)?;
    let (dir, _) = split_map_path(path)?;
    let mut segs = Vec::new();
    for s in &map.segments {
        let p = dir.join(format!("seg-{s}.pages"));
        let f = File::open(&p)
            .map_err(|e| corrupt(format!("segment {s} of the store is missing: {e}")))?;
        let len = f.metadata().map(|m| m.len() / PAGE).unwrap_or(0);
        segs.push((f, len));
    }
    let mem_len = map.meta.memory.image_len();
    let image = memfd("palacios-shared-checkpoint").map_err(io_err("create a memory file"))?;
    image
        .set_len(mem_len)
        .map_err(io_err("size the memory file"))?;
    let mut buf = vec![0u8; PAGE as usize];
    let total = map.entries.len() as u64;
    let offsets = map
        .meta
        .memory
        .extents
        .iter()
        .flat_map(|&(o, n)| (0..n / PAGE).map(move |k| o + k * PAGE));
    for (i, (&(seg, p, h), off)) in map.entries.iter().zip(offsets).enumerate() {
        let (f, len) = &segs[seg as usize - 1];
        if p >= *len {
            return Err(corrupt(format!(
                "the page at {off:#x} is in segment {} past its end (the store is incomplete)",
                map.segments[seg as usize - 1]
            )));
        }
        f.read_exact_at(&mut buf, p * PAGE)
            .map_err(io_err("read the shared store"))?;
        if map.flags & FLAG_XXH3 != 0 && page_hash(&buf) != h {
            return Err(corrupt(format!(
                "the page at {off:#x} (segment {}, page {p}) does not match its hash: the store is damaged",
                map.segments[seg as usize - 1]
            )));
        }
        image
            .write_all_at(&buf, off)
            .map_err(io_err("fill the memory file"))?;
        if i % 4096 == 0 {
            progress(i as u64 * PAGE, total * PAGE);
        }
    }
    let meta_len = map.meta.encode().len() as u64;
    Ok(Opened {
        header: Header {
            version: VERSION,
            flags: 0,
            meta_offset: 0,
            meta_len,
            mem_offset: 0,
            mem_len,
            crc: map.crc,
        },
        meta: map.meta,
        memory: image,
        mem_offset: 0,
        path: path.to_path_buf(),
    })
}

fn memfd(name: &str) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: memfd_create with a valid NUL-terminated name; on success the descriptor is
    // new and owned by nobody else, so the File takes ownership of it.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Write `bytes` at `path` atomically (a temporary name in the same directory, fsynced, then
/// renamed over it), as the other stores do.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use crate::store::{fsync_dir, parent_dir, temp_name};
    let tmp = temp_name(path);
    let r = (|| {
        let f = File::create(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
        f.write_all_at(bytes, 0)
            .map_err(io_err(format!("write {}", tmp.display())))?;
        f.sync_all()
            .map_err(io_err(format!("fsync {}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(io_err(format!("rename to {}", path.display())))?;
        fsync_dir(&parent_dir(path))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Bytes a store directory takes on disk (allocated blocks), and its distinct pages.
pub fn store_usage(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    for e in std::fs::read_dir(dir)?.flatten() {
        let m = e.metadata()?;
        if m.is_file() {
            n += m.blocks() * 512;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{MemoryLayout, Meta};

    struct Mem(Vec<u8>);
    impl MemorySource for Mem {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
            let g = gpa as usize;
            buf.copy_from_slice(&self.0[g..g + buf.len()]);
            Ok(())
        }
    }

    fn meta(len: u64) -> Meta {
        Meta {
            created_unix: 1,
            writer: "test".into(),
            backend: "emu".into(),
            config: serde_json::json!({}),
            cpuid: vec![],
            memory: MemoryLayout {
                slots: vec![(0, len)],
                extents: vec![],
            },
            sections: vec![],
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shared-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Page `i` of VM `vm`: pages below 8 are the same in every VM, 8..12 private, the rest zero.
    fn mem(vm: u8) -> Mem {
        let mut m = vec![0u8; 16 * 4096];
        for i in 0..12usize {
            let fill = if i < 8 {
                i as u8 + 1
            } else {
                0x40 + vm * 16 + i as u8
            };
            m[i * 4096..(i + 1) * 4096].fill(fill);
        }
        Mem(m)
    }

    fn image(o: &Opened) -> Vec<u8> {
        let mut b = vec![0u8; o.header.mem_len as usize];
        o.memory.read_exact_at(&mut b, o.mem_offset).unwrap();
        b
    }

    #[test]
    fn pages_are_stored_once_and_each_vm_restores() {
        let d = tmp("dedup");
        let st = SharedStore::default();
        let (_, a) = st
            .save_report(&d.join("a.vm"), meta(16 * 4096), &mem(0), &mut |_, _| {})
            .unwrap();
        let (_, b) = st
            .save_report(&d.join("b.vm"), meta(16 * 4096), &mem(1), &mut |_, _| {})
            .unwrap();
        assert_eq!((a.appended, a.deduplicated, a.zero), (12, 0, 4));
        assert_eq!((b.appended, b.deduplicated, b.zero), (4, 8, 4));
        assert_eq!(PageIndex::load(&d).unwrap().pages(), 16);
        for (n, vm) in [("a.vm", 0), ("b.vm", 1)] {
            let o = crate::store::open(&d.join(n), &mut |_, _| {}).unwrap();
            assert_eq!(image(&o), mem(vm).0, "{n}");
            assert_eq!(o.meta.memory.extents, vec![(0, 12 * 4096)]);
        }
    }

    #[test]
    fn colliding_hashes_are_told_apart_by_content() {
        let d = tmp("collide");
        let st = SharedStore {
            test_hasher: Some(|_| 42),
        };
        st.save_report(&d.join("a.vm"), meta(16 * 4096), &mem(0), &mut |_, _| {})
            .unwrap();
        let (_, b) = st
            .save_report(&d.join("b.vm"), meta(16 * 4096), &mem(1), &mut |_, _| {})
            .unwrap();
        // Every page has hash 42, yet only equal content is shared.
        assert_eq!((b.appended, b.deduplicated), (4, 8));
        let o = open_map(&d.join("b.vm"), &mut |_, _| {}).unwrap();
        assert_eq!(image(&o), mem(1).0);
    }

    #[test]
    fn damage_is_reported() {
        let d = tmp("damage");
        let st = SharedStore::default();
        st.save_report(&d.join("a.vm"), meta(16 * 4096), &mem(0), &mut |_, _| {})
            .unwrap();
        let map = std::fs::read(d.join("a.vm")).unwrap();
        // A truncated or flipped map.
        for bad in [map[..map.len() - 3].to_vec(), {
            let mut m = map.clone();
            m[100] ^= 1;
            m
        }] {
            std::fs::write(d.join("c.vm"), &bad).unwrap();
            let e = open_map(&d.join("c.vm"), &mut |_, _| {}).err().unwrap();
            assert!(e.to_string().contains("page map"), "{e}");
        }
        // A damaged page in the segment.
        let seg = d.join("seg-a.pages");
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0xee], 5 * 4096 + 7).unwrap();
        let e = open_map(&d.join("a.vm"), &mut |_, _| {}).err().unwrap();
        assert!(e.to_string().contains("does not match its hash"), "{e}");
        // A missing segment.
        std::fs::remove_file(&seg).unwrap();
        let e = open_map(&d.join("a.vm"), &mut |_, _| {}).err().unwrap();
        assert!(e.to_string().contains("missing"), "{e}");
        // Arbitrary bytes never panic.
        let mut x = 7u64;
        for len in [0usize, 10, 64, 65, 300, map.len()] {
            let b: Vec<u8> = (0..len)
                .map(|i| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if i < 8 { MAP_MAGIC[i] } else { (x >> 33) as u8 }
                })
                .collect();
            assert!(decode_map(&b).is_err());
        }
    }
}
