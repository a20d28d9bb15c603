//! Raw image files and host block devices, and the unlinked scratch file of
//! [`crate::tmp_disk`].
//!
//! Reads and writes are `pread`/`pwrite` ([`FileExt`]), so no lock is needed; flush is
//! `fdatasync`; discard punches a hole and write-zeroes zeroes a range with `fallocate`,
//! falling back to writing zeroes where the file system or device cannot.

use crate::{BlockBackend, DiskError, check_range, make_serial, write_zero_data};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A raw disk on a host file or block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// For error messages: the path, or "scratch disk".
    name: String,
    capacity: u64,
    read_only: bool,
    /// Holes can be punched (a regular file); block devices zero by other means.
    regular: bool,
    kind: &'static str,
    serial: String,
}

impl FileBackend {
    /// Open `path` (a regular file or a block device), read-write if `writable`.
    pub fn open(path: &Path, writable: bool) -> Result<FileBackend, DiskError> {
        let name = path.display().to_string();
        let mode = if writable { "read-write" } else { "read-only" };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| DiskError::io(format!("opening disk image {name} ({mode})"), e))?;
        let meta = file
            .metadata()
            .map_err(|e| DiskError::io(format!("reading the metadata of {name}"), e))?;
        let ft = meta.file_type();
        let (capacity, regular) = if ft.is_file() {
            (meta.len(), true)
        } else if ft.is_block_device() {
            let len = (&file).seek(SeekFrom::End(0)).map_err(|e| {
                DiskError::io(format!("finding the size of block device {name}"), e)
            })?;
            (len, false)
        } else {
            return Err(DiskError::Unsupported(format!(
                "{name} is neither a regular file nor a block device"
            )));
        };
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        tracing::debug!(path = %name, capacity, writable, "opened raw disk");
        Ok(FileBackend {
            file,
            serial: make_serial(&base, &key),
            name,
            capacity,
            read_only: !writable,
            regular,
            kind: "file",
        })
    }

    /// A zero-filled, sparse scratch disk of `size` bytes in an unlinked temporary file.
    pub fn scratch(size: u64) -> Result<FileBackend, DiskError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir();
        // O_TMPFILE: never has a name. Some file systems lack it: then create and unlink.
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir)
        {
            Ok(f) => f,
            Err(_) => {
                let path = dir.join(format!(".palacios-scratch-{}-{n}", std::process::id()));
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| {
                        DiskError::io(format!("creating a scratch disk {}", path.display()), e)
                    })?;
                std::fs::remove_file(&path).map_err(|e| {
                    DiskError::io(format!("unlinking the scratch disk {}", path.display()), e)
                })?;
                f
            }
        };
        file.set_len(size).map_err(|e| {
            DiskError::io(
                format!("sizing a scratch disk in {} to {size} bytes", dir.display()),
                e,
            )
        })?;
        Ok(FileBackend {
            file,
            name: "scratch disk".into(),
            capacity: size,
            read_only: false,
            regular: true,
            kind: "tmp",
            serial: format!("tmp-{}-{n}", std::process::id()),
        })
    }

    /// `fallocate(mode)` over the range; `Ok(false)` when the file system or device does
    /// not support that mode (the caller falls back), `Err` on a real error.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<bool, DiskError> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(false);
        };
        loop {
            // SAFETY: fallocate only takes integers and the fd, which `self.file` owns and
            // keeps open for the duration of the call; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if r == 0 {
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV) => {
                    return Ok(false);
                }
                _ => {
                    return Err(DiskError::io(
                        format!("fallocate on {} at {offset}+{len}", self.name),
                        e,
                    ));
                }
            }
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.capacity)
    }
}

impl BlockBackend for FileBackend {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.capacity)?;
        self.file.read_exact_at(buf, offset).map_err(|e| {
            DiskError::io(
                format!("reading {} bytes at {offset} from {}", buf.len(), self.name),
                e,
            )
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_write(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(|e| {
            DiskError::io(
                format!("writing {} bytes at {offset} to {}", buf.len(), self.name),
                e,
            )
        })
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| DiskError::io(format!("flushing {}", self.name), e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(punch, offset, len)? {
            return Ok(());
        }
        write_zero_data(self, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // A punched hole of a regular file reads as zeroes.
        if unmap
            && self.regular
            && self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )?
        {
            return Ok(());
        }
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(zero, offset, len)? {
            return Ok(());
        }
        write_zero_data(self, offset, len)
    }

    fn serial(&self) -> String {
        self.serial.clone()
    }

    fn kind(&self) -> &'static str {
        self.kind
    }
}
