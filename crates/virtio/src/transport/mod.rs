//! virtio over PCI (virtio 1.2, section 4.1): a transitional function with the modern
//! capabilities in a 64-bit memory BAR and the legacy register block in an I/O BAR, MSI-X,
//! and a worker thread per device that serves the queues off the vCPU threads.
//!
//! BAR 4 (memory, 32 KiB): 0x0000 common configuration, 0x1000 ISR, 0x2000 device
//! configuration, 0x3000 notifications (4 bytes per queue), 0x4000 MSI-X table, 0x6000 PBA.
//! BAR 0 (I/O, 256 bytes): the legacy interface (virtio 0.9.5), for drivers like Palacios'
//! own that predate virtio 1.0.
//!
//! Guest-supplied ring addresses and descriptors are untrusted: a ring outside guest memory
//! or a descriptor chain the queue library refuses puts the device in NEEDS_RESET (with a
//! configuration interrupt) and the queue is not touched again until the driver resets the
//! device. The VMM never panics on them.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use palacios_pci::config::{BarKind, BarSpec, CAP_MSIX, CAP_VENDOR, ConfigSpace};
use palacios_pci::msix::MsixTable;
use palacios_pci::{BarMapping, PciDevice};
use palacios_vmm::GuestMem;
use palacios_vmm::bus::lock;
use palacios_vmm::irq::{IrqLine, MsiController, MsiRouter};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::device::*;

mod legacy;
mod state;

pub use state::TransportState;

pub const VENDOR: u16 = 0x1af4;
pub const NO_VECTOR: u16 = 0xffff;
const MODERN_BAR: usize = 4;
const LEGACY_BAR: usize = 0;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULT: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
const MODERN_SIZE: u64 = 0x8000;
const LEGACY_SIZE: u64 = 0x100;

/// State shared by the function (vCPU side) and its worker.
pub struct Shared {
    pub mem: GuestMem,
    pub device: Mutex<Box<dyn VirtioDevice>>,
    pub queues: Vec<Mutex<Queue>>,
    vectors: Mutex<Vectors>,
    pub msix: Mutex<MsixTable>,
    /// The plain MSI message while the guest has MSI (not MSI-X) enabled.
    msi_message: Mutex<Option<palacios_vmm::irq::MsiMessage>>,
    msi: Arc<MsiRouter>,
    intx: Mutex<Option<Arc<dyn IrqLine>>>,
    isr: AtomicU8,
    status: AtomicU8,
    features: Mutex<u64>,
    activated: AtomicBool,
    notify: Vec<EventFd>,
    stop: EventFd,
    /// Set while the VM is paused: the worker finishes its batch and waits.
    paused: Mutex<bool>,
    pause_cv: Condvar,
    busy: Mutex<()>,
    name: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct Vectors {
    config: u16,
    queues: Vec<u16>,
}

impl Shared {
    fn msix_enabled(&self) -> bool {
        lock(&self.msix).enabled
    }

    /// Tell the driver queue `q` has used buffers.
    pub fn signal_queue(&self, q: usize) {
        let v = lock(&self.vectors)
            .queues
            .get(q)
            .copied()
            .unwrap_or(NO_VECTOR);
        self.signal(v, 1);
    }

    /// Tell the driver the configuration changed.
    pub fn signal_config(&self) {
        let v = lock(&self.vectors).config;
        self.signal(v, 2);
    }

    fn signal(&self, vector: u16, isr_bit: u8) {
        let mut msix = lock(&self.msix);
        tracing::trace!(
            "{}: signal vector {vector} (MSI-X enabled {}, masked {})",
            self.name,
            msix.enabled,
            msix.function_mask
        );
        if msix.enabled {
            if vector != NO_VECTOR {
                msix.notify(vector, self.msi.as_ref());
            }
            return;
        }
        drop(msix);
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        // Plain MSI: one message for everything; the driver reads the ISR as with INTx.
        if let Some(m) = *lock(&self.msi_message) {
            self.msi.send_msi(m);
            return;
        }
        if let Some(l) = lock(&self.intx).as_ref() {
            l.set_level(true);
        }
    }

