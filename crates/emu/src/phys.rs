//! Guest-physical memory as the emulator sees it: host pointers for RAM, and a per-page
//! record of which pages hold decoded code (shared by every core of the VM).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use palacios_vmm::GuestMem;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub const PAGE: u64 = 4096;

/// One backed range of guest-physical memory.
#[derive(Clone, Copy, Debug)]
struct Ram {
    start: u64,
    len: u64,
    host: *mut u8,
    /// Index of the range's first page in the per-page tables.
    first_page: usize,
}

/// Code-page bookkeeping: a version per RAM page, bumped on every write to a page that
/// holds decoded code (decoded blocks remember the versions they were decoded at).
pub struct CodePages {
    version: Vec<AtomicU32>,
    has_code: Vec<AtomicU32>,
    /// Bumped whenever a page newly holds code: cores then drop their write translations.
    epoch: AtomicU64,
    /// Bumped on every write to a page that holds code, and whenever `epoch` is (chained
    /// blocks skip their page checks while it is unchanged).
    writes: AtomicU64,
    /// Every core's acknowledgement of `epoch` (see [`CoreAck`]).
    cores: std::sync::Mutex<Vec<std::sync::Weak<CoreAck>>>,
}

/// How far one core has followed the code-page epoch. A core may hold a write translation of
/// a page from before the page became code; it drops them all when it next looks at the
/// epoch, and says so here. Until every core has, a block decoded from such a page may miss a
/// write made through one of them (see `block.rs`, provisional blocks).
#[derive(Default)]
pub struct CoreAck {
    /// The epoch this core last synchronized its TLB with.
    acked: AtomicU64,
    /// The core is executing guest code. One that is not holds no write in flight and
    /// synchronizes before it executes again, so it counts as up to date.
    running: std::sync::atomic::AtomicBool,
}

impl CoreAck {
    /// The core synchronized with epoch `e`: its TLB has no write translation of a page
    /// that was code at `e`.
    pub fn ack(&self, e: u64) {
        self.acked.store(e, Ordering::SeqCst);
    }
    /// The core starts (true) or stops (false) executing guest code. Starting must come
    /// before the core's first look at the epoch.
    pub fn set_running(&self, on: bool) {
        self.running.store(on, Ordering::SeqCst);
    }
}

impl CodePages {
    fn new(pages: usize) -> Self {
        CodePages {
            version: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            has_code: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            epoch: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            cores: Default::default(),
        }
    }
    /// A new core's acknowledgement record.
    /// (Cores that are gone drop out of the list.)
    pub fn register(&self) -> Arc<CoreAck> {
        let a = Arc::new(CoreAck::default());
        let mut cores = self.cores.lock().unwrap_or_else(|e| e.into_inner());
        cores.retain(|c| c.strong_count() > 0);
        cores.push(Arc::downgrade(&a));
        a
    }
    /// Whether any core besides `me` exists (a single core never needs acknowledgements).
    pub fn shared(&self, me: &Arc<CoreAck>) -> bool {
        let cores = self.cores.lock().unwrap_or_else(|e| e.into_inner());
        cores
            .iter()
            .filter_map(|c| c.upgrade())
            .any(|c| !Arc::ptr_eq(&c, me))
    }
    /// Whether every core besides `me` has dropped the write translations it held before
    /// epoch `e` (or is not executing).
    pub fn all_acked(&self, e: u64, me: &Arc<CoreAck>) -> bool {
        let cores = self.cores.lock().unwrap_or_else(|e| e.into_inner());
        cores.iter().filter_map(|c| c.upgrade()).all(|c| {
            Arc::ptr_eq(&c, me)
                || !c.running.load(Ordering::SeqCst)
                || c.acked.load(Ordering::SeqCst) >= e
        })
    }
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
    pub fn version(&self, page: usize) -> u32 {
        self.version[page].load(Ordering::Acquire)
    }
    pub fn has_code(&self, page: usize) -> bool {
        self.has_code[page].load(Ordering::Relaxed) != 0
    }
    /// A block was decoded from `page`.
    pub fn mark_code(&self, page: usize) {
        if self.has_code[page].swap(1, Ordering::SeqCst) == 0 {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            // Also counted as a write, so that one counter tells translated code (and
            // chained blocks) that anything about code pages changed.
            self.writes.fetch_add(1, Ordering::AcqRel);
        }
    }
    /// Something wrote to `page`: every block decoded from it is stale.
    pub fn written(&self, page: usize) {
        if self.has_code(page) {
            self.version[page].fetch_add(1, Ordering::AcqRel);
            self.writes.fetch_add(1, Ordering::AcqRel);
        }
    }
    /// Make every core drop its write translations (and every chained block re-check):
    /// dirty tracking needs each page's next write to go through a TLB fill.
    pub fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.writes.fetch_add(1, Ordering::AcqRel);
    }
    /// The write counter itself, for translated code.
    pub fn writes_counter(&self) -> &AtomicU64 {
        &self.writes
    }
    /// How many writes to code pages there have been.
    #[inline]
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }
}

