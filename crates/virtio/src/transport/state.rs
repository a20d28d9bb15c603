//! The checkpoint state of a virtio function: its config space, MSI-X table, vectors,
//! status, features, every queue's addresses and positions, and the device's own part.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use std::sync::atomic::Ordering;

use palacios_vmm::bus::lock;

use super::*;

/// The checkpoint state of a virtio function.
#[derive(Serialize, Deserialize)]
pub struct TransportState {
    config: ConfigSpace,
    msix: MsixTable,
    vectors: Vectors,
    status: u8,
    isr: u8,
    features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    legacy_pfn: Vec<u32>,
    queues: Vec<QueueSnap>,
    device: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct QueueSnap {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl VirtioPci {
    pub fn save(&self) -> TransportState {
        let sh = &self.shared;
        let queues = sh
            .queues
            .iter()
            .map(|q| {
                let s = lock(q).state();
                QueueSnap {
                    max_size: s.max_size,
                    next_avail: s.next_avail,
                    next_used: s.next_used,
                    event_idx: s.event_idx_enabled,
                    size: s.size,
                    ready: s.ready,
                    desc: s.desc_table,
                    avail: s.avail_ring,
                    used: s.used_ring,
                }
            })
            .collect();
        TransportState {
            config: self.cfg.clone(),
            msix: lock(&sh.msix).clone(),
            vectors: lock(&sh.vectors).clone(),
            status: sh.status.load(Ordering::Acquire),
            isr: sh.isr.load(Ordering::Acquire),
            features: *lock(&sh.features),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            queue_select: self.queue_select,
            legacy_pfn: self.legacy_pfn.clone(),
            queues,
            device: lock(&sh.device).save(),
        }
    }

    pub fn restore(&mut self, st: TransportState) -> Result<(), String> {
        let sh = self.shared.clone();
        if st.queues.len() != sh.queues.len() || st.vectors.queues.len() != sh.queues.len() {
            return Err(format!(
                "{} queues saved, this device has {}",
                st.queues.len(),
                sh.queues.len()
            ));
        }
        if st.msix.len() != lock(&sh.msix).len() || st.msix.pending.len() != st.msix.len() {
            return Err("MSI-X table of another size".into());
        }
        self.cfg.restore_from(&st.config)?;
        *lock(&sh.msi_message) = self
            .msi_cap
            .enabled(&self.cfg)
            .then(|| self.msi_cap.message(&self.cfg));
        for (q, s) in sh.queues.iter().zip(&st.queues) {
            let qs = virtio_queue::QueueState {
                max_size: s.max_size,
                next_avail: s.next_avail,
                next_used: s.next_used,
                event_idx_enabled: s.event_idx,
                size: s.size,
                ready: s.ready,
                desc_table: s.desc,
                avail_ring: s.avail,
                used_ring: s.used,
            };
            let nq = Queue::try_from(qs).map_err(|e| format!("virtqueue state: {e}"))?;
            if nq.max_size() != lock(q).max_size() {
                return Err("virtqueue of another maximum size".into());
            }
            *lock(q) = nq;
        }
        lock(&sh.device).restore(&st.device)?;
        *lock(&sh.msix) = st.msix;
        *lock(&sh.vectors) = st.vectors;
        sh.status.store(st.status, Ordering::Release);
        sh.isr.store(st.isr, Ordering::Release);
        *lock(&sh.features) = st.features;
        self.device_feature_select = st.device_feature_select;
        self.driver_feature_select = st.driver_feature_select;
        self.queue_select = st.queue_select;
        if st.legacy_pfn.len() == self.legacy_pfn.len() {
            self.legacy_pfn = st.legacy_pfn;
        }
        let live = st.status & S_DRIVER_OK != 0 && st.status & S_NEEDS_RESET == 0;
        if live {
            lock(&sh.device).activate(st.features);
        }
        sh.activated.store(live, Ordering::Release);
        if st.isr != 0
            && let Some(l) = lock(&sh.intx).as_ref()
        {
            l.set_level(true);
        }
        // Look at every queue once: the driver may have queued work the saved side never saw.
        for e in &sh.notify {
            let _ = e.write(1);
        }
        Ok(())
    }
}
