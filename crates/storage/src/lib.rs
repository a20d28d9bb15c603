//! Disk backends for the Palacios-rs block frontends (virtio-blk, IDE).
//!
//! Every backend implements [`BlockBackend`]: byte-addressed, thread-safe reads and writes
//! plus flush, discard and write-zeroes. The backends are
//!
//! - [`file`]: a raw image file or host block device (`pread`/`pwrite`, `fdatasync`,
//!   `fallocate` for discard and write-zeroes), also the scratch disk of [`tmp_disk`];
//! - [`ram`]: an in-memory image;
//! - [`qcow2`]: QEMU's copy-on-write format, versions 2 and 3, with backing files;
//! - [`nbd`]: a client for a Network Block Device server over TCP or a Unix socket.
//!
//! [`open_image`] picks qcow2 or raw by the file's magic.
//!
//! # Why qcow2 is written here
//! The qcow2 crates on crates.io do not fit a synchronous, thread-safe backend: `qcow2-rs`
//! is built on async runtimes and io_uring, and `qcow2` 0.1.2 only reads. The subset needed
//! here (L1/L2 lookup, cluster allocation at the end of the file, refcount updates, backing
//! files) is small, so [`qcow2`] implements it directly, refusing the features it does not
//! implement (compression, encryption, external data files, extended L2 entries, writing
//! to images with internal snapshots) with a clear error instead of guessing.

pub mod file;
pub mod nbd;
pub mod qcow2;
pub mod ram;

use std::path::Path;
use std::sync::Arc;

/// Why a disk request or an open failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A host I/O error; `context` says what was being done to which file or server.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A write, discard or write-zeroes request to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A request that does not lie inside the disk.
    #[error("request at offset {offset} of {len} bytes is beyond the disk's {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    /// A malformed or unsupported image.
    #[error("{0}")]
    Format(String),
    /// An NBD server that broke the protocol (or refused the export).
    #[error("{0}")]
    Protocol(String),
    /// The operation is not supported by this backend or configuration.
    #[error("{0}")]
    Unsupported(String),
}

impl DiskError {
    /// An [`DiskError::Io`] with its context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> DiskError {
        DiskError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A disk backend. Offsets and lengths are in bytes; frontends only issue requests that are
/// 512-byte aligned, but backends must accept any in-range request. Every method may be called
/// from several threads at once (interior locking).
pub trait BlockBackend: Send + Sync {
    /// The size of the disk in bytes.
    fn capacity(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError>;
    fn flush(&self) -> Result<(), DiskError>;
    /// Deallocate (the range may afterwards read as zeroes or as old data).
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// The range must read as zeroes afterwards; `unmap` allows deallocating.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError>;
    /// Up to 20 bytes for virtio-blk's GET_ID (serial), e.g. derived from the path.
    fn serial(&self) -> String;
    /// "file", "ram", "tmp", "qcow2", "nbd" (for logs and `v3 devices`).
    fn kind(&self) -> &'static str;
}

/// Open a raw image file or host block device: read-write (`O_RDWR`) when `writable`, else
/// read-only (`O_RDONLY`, and writes fail with [`DiskError::ReadOnly`]). The capacity is the
/// file's length in bytes (not rounded: frontends round down to their sector size).
pub fn open_file(path: &Path, writable: bool) -> Result<Arc<dyn BlockBackend>, DiskError> {
    Ok(Arc::new(file::FileBackend::open(path, writable)?))
}

/// An in-memory disk holding `data` (its length is the capacity).
pub fn ram_from_bytes(data: Vec<u8>, writable: bool) -> Arc<dyn BlockBackend> {
    Arc::new(ram::RamBackend::new(data, writable))
}

/// A zero-filled scratch disk of `size` bytes: a sparse, already unlinked file in the
/// temporary directory (`$TMPDIR`, else `/tmp`), gone when the backend is dropped.
pub fn tmp_disk(size: u64) -> Result<Arc<dyn BlockBackend>, DiskError> {
    Ok(Arc::new(file::FileBackend::scratch(size)?))
}

/// Open a qcow2 image (and its backing chain, read-only).
pub fn open_qcow2(path: &Path, writable: bool) -> Result<Arc<dyn BlockBackend>, DiskError> {
    Ok(Arc::new(qcow2::Qcow2Backend::open(path, writable)?))
}

/// Connect to an NBD server at `addr` ("host:port" or "unix:/path") and open `export`
/// (the server's default export when `None`).
pub fn connect_nbd(
    addr: &str,
    export: Option<&str>,
    writable: bool,
) -> Result<Arc<dyn BlockBackend>, DiskError> {
    Ok(Arc::new(nbd::NbdBackend::connect(addr, export, writable)?))
}

/// Open an image file: qcow2 if it starts with the qcow2 magic, else raw.
pub fn open_image(path: &Path, writable: bool) -> Result<Arc<dyn BlockBackend>, DiskError> {
    if qcow2::probe(path)? {
        open_qcow2(path, writable)
    } else {
        open_file(path, writable)
    }
}

/// Parse and validate a qcow2 header (with its extensions and backing file name) from the
/// start of an image (at least its first cluster, or the whole file if shorter). Pure: no I/O.
pub fn parse_qcow2_header(bytes: &[u8]) -> Result<qcow2::Header, DiskError> {
    qcow2::Header::parse(bytes)
}

/// Fail with [`DiskError::OutOfRange`] unless `[offset, offset+len)` lies in `capacity`.
pub(crate) fn check_range(offset: u64, len: u64, capacity: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(DiskError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

/// A serial number of at most 20 ASCII bytes: the sanitized `name` (cut to fit) and a hash
/// of `key`, so two disks named alike in different places still differ.
pub(crate) fn make_serial(name: &str, key: &str) -> String {
    // FNV-1a, 32 bits: stable across runs and builds.
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(11)
        .collect();
    if clean.is_empty() {
        format!("{h:08x}")
    } else {
        format!("{clean}-{h:08x}")
    }
}

/// Size of the zero buffer used when zeroes have to be written out.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// Write zeroes over `[offset, offset+len)` with plain writes of at most [`ZERO_CHUNK`].
pub(crate) fn write_zero_data(
    backend: &dyn BlockBackend,
    mut offset: u64,
    len: u64,
) -> Result<(), DiskError> {
    let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64) as usize;
        backend.write_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_fits_and_differs() {
        let a = make_serial("a-very-long-disk-name.img", "/x/a-very-long-disk-name.img");
        let b = make_serial("a-very-long-disk-name.img", "/y/a-very-long-disk-name.img");
        assert!(a.len() <= 20 && b.len() <= 20, "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(make_serial("", "k").len(), 8);
        assert!(make_serial("dïsk ü", "k").is_ascii());
    }

    #[test]
    fn range_checks() {
        assert!(check_range(0, 512, 512).is_ok());
        assert!(check_range(512, 0, 512).is_ok());
        assert!(matches!(
            check_range(1, 512, 512),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX, 2, 512),
            Err(DiskError::OutOfRange { .. })
        ));
    }
}