/// Guest-physical memory: the RAM ranges of a VM with their host mappings.
#[derive(Clone)]
pub struct PhysMem {
    ram: Arc<[Ram]>,
    pub code: Arc<CodePages>,
    /// The VM's dirty log, once tracking was asked for (shared by every core).
    pub dirty: Arc<std::sync::OnceLock<Arc<palacios_vmm::dirty::DirtyLog>>>,
    /// Keeps the mappings alive as long as any core uses them.
    _mem: GuestMem,
}

// SAFETY: the raw pointers refer to the guest RAM mappings owned by `_mem` (kept alive by
// this struct); every access through them is bounds-checked against the range's length.
// Concurrent access by several vCPUs and devices is inherent to guest memory, as with KVM.
unsafe impl Send for PhysMem {}
// SAFETY: see above; the struct itself holds no interior state besides atomics.
unsafe impl Sync for PhysMem {}

/// Where a physical address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// RAM at this host address; the page index for code bookkeeping.
    Ram(*mut u8, usize),
    /// Nothing backs it: the MMIO bus answers.
    Mmio,
}

impl PhysMem {
    pub fn new(mem: &GuestMem) -> Self {
        let mut ram = Vec::new();
        let mut pages = 0usize;
        for region in mem.iter() {
            let start = region.start_addr().0;
            let len = region.len();
            let host = mem
                .get_host_address(region.start_addr())
                .expect("a region's start address is mapped");
            ram.push(Ram {
                start,
                len,
                host,
                first_page: pages,
            });
            pages += len.div_ceil(PAGE) as usize;
        }
        let code = Arc::new(CodePages::new(pages));
        // Writes by devices and the VMM (through vm-memory) make cached code stale too.
        for (region, r) in mem.iter().zip(ram.iter()) {
            let code = code.clone();
            let first = r.first_page;
            region
                .bitmap()
                .set_hook(Arc::new(move |off: usize, len: usize| {
                    if len == 0 {
                        return;
                    }
                    let (a, b) = (off / PAGE as usize, (off + len - 1) / PAGE as usize);
                    for p in a..=b {
                        code.written(first + p);
                    }
                }));
        }
        PhysMem {
            ram: ram.into(),
            code,
            dirty: Arc::default(),
            _mem: mem.clone(),
        }
    }

    /// The dirty log while tracking is on.
    #[inline]
    pub fn tracking(&self) -> Option<&palacios_vmm::dirty::DirtyLog> {
        self.dirty.get().filter(|l| l.is_enabled()).map(|l| &**l)
    }

    /// Host address of physical `addr` (page granularity: the whole 4 KiB page is backed).
    #[inline]
    pub fn lookup(&self, addr: u64) -> Target {
        for r in self.ram.iter() {
            let off = addr.wrapping_sub(r.start);
            if off < r.len {
                // SAFETY: off < len, so the pointer stays inside the mapping.
                let p = unsafe { r.host.add(off as usize) };
                return Target::Ram(p, r.first_page + (off / PAGE) as usize);
            }
        }
        Target::Mmio
    }

    /// Read `buf.len()` bytes of RAM at `addr`; false if any byte is not RAM.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        for (i, b) in buf.iter_mut().enumerate() {
            match self.lookup(addr.wrapping_add(i as u64)) {
                // SAFETY: lookup returned a pointer inside guest RAM.
                Target::Ram(p, _) => *b = unsafe { p.read_volatile() },
                Target::Mmio => return false,
            }
        }
        true
    }

    /// Read a little-endian u64 of RAM (page-table entries); None if not RAM.
    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }
    pub fn read_u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0; 4];
        self.read(addr, &mut b).then(|| u32::from_le_bytes(b))
    }

    /// Atomically OR `bits` into the naturally aligned u32 at `addr` (A/D bits); false if not RAM.
    pub fn or_u32(&self, addr: u64, bits: u32) -> bool {
        if addr & 3 != 0 {
            return false;
        }
        match self.lookup(addr) {
            Target::Ram(p, page) => {
                // SAFETY: 4-byte aligned and inside one page of guest RAM; guest RAM is shared
                // memory that other threads access concurrently, hence the atomic.
                let a = unsafe { &*(p as *const AtomicU32) };
                if a.load(Ordering::Relaxed) & bits != bits {
                    a.fetch_or(bits, Ordering::AcqRel);
                    self.code.written(page);
                    if let Some(log) = self.tracking() {
                        log.mark_page(page);
                    }
                }
                true
            }
            Target::Mmio => false,
        }
    }
}
