//! virtio-balloon (device type 5): the host sets a target number of 4 KiB pages the guest
//! should give back; the guest inflates (hands pages over, which the host frees with
//! MADV_DONTNEED) or deflates, and reports memory statistics on the stats queue.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palacios_vmm::GuestMem;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::device::{QueueCtx, RingError, VirtioDevice};

pub const F_MUST_TELL_HOST: u64 = 1 << 0;
pub const F_STATS_VQ: u64 = 1 << 1;
const PAGE: u64 = 4096;
/// How often the device asks the guest for fresh statistics.
const STATS_PERIOD: Duration = Duration::from_secs(1);

/// The balloon as the control API sees it.
#[derive(Default)]
pub struct BalloonControl {
    /// Pages the host wants the guest to give up.
    pub target_pages: AtomicU32,
    /// Pages the guest says it has given up.
    pub actual_pages: AtomicU32,
    /// Pages freed on the host (inflate) minus pages given back (deflate).
    pub freed_pages: AtomicU32,
    /// The last statistics (tag name, value).
    pub stats: Mutex<Vec<(String, u64)>>,
    /// Set when the target changed: the worker raises a configuration interrupt.
    changed: std::sync::atomic::AtomicBool,
    wake: Mutex<Option<Arc<vmm_sys_util::eventfd::EventFd>>>,
}

impl BalloonControl {
    /// Ask the guest to give up `mib` MiB (0 deflates completely).
    pub fn set_target_mib(&self, mib: u64) {
        self.target_pages.store(
            (mib * 256).min(u64::from(u32::MAX)) as u32,
            Ordering::Release,
        );
        self.changed.store(true, Ordering::Release);
        if let Some(w) = palacios_vmm::bus::lock(&self.wake).as_ref() {
            let _ = w.write(1);
        }
    }

    pub fn report(&self) -> serde_json::Value {
        let stats: serde_json::Map<String, serde_json::Value> =
            palacios_vmm::bus::lock(&self.stats)
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect();
        serde_json::json!({
            "target_mib": f64::from(self.target_pages.load(Ordering::Acquire)) / 256.0,
            "actual_mib": f64::from(self.actual_pages.load(Ordering::Acquire)) / 256.0,
            "stats": stats,
        })
    }
}

fn stat_name(tag: u16) -> String {
    match tag {
        0 => "swap_in".into(),
        1 => "swap_out".into(),
        2 => "major_faults".into(),
        3 => "minor_faults".into(),
        4 => "free_memory".into(),
        5 => "total_memory".into(),
        6 => "available_memory".into(),
        7 => "disk_caches".into(),
        8 => "hugetlb_allocations".into(),
        9 => "hugetlb_failures".into(),
        t => format!("tag_{t}"),
    }
}

pub struct Balloon {
    pub ctl: Arc<BalloonControl>,
    wake: Arc<vmm_sys_util::eventfd::EventFd>,
    /// The stats buffer the guest last gave us (returned to ask for an update).
    stats_head: Option<u16>,
    last_stats: std::time::Instant,
}

impl Balloon {
    pub fn new(initial_mib: u64) -> std::io::Result<Self> {
        let ctl = Arc::new(BalloonControl::default());
        let wake = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
        *palacios_vmm::bus::lock(&ctl.wake) = Some(wake.clone());
        ctl.set_target_mib(initial_mib);
        Ok(Balloon {
            ctl,
            wake,
            stats_head: None,
            last_stats: std::time::Instant::now(),
        })
    }

