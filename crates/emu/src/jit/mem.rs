//! Executable memory for translated blocks: one mapping per core, filled front to back and
//! emptied all at once. Pages are writable only while code is copied into them (W^X).

use std::ptr::NonNull;

/// Bytes of address space reserved per core (pages are only backed once code is written).
pub const ARENA_BYTES: usize = 64 << 20;
const PAGE: usize = 4096;

pub struct Arena {
    base: NonNull<u8>,
    size: usize,
    used: usize,
}

// SAFETY: the arena is owned by one core's block cache and used by one thread at a time.
unsafe impl Send for Arena {}

impl Arena {
    /// Reserve the mapping; None if the host refuses.
    pub fn new() -> Option<Arena> {
        // SAFETY: an anonymous private mapping at an address the kernel picks; no existing
        // memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Arena {
            base: NonNull::new(p.cast())?,
            size: ARENA_BYTES,
            used: 0,
        })
    }

    /// Where the next piece of code will start (code is assembled for this address).
    pub fn next_addr(&self) -> u64 {
        self.base.as_ptr() as u64 + self.used.next_multiple_of(16) as u64
    }

    /// Copy `code`, assembled for [`Arena::next_addr`], into the arena and make it
    /// executable. None when the arena is full or the host refuses the protection change.
    pub fn install(&mut self, code: &[u8]) -> Option<*const u8> {
        let start = self.used.next_multiple_of(16);
        let end = start.checked_add(code.len())?;
        if end > self.size {
            return None;
        }
        let lo = start / PAGE * PAGE;
        let hi = end.next_multiple_of(PAGE).min(self.size);
        // SAFETY: [lo, hi) lies inside the mapping; no code in those pages runs while they
        // are writable (this core is compiling, not executing).
        unsafe {
            let p = self.base.as_ptr().add(lo).cast();
            if libc::mprotect(p, hi - lo, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return None;
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.as_ptr().add(start), code.len());
            if libc::mprotect(p, hi - lo, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                return None;
            }
        }
        self.used = end;
        Some(self.base.as_ptr().wrapping_add(start))
    }

    /// Forget all code (the blocks that pointed at it are gone).
    pub fn reset(&mut self) {
        self.used = 0;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this size; no code runs from it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
    }
}
