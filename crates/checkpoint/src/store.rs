//! Checkpoint stores, registered by name as in Palacios: `file` (one file) and `dir` (a
//! directory with a `state` file and a `memory` image). Both write atomically: everything
//! goes to a temporary name, is fsynced, then renamed over the old checkpoint, so a crash or
//! `kill -9` during a save leaves the previous checkpoint loadable.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{
    CRC, FLAG_SEPARATE_MEMORY, FormatError, HEADER_LEN, Header, Meta, PAGE, VERSION,
};
use crate::{CheckpointError, MemorySource, Progress};

/// A place checkpoints are written to and read from.
pub trait CheckpointStore: Send + Sync {
    /// The store's name (`--store NAME`).
    fn name(&self) -> &'static str;
    fn help(&self) -> &'static str;
    /// Write a checkpoint of `meta` (its memory layout's extents are filled in here) and the
    /// guest memory `mem` atomically at `path`.
    fn save(
        &self,
        path: &Path,
        meta: Meta,
        mem: &dyn MemorySource,
        progress: &mut Progress,
    ) -> Result<Meta, CheckpointError>;
    /// Open and verify (CRC) a checkpoint.
    fn open(&self, path: &Path, progress: &mut Progress) -> Result<Opened, CheckpointError>;
}

/// A verified checkpoint: its metadata and where its memory image is.
pub struct Opened {
    pub header: Header,
    pub meta: Meta,
    /// The file holding the memory image, and the image's offset in it.
    pub memory: File,
    pub mem_offset: u64,
    /// Where it came from.
    pub path: PathBuf,
}

/// Every store this build has.
pub fn stores() -> Vec<Box<dyn CheckpointStore>> {
    vec![
        Box::new(FileStore),
        Box::new(DirStore),
        Box::new(crate::shared::SharedStore::default()),
    ]
}

/// The store named `name`.
pub fn store(name: &str) -> Result<Box<dyn CheckpointStore>, CheckpointError> {
    stores()
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| {
            CheckpointError::Usage(format!(
                "unknown checkpoint store '{name}' (known: {})",
                stores()
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Open a checkpoint with the store its path implies (a directory: `dir`; else `file`).
pub fn open(path: &Path, progress: &mut Progress) -> Result<Opened, CheckpointError> {
    if path.is_dir() {
        DirStore.open(path, progress)
    } else if crate::shared::is_map(path) {
        crate::shared::open_map(path, progress)
    } else {
        FileStore.open(path, progress)
    }
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> CheckpointError {
    move |source| CheckpointError::Io { what, source }
}

/// A temporary name next to `path` (same directory, so the rename is atomic).
pub(crate) fn temp_name(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    remove_stale_temps(path, &name);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Remove temporary files of earlier saves to `path` whose process is gone (killed mid-save).
fn remove_stale_temps(path: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(dir) = std::fs::read_dir(parent_dir(path)) else {
        return;
    };
    for e in dir.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync {}", dir.display())))
}

/// Write the memory image into `file` at `base`: only non-zero pages are written (the rest
/// stays a hole); returns the extents and feeds the data to `digest` in order.
fn write_memory(
    file: &File,
    base: u64,
    meta: &mut Meta,
    mem: &dyn MemorySource,
    digest: &mut crc::Digest<'_, u64, crc::Table<16>>,
    progress: &mut Progress,
) -> Result<(), CheckpointError> {
    const CHUNK: usize = 1 << 20;
    let total = meta.memory.image_len();
    file.set_len(base + total)
        .map_err(io_err("size the checkpoint file".into()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut image_off = 0u64;
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let page = PAGE as usize;
    for &(gpa, len) in &meta.memory.slots {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let skip = mem.known_zero(gpa + done, n as u64);
            if skip.as_ref().is_some_and(|z| z.iter().all(|&z| z)) {
                done += n as u64;
                progress(image_off + done, total);
                continue;
            }
            let chunk: &[u8] = match mem.slice(gpa + done, n as u64) {
                Some(s) => s,
                None => {
                    mem.read(gpa + done, &mut buf[..n])
                        .map_err(io_err(format!("read guest memory at {:#x}", gpa + done)))?;
                    &buf[..n]
                }
            };
            let zero = |p: usize| {
                skip.as_ref()
                    .is_some_and(|z| z.get(p / page).copied().unwrap_or(false))
                    || is_zero(&chunk[p..p + page])
            };
            // Runs of non-zero pages in this chunk.
            let mut p = 0usize;
            while p < n {
                if zero(p) {
                    p += page;
                    continue;
                }
                let start = p;
                while p < n && !zero(p) {
                    p += page;
                }
                let data = &chunk[start..p];
                let off = image_off + done + start as u64;
                file.write_all_at(data, base + off)
                    .map_err(io_err("write guest memory".into()))?;
                digest.update(data);
                match extents.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += data.len() as u64,
                    _ => extents.push((off, data.len() as u64)),
                }
            }
            done += n as u64;
            progress(image_off + done, total);
        }
        image_off += len;
    }
    meta.memory.extents = extents;
    Ok(())
}

/// Whether a page is all zero (OR-folded in 64-byte blocks, which the compiler vectorizes).
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    for b in &mut blocks {
        let mut acc = 0u64;
        for w in b.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().unwrap_or_default());
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Random-access bytes: a file, or a checkpoint in memory (tests, fuzzing).
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// The ranges of `[start, end)` that may hold data (for a sparse file, everything but its
    /// holes); by default all of it.
    fn data_ranges(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        vec![(start, end)]
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.metadata().map(|m| m.len())
    }
    fn data_ranges(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let fd = self.as_raw_fd();
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            // SAFETY: lseek on an open descriptor; SEEK_DATA/SEEK_HOLE only move the offset,
            // which nothing else here relies on (all reads are positional).
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after `at`
                }
                // No SEEK_DATA here: assume everything may hold data.
                return vec![(at, end)];
            }
            let data = data as u64;
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            out.push((data, hole));
            at = hole.max(data + 1);
        }
        out
    }
}

impl ReadAt for &[u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= <[u8]>::len(self))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

/// Feed the memory extents to `digest`, reading them from `mem` at `base`.
fn digest_memory(
    mem: &dyn ReadAt,
    base: u64,
    meta: &Meta,
    digest: &mut crc::Digest<'_, u64, crc::Table<16>>,
    progress: &mut Progress,
) -> Result<(), CheckpointError> {
    let total: u64 = meta.memory.extents.iter().map(|e| e.1).sum();
    let mut buf = vec![0u8; total.clamp(1, 4 << 20) as usize];
    let mut seen = 0u64;
    for &(off, len) in &meta.memory.extents {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            mem.read_exact_at(&mut buf[..n], base + off + done)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        CheckpointError::Format(FormatError::Truncated {
                            what: "the memory image".into(),
                            need: base + off + len,
                            have: mem.len().unwrap_or(0),
                        })
                    } else {
                        CheckpointError::Io {
                            what: "read the memory image".into(),
                            source: e,
                        }
                    }
                })?;
            digest.update(&buf[..n]);
            done += n as u64;
            seen += n as u64;
            progress(seen, total);
        }
    }
    Ok(())
}