    fn read_isr(&self) -> u8 {
        let v = self.isr.swap(0, Ordering::AcqRel);
        if let Some(l) = lock(&self.intx).as_ref() {
            l.set_level(false);
        }
        v
    }

    fn needs_reset(&self, why: &str) {
        let old = self.status.fetch_or(S_NEEDS_RESET, Ordering::AcqRel);
        if old & S_NEEDS_RESET == 0 {
            tracing::warn!(
                "{}: the driver broke the virtqueue contract: {why}; device needs reset",
                self.name
            );
            self.signal_config();
        }
    }

    fn reset(&self) {
        self.activated.store(false, Ordering::Release);
        // Wait for a batch in progress.
        let _b = lock(&self.busy);
        lock(&self.device).reset();
        for q in &self.queues {
            lock(q).reset();
        }
        let mut v = lock(&self.vectors);
        v.config = NO_VECTOR;
        v.queues.iter_mut().for_each(|x| *x = NO_VECTOR);
        *lock(&self.features) = 0;
        self.isr.store(0, Ordering::Release);
        if let Some(l) = lock(&self.intx).as_ref() {
            l.set_level(false);
        }
        self.status.store(0, Ordering::Release);
    }

    /// Serve queue `q` (worker thread).
    fn serve(&self, q: usize) {
        tracing::trace!(
            "{}: queue {q} notified (activated {}, status {:#x})",
            self.name,
            self.activated.load(Ordering::Acquire),
            self.status.load(Ordering::Acquire)
        );
        if !self.activated.load(Ordering::Acquire)
            || self.status.load(Ordering::Acquire) & S_NEEDS_RESET != 0
        {
            return;
        }
        let mut dev = lock(&self.device);
        let mut queue = lock(&self.queues[q]);
        if !queue.ready() {
            return;
        }
        // With EVENT_IDX the device publishes avail_event after each batch (enable_notification)
        // and serves again if the driver added more meanwhile.
        // A receive queue keeps buffers it has no data for, so "more available" alone does
        // not mean more work: after a pass that used nothing, one more pass is enough.
        let mut any = false;
        let mut idle_passes = 0;
        let r = loop {
            let used = match dev.process(QueueCtx {
                mem: &self.mem,
                index: q,
                queue: &mut queue,
            }) {
                Ok(used) => used,
                Err(e) => break Err(e),
            };
            any |= used;
            if !queue.event_idx_enabled() {
                break Ok(any);
            }
            if !used {
                idle_passes += 1;
            }
            match queue.enable_notification(&self.mem) {
                Ok(true) if idle_passes < 2 => continue,
                Ok(_) => break Ok(any),
                Err(e) => break Err(e.into()),
            }
        };
        let notify = match r {
            Ok(true) => queue.needs_notification(&self.mem).unwrap_or(true),
            Ok(false) => false,
            Err(e) => {
                drop(queue);
                drop(dev);
                self.needs_reset(&e.0);
                return;
            }
        };
        let cfg = dev.take_config_changed();
        drop(queue);
        drop(dev);
        if notify {
            self.signal_queue(q);
        }
        if cfg {
            self.signal_config();
        }
    }

