//! Dirty-page tracking: one service for every writer of guest memory, whatever the backend.
//!
//! A [`DirtyLog`] has one bit per 4 KiB page of guest RAM, the regions one after the other in
//! [`GuestMem`] order (page index = the page's position in that concatenation). Writers mark
//! pages while tracking is on:
//! - devices and the VMM, through vm-memory (the regions' [`crate::write_watch::WriteWatch`]);
//! - the emulator, when its software TLB grants a write translation (it grants none without
//!   marking while tracking is on, so a core's later writes through it are covered until the
//!   next [`DirtyLog::take`] drops every write translation again);
//! - KVM, in its own log (slots with dirty logging), merged in by the backend.
//!
//! Migration and ConCORD's content tracking are consumers ("taps"), and may run at once: each
//! has its own rounds ([`crate::VmHandle::dirty_round`] for migration's, a
//! [`crate::control::DirtyTap`] for any other), and a page taken for one consumer is kept
//! pending for every other until that one takes its next round. Tracking is on while any
//! consumer is.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMem;

pub const PAGE: u64 = 4096;

/// One bit per guest page.
pub struct DirtyLog {
    enabled: AtomicBool,
    bits: Vec<AtomicU64>,
    /// (guest-physical start, length, first page index) of each region.
    regions: Vec<(u64, u64, usize)>,
    pages: usize,
    /// The consumers: id → pages taken for another consumer since this one's last round.
    taps: Mutex<Vec<(u64, Vec<u64>)>>,
    next_tap: AtomicU64,
    /// Migration's consumer (the `start/dirty_round/stop` API of the VM handle).
    pub(crate) primary: Mutex<Option<u64>>,
}

impl DirtyLog {
    pub fn new(mem: &GuestMem) -> Self {
        let mut regions = Vec::new();
        let mut pages = 0usize;
        for r in mem.iter() {
            regions.push((r.start_addr().0, r.len(), pages));
            pages += r.len().div_ceil(PAGE) as usize;
        }
        DirtyLog {
            enabled: AtomicBool::new(false),
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            regions,
            pages,
            taps: Mutex::new(Vec::new()),
            next_tap: AtomicU64::new(1),
            primary: Mutex::new(None),
        }
    }

    /// Register a consumer; it sees the pages written from now on. Turns tracking on.
    pub fn add_tap(&self) -> u64 {
        let id = self.next_tap.fetch_add(1, Ordering::Relaxed);
        let words = self.bits.len();
        let mut taps = crate::bus::lock(&self.taps);
        // Marks made so far belong to the consumers already there.
        for (w, bits) in self.bits.iter().enumerate() {
            let raw = bits.swap(0, Ordering::AcqRel);
            if raw != 0 {
                for (_, pending) in taps.iter_mut() {
                    pending[w] |= raw;
                }
            }
        }
        taps.push((id, vec![0; words]));
        self.set_enabled(true);
        id
    }

    /// Drop a consumer; returns whether any consumer is left (if not, tracking is off).
    pub fn remove_tap(&self, id: u64) -> bool {
        let mut taps = crate::bus::lock(&self.taps);
        taps.retain(|t| t.0 != id);
        let left = !taps.is_empty();
        if !left {
            self.set_enabled(false);
        }
        left
    }

    /// Number of consumers.
    pub fn taps(&self) -> usize {
        crate::bus::lock(&self.taps).len()
    }

    /// The pages written since consumer `id`'s previous round (marks taken meanwhile for
    /// other consumers included).
    pub fn take_tap(&self, id: u64) -> DirtySet {
        let mut taps = crate::bus::lock(&self.taps);
        let raw: Vec<u64> = self
            .bits
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        let mut out = raw.clone();
        for (tid, pending) in taps.iter_mut() {
            if *tid == id {
                for (o, p) in out.iter_mut().zip(pending.iter_mut()) {
                    *o |= std::mem::take(p);
                }
            } else {
                for (p, r) in pending.iter_mut().zip(&raw) {
                    *p |= r;
                }
            }
        }
        DirtySet {
            bits: out,
            pages: self.pages,
        }
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Turn tracking on or off (the backends are told by [`crate::VmHandle`]).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// Mark page `index` (the emulator knows page indices).
    #[inline]
    pub fn mark_page(&self, index: usize) {
        if let Some(w) = self.bits.get(index / 64) {
            let bit = 1u64 << (index % 64);
            if w.load(Ordering::Relaxed) & bit == 0 {
                w.fetch_or(bit, Ordering::AcqRel);
            }
        }
    }

    /// Mark the pages of `len` bytes at offset `off` of region `region` (vm-memory writes).
    pub fn mark_region(&self, region: usize, off: u64, len: u64) {
        if len == 0 || !self.is_enabled() {
            return;
        }
        let Some(&(_, rlen, first)) = self.regions.get(region) else {
            return;
        };
        let end = (off + len).min(rlen);
        for p in off / PAGE..end.div_ceil(PAGE) {
            self.mark_page(first + p as usize);
        }
    }

    /// Mark the pages of `[gpa, gpa+len)`.
    pub fn mark(&self, gpa: u64, len: u64) {
        if let Some(i) = self
            .regions
            .iter()
            .position(|r| gpa >= r.0 && gpa < r.0 + r.1)
        {
            self.mark_region(i, gpa - self.regions[i].0, len);
        }
    }

    /// OR a backend's bitmap of region `region` (bit n = the region's page n) in.
    pub fn merge_region(&self, region: usize, bitmap: &[u64]) {
        let Some(&(_, rlen, first)) = self.regions.get(region) else {
            return;
        };
        let pages = rlen.div_ceil(PAGE) as usize;
        for (k, &w) in bitmap.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                let p = k * 64 + b;
                if p < pages {
                    self.mark_page(first + p);
                }
            }
        }
    }

    /// Take the marks (each word swapped with zero: a mark made meanwhile is in this set or
    /// in the next one, never lost).
    /// Consumers registered with [`DirtyLog::add_tap`] keep these marks pending.
    pub fn take(&self) -> DirtySet {
        self.take_tap(0)
    }

    /// Guest-physical address of page `index`.
    pub fn page_gpa(&self, index: usize) -> Option<u64> {
        self.regions
            .iter()
            .rev()
            .find(|r| index >= r.2)
            .map(|r| r.0 + (index - r.2) as u64 * PAGE)
            .filter(|_| index < self.pages)
    }

    /// The regions: (guest-physical start, length, first page index).
    pub fn regions(&self) -> &[(u64, u64, usize)] {
        &self.regions
    }
}