/// Read and check the header and metadata of the state part `state`, whose memory image is
/// in `memory` (`None`: in `state` itself), then verify the CRC over everything. Nothing
/// outside this function trusts a byte of the checkpoint before it returns Ok.
pub fn verify(
    state: &dyn ReadAt,
    memory: Option<&dyn ReadAt>,
    progress: &mut Progress,
) -> Result<(Header, Meta), CheckpointError> {
    let len = state.len().map_err(io_err("stat the checkpoint".into()))?;
    let mut hb = vec![0u8; HEADER_LEN.min(len as usize)];
    state
        .read_exact_at(&mut hb, 0)
        .map_err(io_err("read the checkpoint header".into()))?;
    let header = Header::decode(&hb, len)?;
    let separate = header.flags & FLAG_SEPARATE_MEMORY != 0;
    if separate != memory.is_some() {
        return Err(CheckpointError::Format(FormatError::Corrupt(if separate {
            "the header says the memory image is in a separate file, but there is none".into()
        } else {
            "a directory checkpoint whose state file holds the memory image".into()
        })));
    }
    let mut mb = vec![0u8; header.meta_len as usize];
    state
        .read_exact_at(&mut mb, header.meta_offset)
        .map_err(io_err("read the checkpoint metadata".into()))?;
    let meta = Meta::decode(&mb)?;
    if meta.memory.image_len() != header.mem_len {
        return Err(CheckpointError::Format(FormatError::Corrupt(format!(
            "the header's memory image ({:#x} bytes) and the metadata's layout ({:#x}) differ",
            header.mem_len,
            meta.memory.image_len()
        ))));
    }
    let mem: &dyn ReadAt = memory.unwrap_or(state);
    let mem_len = mem.len().map_err(io_err("stat the memory image".into()))?;
    let mem_end = header.mem_offset.saturating_add(header.mem_len);
    if mem_len < mem_end {
        return Err(CheckpointError::Format(FormatError::Truncated {
            what: "the memory image".into(),
            need: mem_end,
            have: mem_len,
        }));
    }
    let mut digest = CRC.digest();
    digest_memory(mem, header.mem_offset, &meta, &mut digest, progress)?;
    digest.update(&mb);
    // The header as it is in the file (reserved bytes included), CRC field zeroed.
    let mut hz = hb.clone();
    hz[48..56].fill(0);
    digest.update(&hz);
    let found = digest.finalize();
    if found != header.crc {
        return Err(CheckpointError::Format(FormatError::Crc {
            expected: header.crc,
            found,
        }));
    }
    check_holes(mem, header.mem_offset, &meta)?;
    Ok((header, meta))
}