    fn serve_host(&self) {
        if !self.activated.load(Ordering::Acquire)
            || self.status.load(Ordering::Acquire) & S_NEEDS_RESET != 0
        {
            return;
        }
        let mut dev = lock(&self.device);
        let mut guards: Vec<_> = self.queues.iter().map(|q| lock(q)).collect();
        let mut notify = Vec::new();
        // With EVENT_IDX, publish avail_event after serving; go again if buffers arrived
        // meanwhile (a frame may be waiting for them).
        for _ in 0..4 {
            let mut qs: Vec<&mut Queue> = guards.iter_mut().map(|g| &mut **g).collect();
            let r = dev.poll_host(&self.mem, &mut qs);
            drop(qs);
            let progressed = matches!(&r, Ok(u) if !u.is_empty());
            match r {
                Ok(used) => {
                    for i in used {
                        if let Some(g) = guards.get_mut(i)
                            && g.needs_notification(&self.mem).unwrap_or(true)
                            && !notify.contains(&i)
                        {
                            notify.push(i);
                        }
                    }
                }
                Err(e) => {
                    drop(guards);
                    drop(dev);
                    self.needs_reset(&e.0);
                    return;
                }
            }
            let mut again = false;
            for g in guards.iter_mut() {
                if g.ready()
                    && g.event_idx_enabled()
                    && g.enable_notification(&self.mem).unwrap_or(false)
                {
                    again = true;
                }
            }
            // Buffers that are merely available are no reason to go again; new data is.
            if !again || !progressed {
                break;
            }
        }
        let cfg = dev.take_config_changed();
        drop(guards);
        drop(dev);
        for i in notify {
            self.signal_queue(i);
        }
        if cfg {
            self.signal_config();
        }
    }