    /// Inflate (free the pages on the host) or deflate (nothing to do: the pages come back
    /// zero-filled on first touch).
    fn pages(
        &mut self,
        mem: &GuestMem,
        queue: &mut Queue,
        inflate: bool,
    ) -> Result<bool, RingError> {
        let chains: Vec<_> = queue.iter(mem)?.collect();
        let mut any = false;
        for chain in chains {
            let head = chain.head_index();
            for d in chain.clone().filter(|d| !d.is_write_only()) {
                let n = (d.len() / 4).min(4096) as usize;
                let mut pfns = vec![0u8; n * 4];
                if mem.read_slice(&mut pfns, d.addr()).is_err() {
                    continue;
                }
                for p in pfns.chunks_exact(4) {
                    let pfn = u64::from(u32::from_le_bytes(p.try_into().unwrap()));
                    if inflate {
                        if discard(mem, pfn * PAGE) {
                            self.ctl.freed_pages.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        let _ = self.ctl.freed_pages.fetch_update(
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                            |v| Some(v.saturating_sub(1)),
                        );
                    }
                }
            }
            queue.add_used(mem, head, 0)?;
            any = true;
        }
        Ok(any)
    }

    fn stats(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<bool, RingError> {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let mut v = Vec::new();
        for d in chain.filter(|d| !d.is_write_only()) {
            let n = (d.len() as usize / 10).min(64);
            let mut buf = vec![0u8; n * 10];
            if mem.read_slice(&mut buf, d.addr()).is_err() {
                continue;
            }
            for s in buf.chunks_exact(10) {
                let tag = u16::from_le_bytes([s[0], s[1]]);
                let val = u64::from_le_bytes(s[2..10].try_into().unwrap());
                v.push((stat_name(tag), val));
            }
        }
        if !v.is_empty() {
            *palacios_vmm::bus::lock(&self.ctl.stats) = v;
        }
        // Keep the buffer: returning it is how the device asks for the next update.
        if let Some(old) = self.stats_head.replace(head) {
            queue.add_used(mem, old, 0)?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// Give the page at `addr` back to the host.
fn discard(mem: &GuestMem, addr: u64) -> bool {
    let Ok(slice) = mem.get_slice(GuestAddress(addr), PAGE as usize) else {
        return false;
    };
    let ptr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `ptr` is the host mapping of one whole guest page inside a region of guest
    // memory (get_slice checked the range); MADV_DONTNEED only drops its contents, which the
    // guest gave up by inflating the balloon, and leaves the mapping in place.
    unsafe { libc::madvise(ptr.cast(), PAGE as usize, libc::MADV_DONTNEED) == 0 }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u16 {
        5
    }
    fn queue_sizes(&self) -> Vec<u16> {
        vec![128, 128, 1]
    }
    fn features(&self) -> u64 {
        F_STATS_VQ
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[0..4].copy_from_slice(&self.ctl.target_pages.load(Ordering::Acquire).to_le_bytes());
        c[4..8].copy_from_slice(&self.ctl.actual_pages.load(Ordering::Acquire).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4-7) is the driver's.
        let mut c = self.ctl.actual_pages.load(Ordering::Acquire).to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let o = offset as usize + i;
            if (4..8).contains(&o) {
                c[o - 4] = *b;
            }
        }
        self.ctl
            .actual_pages
            .store(u32::from_le_bytes(c), Ordering::Release);
    }
    fn reset(&mut self) {
        self.stats_head = None;
        self.ctl.actual_pages.store(0, Ordering::Release);
    }
    fn activate(&mut self, _features: u64) {
        // A target set before the driver was ready: tell it now.
        self.ctl.changed.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }
    fn process(&mut self, q: QueueCtx<'_>) -> Result<bool, RingError> {
        match q.index {
            0 => self.pages(q.mem, q.queue, true),
            1 => self.pages(q.mem, q.queue, false),
            2 => self.stats(q.mem, q.queue),
            _ => Ok(false),
        }
    }
    fn poll_host(
        &mut self,
        mem: &GuestMem,
        queues: &mut [&mut Queue],
    ) -> Result<Vec<usize>, RingError> {
        let _ = self.wake.read();
        // Ask for fresh statistics now and then by returning the buffer we hold.
        if self.last_stats.elapsed() >= STATS_PERIOD
            && let (Some(head), Some(q)) = (self.stats_head, queues.get_mut(2))
            && q.ready()
        {
            self.last_stats = std::time::Instant::now();
            self.stats_head = None;
            q.add_used(mem, head, 0)?;
            return Ok(vec![2]);
        }
        Ok(Vec::new())
    }
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&*self.wake))
    }
    fn poll_interval(&self) -> Option<Duration> {
        Some(STATS_PERIOD)
    }
    fn take_config_changed(&mut self) -> bool {
        self.ctl.changed.swap(false, Ordering::AcqRel)
    }
    fn save(&self) -> serde_json::Value {
        serde_json::json!({
            "target": self.ctl.target_pages.load(Ordering::Acquire),
            "actual": self.ctl.actual_pages.load(Ordering::Acquire),
        })
    }
    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x.min(u64::from(u32::MAX)) as u32)
        };
        if let (Some(t), Some(a)) = (get("target"), get("actual")) {
            self.ctl.target_pages.store(t, Ordering::Release);
            self.ctl.actual_pages.store(a, Ordering::Release);
        }
        Ok(())
    }
}