/// The pages written since the previous take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    pub bits: Vec<u64>,
    pub pages: usize,
}

impl DirtySet {
    /// Every page (a full pass).
    pub fn all(pages: usize) -> Self {
        let mut bits = vec![u64::MAX; pages.div_ceil(64)];
        if pages % 64 != 0
            && let Some(last) = bits.last_mut()
        {
            *last = (1u64 << (pages % 64)) - 1;
        }
        DirtySet { bits, pages }
    }

    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn contains(&self, page: usize) -> bool {
        self.bits
            .get(page / 64)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Page indices, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits.iter().enumerate().flat_map(|(k, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(k * 64 + b)
            })
        })
    }

    pub fn union(&mut self, other: &DirtySet) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryMap;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn marks_take_and_page_addresses() {
        let map = MemoryMap::pc((3 << 30) + (64 << 20));
        let mem = map.create_memory().unwrap();
        let log = DirtyLog::new(&mem);
        assert_eq!(log.pages(), ((3u64 << 30) + (64 << 20)) as usize / 4096);
        log.set_enabled(true);
        log.mark(0x5000, 1);
        log.mark(0x7fff, 2); // crosses into 0x8000
        log.mark(1 << 32, 4096);
        let s = log.take();
        let gpas: Vec<u64> = s.iter().map(|p| log.page_gpa(p).unwrap()).collect();
        assert_eq!(gpas, vec![0x5000, 0x7000, 0x8000, 1 << 32]);
        assert_eq!(log.take().count(), 0, "take clears");
        // vm-memory writes reach the log through the write watch.
        crate::write_watch::attach_dirty_log(&mem, std::sync::Arc::new(log));
        let log = crate::write_watch::dirty_log(&mem).unwrap();
        mem.write_obj(7u32, GuestAddress(0x9ffe)).unwrap();
        mem.write_slice(&[1; 3], GuestAddress((1 << 32) + 0x3000))
            .unwrap();
        let gpas: Vec<u64> = log
            .take()
            .iter()
            .map(|p| log.page_gpa(p).unwrap())
            .collect();
        assert_eq!(gpas, vec![0x9000, 0xa000, (1 << 32) + 0x3000]);
        log.set_enabled(false);
        mem.write_obj(7u32, GuestAddress(0x20000)).unwrap();
        assert_eq!(
            log.take().count(),
            0,
            "nothing is marked while tracking is off"
        );
    }

    #[test]
    fn consumers_each_see_every_write() {
        let map = MemoryMap::pc(64 << 20);
        let mem = map.create_memory().unwrap();
        let log = DirtyLog::new(&mem);
        let gpas =
            |s: DirtySet| -> Vec<u64> { s.iter().map(|p| log.page_gpa(p).unwrap()).collect() };
        assert!(!log.is_enabled());
        let a = log.add_tap();
        assert!(log.is_enabled());
        log.mark(0x1000, 1);
        let b = log.add_tap();
        log.mark(0x2000, 1);
        // a sees both; b only what came after it.
        assert_eq!(gpas(log.take_tap(a)), vec![0x1000, 0x2000]);
        log.mark(0x3000, 1);
        assert_eq!(gpas(log.take_tap(b)), vec![0x2000, 0x3000]);
        // What b took stays pending for a.
        assert_eq!(gpas(log.take_tap(a)), vec![0x3000]);
        assert_eq!(log.take_tap(a).count(), 0);
        assert!(log.remove_tap(a), "b is left");
        assert!(log.is_enabled());
        assert!(!log.remove_tap(b));
        assert!(!log.is_enabled(), "no consumer: tracking is off");
    }

    #[test]
    fn dirty_set_helpers() {
        let a = DirtySet::all(70);
        assert_eq!(a.count(), 70);
        assert!(a.contains(69) && !a.contains(70));
        let mut b = DirtySet {
            bits: vec![0b101, 0],
            pages: 70,
        };
        b.union(&DirtySet {
            bits: vec![0, 1],
            pages: 70,
        });
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 2, 64]);
    }
}