    fn wait_unpaused(&self) {
        let mut p = lock(&self.paused);
        while *p {
            p = self.pause_cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Pause (true) or resume a device's worker; pausing waits for the batch in progress, so no
/// request is in flight while the VM is paused.
pub fn set_paused(sh: &Shared, paused: bool) {
    *lock(&sh.paused) = paused;
    sh.pause_cv.notify_all();
    if paused {
        drop(lock(&sh.busy));
    }
}

/// The worker: waits on the queue notifications (eventfds written by the vCPU or, on KVM,
/// by the kernel through ioeventfd) and on the device's host fd.
fn worker(sh: Arc<Shared>) {
    loop {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(sh.notify.len() + 2);
        fds.push(libc::pollfd {
            fd: sh.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for e in &sh.notify {
            fds.push(libc::pollfd {
                fd: e.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let (host_fd, interval) = {
            let d = lock(&sh.device);
            (
                if sh.activated.load(Ordering::Acquire) {
                    d.host_fd()
                } else {
                    None
                },
                d.poll_interval(),
            )
        };
        if let Some(fd) = host_fd {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = interval.map_or(200, |d| d.as_millis().clamp(1, 200) as i32);
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        if fds[0].revents != 0 {
            return;
        }
        sh.wait_unpaused();
        let _busy = lock(&sh.busy);
        for (i, e) in sh.notify.iter().enumerate() {
            if fds[i + 1].revents != 0 {
                let _ = e.read();
                sh.serve(i);
            }
        }
        if host_fd.is_some() || interval.is_some() {
            sh.serve_host();
        }
    }
}

/// The PCI function.
pub struct VirtioPci {
    cfg: ConfigSpace,
    pub shared: Arc<Shared>,
    msix_cap: usize,
    msi_cap: palacios_pci::msi::MsiCap,
    /// VIRTIO_PCI_CAP_PCI_CFG: its offset (the data window is at +16).
    pci_cfg_cap: usize,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    legacy_pfn: Vec<u32>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// Where the notify region is now.
    pub notify_at: Option<u64>,
    /// The backend's ioeventfd (KVM): notifications then never leave the kernel.
    io_events: Option<Arc<dyn palacios_vmm::backend::IoEvents>>,
    registered: Vec<u64>,
}

impl VirtioPci {
    /// A transitional function for `device`. `msi` is the VM's MSI router.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        msi: Arc<MsiRouter>,
    ) -> std::io::Result<Self> {
        let ty = device.device_type();
        let sizes = device.queue_sizes();
        let nq = sizes.len();
        // Transitional IDs 0x1000-0x103f carry the type in the subsystem ID.
        let legacy_id = match ty {
            1 => 0x1000,
            2 => 0x1001,
            5 => 0x1002,
            3 => 0x1003,
            4 => 0x1005,
            _ => 0x1040 + ty,
        };
        let class = match ty {
            1 => (0x02, 0x00, 0x00),
            2 => (0x01, 0x00, 0x00),
            3 => (0x07, 0x80, 0x00),
            _ => (0xff, 0x00, 0x00),
        };
        let mut cfg = ConfigSpace::new(VENDOR, legacy_id, class, 0);
        cfg.set_subsystem(VENDOR, ty);
        cfg.set_interrupt_pin(1);
        cfg.add_bar(
            LEGACY_BAR,
            BarSpec {
                size: LEGACY_SIZE,
                kind: BarKind::Io,
                prefetchable: false,
            },
        );
        cfg.add_bar(
            MODERN_BAR,
            BarSpec {
                size: MODERN_SIZE,
                kind: BarKind::Mem64,
                prefetchable: false,
            },
        );
        let vcap = |ty: u8, off: u64, len: u64, extra: Option<u32>| {
            let mut b = vec![
                if extra.is_some() { 20 } else { 16 },
                ty,
                MODERN_BAR as u8,
                0,
                0,
                0,
            ];
            b.extend_from_slice(&(off as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            if let Some(x) = extra {
                b.extend_from_slice(&x.to_le_bytes());
            }
            b
        };
        cfg.add_capability(CAP_VENDOR, &vcap(1, COMMON, 0x40, None), &[]);
        cfg.add_capability(
            CAP_VENDOR,
            &vcap(
                2,
                NOTIFY,
                u64::from(NOTIFY_MULT) * nq as u64,
                Some(NOTIFY_MULT),
            ),
            &[],
        );
        cfg.add_capability(CAP_VENDOR, &vcap(3, ISR, 1, None), &[]);
        cfg.add_capability(CAP_VENDOR, &vcap(4, DEVICE_CFG, 0x1000, None), &[]);
        let msix = MsixTable::new(nq as u16 + 1);
        let (body, mask) = msix.capability(MODERN_BAR as u8, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = cfg.add_capability(CAP_MSIX, &body, &mask);
        let msi_cap = palacios_pci::msi::MsiCap::add(&mut cfg);
        // VIRTIO_PCI_CAP_PCI_CFG: bar (byte 4), offset (8), length (12) are the driver's;
        // pci_cfg_data (16) is a window onto that BAR location.
        let mut pci_body = vcap(5, 0, 0, None);
        pci_body[2] = 0;
        pci_body.extend_from_slice(&[0; 4]);
        pci_body[0] = 20;
        let mut pci_mask = vec![0u8; pci_body.len()];
        pci_mask[2] = 0xff;
        pci_mask[6..14].fill(0xff);
        let pci_cfg_cap = cfg.add_capability(CAP_VENDOR, &pci_body, &pci_mask);
        let mut queues = Vec::with_capacity(nq);
        for s in &sizes {
            queues.push(Mutex::new(Queue::new(*s).map_err(|e| {
                std::io::Error::other(format!("virtqueue of size {s}: {e}"))
            })?));
        }
        let notify = (0..nq)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            mem,
            device: Mutex::new(device),
            queues,
            vectors: Mutex::new(Vectors {
                config: NO_VECTOR,
                queues: vec![NO_VECTOR; nq],
            }),
            msix: Mutex::new(msix),
            msi_message: Mutex::new(None),
            msi,
            intx: Mutex::new(None),
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            features: Mutex::new(0),
            activated: AtomicBool::new(false),
            notify,
            stop: EventFd::new(libc::EFD_NONBLOCK)?,
            paused: Mutex::new(false),
            pause_cv: Condvar::new(),
            busy: Mutex::new(()),
            name: name.to_string(),
        });
        let sh = shared.clone();
        let worker = std::thread::Builder::new()
            .name(format!("virtio-{name}"))
            .spawn(move || worker(sh))?;
        Ok(VirtioPci {
            cfg,
            shared,
            msix_cap,
            msi_cap,
            pci_cfg_cap,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            legacy_pfn: vec![0; nq],
            worker: Some(worker),
            notify_at: None,
            io_events: None,
            registered: Vec::new(),
        })
    }

    /// Use the backend's ioeventfd for queue notifications (registered whenever the BAR maps).
    pub fn set_io_events(&mut self, ev: Arc<dyn palacios_vmm::backend::IoEvents>) {
        self.io_events = Some(ev);
    }

    fn update_io_events(&mut self) {
        let Some(ev) = self.io_events.clone() else {
            return;
        };
        let sh = self.shared.clone();
        for (q, addr) in std::mem::take(&mut self.registered).into_iter().enumerate() {
            if let Err(e) = ev.unregister(addr, false, &sh.notify[q]) {
                tracing::debug!("{}: ioeventfd at {addr:#x} not removed: {e}", sh.name);
            }
        }
        let Some(base) = self.notify_at else {
            return;
        };
        for (q, fd) in sh.notify.iter().enumerate() {
            let addr = base + q as u64 * u64::from(NOTIFY_MULT);
            match ev.register(addr, false, fd) {
                Ok(()) => self.registered.push(addr),
                Err(e) => {
                    // Without it the write exits to the VMM, which signals the same eventfd.
                    tracing::debug!("{}: no ioeventfd at {addr:#x}: {e}", sh.name);
                    break;
                }
            }
        }
    }

    /// An access through VIRTIO_PCI_CAP_PCI_CFG's data window: `length` bytes (1, 2 or 4) at
    /// `offset` in BAR `bar`, as the capability's fields say. Anything else reads zero.
    fn pci_cfg_access(&mut self, at: usize, read: Option<&mut [u8]>, write: Option<&[u8]>) {
        let c = self.pci_cfg_cap;
        let bar = self.cfg.bytes()[c + 4] as usize;
        let off = u64::from(self.cfg.u32_at(c + 8));
        let len = self.cfg.u32_at(c + 12) as usize;
        let ok = matches!(len, 1 | 2 | 4) && at == 0 && (bar == MODERN_BAR || bar == LEGACY_BAR);
        match (read, write) {
            (Some(d), _) => {
                d.fill(0);
                if ok && d.len() >= len {
                    self.bar_read(bar, off, &mut d[..len]);
                }
            }
            (None, Some(d)) if ok && d.len() >= len => {
                self.bar_write(bar, off, &d[..len]);
            }
            _ => {}
        }
    }

    /// Connect the INTx line (used while MSI-X is off).
    pub fn set_intx(&self, line: Arc<dyn IrqLine>) {
        *lock(&self.shared.intx) = Some(line);
    }

    /// The eventfd the worker waits on for queue `q` (for ioeventfd).
    pub fn notify_fd(&self, q: usize) -> Option<&EventFd> {
        self.shared.notify.get(q)
    }

    fn device_features(&self) -> u64 {
        lock(&self.shared.device).features() | F_VERSION_1 | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC
    }

    fn sel_queue(&self) -> Option<&Mutex<Queue>> {
        self.shared.queues.get(self.queue_select as usize)
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let sh = self.shared.clone();
        let qs = self.queue_select as usize;
        let v: u64 = match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device_features() & 0xffff_ffff,
                1 => self.device_features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => *lock(&sh.features) & 0xffff_ffff,
                1 => *lock(&sh.features) >> 32,
                _ => 0,
            },
            0x10 => u64::from(lock(&sh.vectors).config),
            0x12 => sh.queues.len() as u64,
            0x14 => u64::from(sh.status.load(Ordering::Acquire)),
            0x15 => 0,
            0x16 => u64::from(self.queue_select),
            0x18 => self.sel_queue().map_or(0, |q| u64::from(lock(q).size())),
            0x1a => lock(&sh.vectors)
                .queues
                .get(qs)
                .map_or(NO_VECTOR, |v| *v)
                .into(),
            0x1c => self.sel_queue().map_or(0, |q| u64::from(lock(q).ready())),
            0x1e => qs as u64,
            0x20 | 0x24 => {
                self.sel_queue().map_or(0, |q| lock(q).desc_table()) >> ((off - 0x20) * 8)
            }
            0x28 | 0x2c => {
                self.sel_queue().map_or(0, |q| lock(q).avail_ring()) >> ((off - 0x28) * 8)
            }
            0x30 | 0x34 => {
                self.sel_queue().map_or(0, |q| lock(q).used_ring()) >> ((off - 0x30) * 8)
            }
            0x38 => qs as u64,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let sh = self.shared.clone();
        let live = sh.status.load(Ordering::Acquire) & S_DRIVER_OK != 0;
        match off {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c
                // Features are fixed once FEATURES_OK is set.
                if sh.status.load(Ordering::Acquire) & S_FEATURES_OK == 0 => {
                    let mut f = lock(&sh.features);
                    match self.driver_feature_select {
                        0 => *f = (*f & !0xffff_ffff) | (v & 0xffff_ffff),
                        1 => *f = (*f & 0xffff_ffff) | ((v & 0xffff_ffff) << 32),
                        _ => {}
                    }
                }
            0x10 => lock(&sh.vectors).config = self.valid_vector(v as u16),
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 if !live => {
                if let Some(q) = self.sel_queue() {
                    let size = v as u16;
                    // A size that is not a power of two or exceeds the maximum is ignored
                    // (the queue keeps its previous size).
                    let mut q = lock(q);
                    if size.is_power_of_two() && size <= q.max_size() {
                        q.set_size(size);
                    }
                }
            }
            0x1a => {
                let vec = self.valid_vector(v as u16);
                if let Some(x) = lock(&sh.vectors).queues.get_mut(self.queue_select as usize) {
                    *x = vec;
                }
            }
            0x1c => {
                if let Some(q) = self.sel_queue() {
                    // Writing 0 is not allowed by the spec; only enabling is honoured.
                    if v & 1 == 1 {
                        lock(q).set_ready(true);
                    }
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if !live => {
                if let Some(q) = self.sel_queue() {
                    let mut q = lock(q);
                    let (lo, hi) = if off.is_multiple_of(8) {
                        (
                            Some(v as u32),
                            if n == 8 { Some((v >> 32) as u32) } else { None },
                        )
                    } else {
                        (None, Some(v as u32))
                    };
                    match off & !7 {
                        0x20 => q.set_desc_table_address(lo, hi),
                        0x28 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }

    /// A vector the table has, else NO_VECTOR (what the driver reads back to see it failed).
    fn valid_vector(&self, v: u16) -> u16 {
        if (v as usize) < lock(&self.shared.msix).len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, v: u8) {
        let sh = self.shared.clone();
        if v == 0 {
            sh.reset();
            return;
        }
        let old = sh.status.load(Ordering::Acquire);
        let mut new = v | (old & S_NEEDS_RESET);
        if new & S_FEATURES_OK != 0 && old & S_FEATURES_OK == 0 {
            // Only offered features may be accepted; modern drivers must accept VERSION_1.
            let f = *lock(&sh.features);
            if f & !self.device_features() != 0 || f & F_VERSION_1 == 0 {
                new &= !S_FEATURES_OK;
            }
        }
        sh.status.store(new, Ordering::Release);
        if new & S_DRIVER_OK != 0 && old & S_DRIVER_OK == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let sh = self.shared.clone();
        let features = *lock(&sh.features);
        let event_idx = features & F_RING_EVENT_IDX != 0;
        for q in &sh.queues {
            let mut q = lock(q);
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&sh.mem) {
                drop(q);
                sh.needs_reset("a ring is outside guest memory or misaligned");
                return;
            }
        }
        lock(&sh.device).activate(features);
        sh.activated.store(true, Ordering::Release);
        // Serve anything queued before DRIVER_OK.
        for e in &sh.notify {
            let _ = e.write(1);
        }
    }

    fn notify(&self, q: usize) {
        tracing::trace!("{}: notify {q}", self.shared.name);
        if let Some(e) = self.shared.notify.get(q) {
            let _ = e.write(1);
        }
    }

    fn modern_read(&mut self, off: u64, data: &mut [u8]) {
        data.fill(0);
        match off {
            COMMON..0x40 => self.common_read(off, data),
            ISR => data[0] = self.shared.read_isr(),
            DEVICE_CFG..NOTIFY => lock(&self.shared.device).read_config(off - DEVICE_CFG, data),
            MSIX_TABLE..MSIX_PBA => lock(&self.shared.msix).read_table(off - MSIX_TABLE, data),
            MSIX_PBA..MODERN_SIZE => lock(&self.shared.msix).read_pba(off - MSIX_PBA, data),
            _ => {}
        }
    }

    fn modern_write(&mut self, off: u64, data: &[u8]) {
        match off {
            COMMON..0x40 => self.common_write(off, data),
            DEVICE_CFG..NOTIFY => lock(&self.shared.device).write_config(off - DEVICE_CFG, data),
            NOTIFY..MSIX_TABLE => {
                let q = ((off - NOTIFY) / u64::from(NOTIFY_MULT)) as usize;
                self.notify(q);
            }
            MSIX_TABLE..MSIX_PBA => {
                let sh = self.shared.clone();
                lock(&sh.msix).write_table(off - MSIX_TABLE, data, sh.msi.as_ref());
            }
            _ => {}
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        let _ = self.shared.stop.write(1);
        *lock(&self.shared.paused) = false;
        self.shared.pause_cv.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let win = self.pci_cfg_cap + 16;
        if offset >= win && offset + data.len() <= win + 4 {
            self.pci_cfg_access(offset - win, Some(data), None);
            return;
        }
        self.cfg.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let win = self.pci_cfg_cap + 16;
        if offset >= win && offset + data.len() <= win + 4 {
            self.pci_cfg_access(offset - win, None, Some(data));
            return;
        }
        self.cfg.write(offset, data);
        self.config_written(offset, data.len());
    }
    fn config_written(&mut self, offset: usize, len: usize) {
        let m = self.msi_cap.offset;
        if offset < m + 14 && offset + len > m {
            *lock(&self.shared.msi_message) = self
                .msi_cap
                .enabled(&self.cfg)
                .then(|| self.msi_cap.message(&self.cfg));
        }
        let mc_at = self.msix_cap + 2;
        if offset < mc_at + 2 && offset + len > mc_at {
            let mc = self.cfg.u16_at(mc_at);
            let sh = self.shared.clone();
            let was = sh.msix_enabled();
            lock(&sh.msix).set_control(mc, sh.msi.as_ref());
            if !was && sh.msix_enabled() {
                // INTx is not used while MSI-X is on.
                if let Some(l) = lock(&sh.intx).as_ref() {
                    l.set_level(false);
                }
            }
        }
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            MODERN_BAR => self.modern_read(offset, data),
            LEGACY_BAR => self.legacy_read(offset, data),
            _ => data.fill(0xff),
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            MODERN_BAR => self.modern_write(offset, data),
            LEGACY_BAR => self.legacy_write(offset, data),
            _ => {}
        }
    }
    fn bars_mapped(&mut self, bars: &[BarMapping]) {
        self.notify_at = bars
            .iter()
            .find(|b| b.index == MODERN_BAR)
            .map(|b| b.addr + NOTIFY);
        self.update_io_events();
    }
}