/// The CRC covers the extents; everything else of the image must read as zero. On a sparse
/// file only the data the file system holds outside the extents is read (nothing, normally).
fn check_holes(mem: &dyn ReadAt, base: u64, meta: &Meta) -> Result<(), CheckpointError> {
    let end = base + meta.memory.image_len();
    let mut buf = vec![0u8; meta.memory.image_len().clamp(1, 1 << 20) as usize];
    for (a, b) in mem.data_ranges(base, end) {
        // Parts of [a, b) not covered by an extent.
        let mut at = a;
        for &(o, n) in &meta.memory.extents {
            let (eo, ee) = (base + o, base + o + n);
            if ee <= at {
                continue;
            }
            if eo >= b {
                break;
            }
            check_zero(mem, at, eo.min(b), &mut buf)?;
            at = at.max(ee);
        }
        check_zero(mem, at, b, &mut buf)?;
    }
    Ok(())
}

fn check_zero(mem: &dyn ReadAt, mut a: u64, b: u64, buf: &mut [u8]) -> Result<(), CheckpointError> {
    while a < b {
        let n = ((b - a) as usize).min(buf.len());
        mem.read_exact_at(&mut buf[..n], a)
            .map_err(io_err("read the memory image".into()))?;
        if buf[..n].iter().any(|&x| x != 0) {
            return Err(CheckpointError::Format(FormatError::Corrupt(format!(
                "the memory image holds data at {a:#x}+{n:#x} that no extent records"
            ))));
        }
        a += n as u64;
    }
    Ok(())
}

fn open_parts(
    path: &Path,
    state: File,
    memory: Option<File>,
    progress: &mut Progress,
) -> Result<Opened, CheckpointError> {
    let (header, meta) = verify(&state, memory.as_ref().map(|m| m as &dyn ReadAt), progress)
        .map_err(|e| match e {
            CheckpointError::Io { what, source } => CheckpointError::Io {
                what: format!("{}: {what}", path.display()),
                source,
            },
            other => other,
        })?;
    Ok(Opened {
        header,
        meta,
        memory: memory.unwrap_or(state),
        mem_offset: header.mem_offset,
        path: path.to_path_buf(),
    })
}

/// One file: header, memory image (page aligned, sparse), metadata.
pub struct FileStore;

impl CheckpointStore for FileStore {
    fn name(&self) -> &'static str {
        "file"
    }
    fn help(&self) -> &'static str {
        "one file: header, sparse memory image, metadata"
    }

    fn save(
        &self,
        path: &Path,
        mut meta: Meta,
        mem: &dyn MemorySource,
        progress: &mut Progress,
    ) -> Result<Meta, CheckpointError> {
        if path.is_dir() {
            return Err(CheckpointError::Usage(format!(
                "{} is a directory: use the 'dir' store for it, or name a file",
                path.display()
            )));
        }
        let tmp = temp_name(path);
        let r = (|| {
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err(format!("create {}", tmp.display())))?;
            let mut digest = CRC.digest();
            let mem_offset = PAGE;
            write_memory(&file, mem_offset, &mut meta, mem, &mut digest, progress)?;
            let mb = meta.encode();
            digest.update(&mb);
            let mut header = Header {
                version: VERSION,
                flags: 0,
                meta_offset: mem_offset + meta.memory.image_len(),
                meta_len: mb.len() as u64,
                mem_offset,
                mem_len: meta.memory.image_len(),
                crc: 0,
            };
            digest.update(&header.encode(false));
            header.crc = digest.finalize();
            file.write_all_at(&mb, header.meta_offset)
                .map_err(io_err("write the metadata".into()))?;
            file.write_all_at(&header.encode(true), 0)
                .map_err(io_err("write the header".into()))?;
            file.sync_all()
                .map_err(io_err(format!("fsync {}", tmp.display())))?;
            drop(file);
            std::fs::rename(&tmp, path).map_err(io_err(format!(
                "rename {} to {}",
                tmp.display(),
                path.display()
            )))?;
            fsync_dir(&parent_dir(path))
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map(|()| meta)
    }

    fn open(&self, path: &Path, progress: &mut Progress) -> Result<Opened, CheckpointError> {
        let f = File::open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                CheckpointError::Usage(format!("no checkpoint at {}", path.display()))
            } else {
                CheckpointError::Io {
                    what: format!("open {}", path.display()),
                    source: e,
                }
            }
        })?;
        open_parts(path, f, None, progress)
    }
}

