//! Notification of writes to guest RAM made through vm-memory (by devices, loaders and the
//! VMM), for a backend that caches something derived from guest memory: the emulator drops
//! decoded code when the page it came from is written by a device's DMA.
//!
//! It plugs into vm-memory as the regions' dirty-bitmap type: every write vm-memory performs
//! calls `mark_dirty`, which forwards to the hook the backend installed (nothing by default).

use std::fmt;
use std::sync::{Arc, OnceLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};

/// Called with (offset in the region, length) of every write.
pub type WriteHook = Arc<dyn Fn(usize, usize) + Send + Sync>;

#[derive(Default)]
struct Shared {
    hook: OnceLock<WriteHook>,
    /// The VM's dirty log and this region's index in it.
    dirty: OnceLock<(Arc<crate::dirty::DirtyLog>, usize)>,
}

/// The per-region write watch.
#[derive(Clone, Default)]
pub struct WriteWatch {
    shared: Arc<Shared>,
    base: usize,
}

impl fmt::Debug for WriteWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteWatch")
            .field("base", &self.base)
            .field("hooked", &self.shared.hook.get().is_some())
            .finish()
    }
}

impl WriteWatch {
    /// Install the region's hook (once; later calls are ignored and return false).
    pub fn set_hook(&self, hook: WriteHook) -> bool {
        self.shared.hook.set(hook).is_ok()
    }
}

impl<'a> WithBitmapSlice<'a> for WriteWatch {
    type S = WriteWatch;
}

impl BitmapSlice for WriteWatch {}

impl Bitmap for WriteWatch {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(h) = self.shared.hook.get() {
            h(self.base + offset, len);
        }
        if let Some((log, region)) = self.shared.dirty.get() {
            log.mark_region(*region, (self.base + offset) as u64, len as u64);
        }
    }
    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }
    fn slice_at(&self, offset: usize) -> Self {
        WriteWatch {
            shared: self.shared.clone(),
            base: self.base + offset,
        }
    }
}

/// Connect the VM's dirty log to every region of `mem` (once; later calls are ignored), so
/// writes through vm-memory are marked while tracking is on.
pub fn attach_dirty_log(mem: &crate::memory::GuestMem, log: Arc<crate::dirty::DirtyLog>) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for (i, r) in mem.iter().enumerate() {
        let _ = r.bitmap().shared.dirty.set((log.clone(), i));
    }
}

/// The dirty log attached to `mem`, if any.
pub fn dirty_log(mem: &crate::memory::GuestMem) -> Option<Arc<crate::dirty::DirtyLog>> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .next()
        .and_then(|r| r.bitmap().shared.dirty.get().map(|d| d.0.clone()))
}

impl NewBitmap for WriteWatch {
    fn with_len(_len: usize) -> Self {
        WriteWatch::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use crate::memory::MemoryMap;

    #[test]
    fn writes_through_vm_memory_reach_the_hook() {
        let mem = MemoryMap::pc(16 << 20).create_memory().unwrap();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let region = mem.iter().next().unwrap();
        assert!(
            region
                .bitmap()
                .set_hook(std::sync::Arc::new(move |off, len| {
                    s.lock().unwrap().push((off, len));
                }))
        );
        mem.write_obj(0x1234_5678u32, GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x9000)).unwrap();
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        let seen = seen.lock().unwrap();
        assert!(seen.contains(&(0x5000, 4)), "{seen:?}");
        assert!(seen.contains(&(0x9000, 3)), "{seen:?}");
        assert_eq!(seen.len(), 2, "reads are not reported: {seen:?}");
    }
}
