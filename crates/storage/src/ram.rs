//! An in-memory disk: a `Vec<u8>` behind a `RwLock`.

use crate::{BlockBackend, DiskError, check_range};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A disk held in memory; its capacity is the length of the initial data.
#[derive(Debug)]
pub struct RamBackend {
    data: RwLock<Vec<u8>>,
    read_only: bool,
    serial: String,
}

impl RamBackend {
    pub fn new(data: Vec<u8>, writable: bool) -> RamBackend {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        RamBackend {
            data: RwLock::new(data),
            read_only: !writable,
            serial: format!("ram-{}-{n}", std::process::id()),
        }
    }

    /// A copy of the whole disk.
    pub fn contents(&self) -> Vec<u8> {
        self.read().clone()
    }

    // A panic while holding the lock cannot leave the bytes inconsistent with any invariant
    // (there is none beyond the length, which never changes), so a poisoned lock is used.
    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The in-range byte range of a write request, after the read-only check.
    fn write_range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.capacity())?;
        // In range of a Vec's length, so both fit in usize.
        Ok(offset as usize..(offset + len) as usize)
    }
}

impl BlockBackend for RamBackend {
    fn capacity(&self) -> u64 {
        self.read().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let data = self.read();
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let r = self.write_range(offset, buf.len() as u64)?;
        self.write()[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let r = self.write_range(offset, len)?;
        self.write()[r].fill(0);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
        let r = self.write_range(offset, len)?;
        self.write()[r].fill(0);
        Ok(())
    }

    fn serial(&self) -> String {
        self.serial.clone()
    }

    fn kind(&self) -> &'static str {
        "ram"
    }
}