/// A directory: `state` (header and metadata) and `memory` (the sparse image).
pub struct DirStore;

impl CheckpointStore for DirStore {
    fn name(&self) -> &'static str {
        "dir"
    }
    fn help(&self) -> &'static str {
        "a directory with a 'state' file and a sparse 'memory' image"
    }

    fn save(
        &self,
        path: &Path,
        mut meta: Meta,
        mem: &dyn MemorySource,
        progress: &mut Progress,
    ) -> Result<Meta, CheckpointError> {
        if path.exists() && !path.is_dir() {
            return Err(CheckpointError::Usage(format!(
                "{} exists and is not a directory",
                path.display()
            )));
        }
        if path.is_dir() {
            // Only a checkpoint directory is replaced: never a directory with other things.
            let names: Vec<String> = std::fs::read_dir(path)
                .map_err(io_err(format!("read {}", path.display())))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let is_checkpoint =
                !names.is_empty() && names.iter().all(|n| n == "state" || n == "memory");
            if !names.is_empty() && !is_checkpoint {
                return Err(CheckpointError::Usage(format!(
                    "{} is a directory that is not a checkpoint (it holds {}): refusing to replace it",
                    path.display(),
                    names.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let tmp = temp_name(path);
        let _ = std::fs::remove_dir_all(&tmp);
        let r = (|| {
            std::fs::create_dir(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
            let memf = OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .open(tmp.join("memory"))
                .map_err(io_err("create the memory image".into()))?;
            let mut digest = CRC.digest();
            write_memory(&memf, 0, &mut meta, mem, &mut digest, progress)?;
            memf.sync_all()
                .map_err(io_err("fsync the memory image".into()))?;
            let mb = meta.encode();
            digest.update(&mb);
            let mut header = Header {
                version: VERSION,
                flags: FLAG_SEPARATE_MEMORY,
                meta_offset: HEADER_LEN as u64,
                meta_len: mb.len() as u64,
                mem_offset: 0,
                mem_len: meta.memory.image_len(),
                crc: 0,
            };
            digest.update(&header.encode(false));
            header.crc = digest.finalize();
            let mut state =
                File::create(tmp.join("state")).map_err(io_err("create the state file".into()))?;
            state
                .write_all(&header.encode(true))
                .and_then(|()| state.write_all(&mb))
                .and_then(|()| state.sync_all())
                .map_err(io_err("write the state file".into()))?;
            fsync_dir(&tmp)?;
            if path.is_dir() {
                exchange(&tmp, path)?;
                // `tmp` now holds the previous checkpoint.
                let _ = std::fs::remove_dir_all(&tmp);
            } else {
                std::fs::rename(&tmp, path).map_err(io_err(format!(
                    "rename {} to {}",
                    tmp.display(),
                    path.display()
                )))?;
            }
            fsync_dir(&parent_dir(path))
        })();
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r.map(|()| meta)
    }

    fn open(&self, path: &Path, progress: &mut Progress) -> Result<Opened, CheckpointError> {
        let open = |name: &str| {
            File::open(path.join(name)).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    CheckpointError::Usage(format!(
                        "{} is not a checkpoint directory (no '{name}' in it)",
                        path.display()
                    ))
                } else {
                    CheckpointError::Io {
                        what: format!("open {}", path.join(name).display()),
                        source: e,
                    }
                }
            })
        };
        let state = open("state")?;
        let memory = open("memory")?;
        open_parts(path, state, Some(memory), progress)
    }
}

/// Swap two directory entries atomically (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> Result<(), CheckpointError> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())
        .map_err(|_| CheckpointError::Usage("a path contains a NUL byte".into()))?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())
        .map_err(|_| CheckpointError::Usage("a path contains a NUL byte".into()))?;
    // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        return Err(CheckpointError::Io {
            what: format!("exchange {} and {}", a.display(), b.display()),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
