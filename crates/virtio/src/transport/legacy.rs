//! The legacy (virtio 0.9.5) register block in the I/O BAR, for drivers that predate
//! virtio 1.0 (Palacios' own were legacy): 32-bit features, queues by page frame number, and
//! the device configuration after the (MSI-X) vector registers.

use std::sync::atomic::Ordering;

use palacios_vmm::bus::lock;

use super::*;

impl VirtioPci {
    /// Legacy (virtio 0.9.5) registers in the I/O BAR.
    pub(super) fn legacy_read(&mut self, off: u64, data: &mut [u8]) {
        data.fill(0);
        let sh = self.shared.clone();
        let cfg_at = if sh.msix_enabled() { 0x18 } else { 0x14 };
        let qs = self.queue_select as usize;
        let v: u32 = match off {
            0x00 => self.device_features() as u32,
            0x04 => *lock(&sh.features) as u32,
            0x08 => self.legacy_pfn.get(qs).copied().unwrap_or(0),
            0x0c => self
                .sel_queue()
                .map_or(0, |q| u32::from(lock(q).max_size())),
            0x0e => u32::from(self.queue_select),
            0x12 => u32::from(sh.status.load(Ordering::Acquire)),
            0x13 => u32::from(sh.read_isr()),
            0x14 if cfg_at == 0x18 => u32::from(lock(&sh.vectors).config),
            0x16 if cfg_at == 0x18 => u32::from(
                lock(&sh.vectors)
                    .queues
                    .get(qs)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            ),
            o if o >= cfg_at => {
                lock(&sh.device).read_config(o - cfg_at, data);
                return;
            }
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    pub(super) fn legacy_write(&mut self, off: u64, data: &[u8]) {
        let sh = self.shared.clone();
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let cfg_at = if sh.msix_enabled() { 0x18 } else { 0x14 };
        let qs = self.queue_select as usize;
        match off {
            0x04 => {
                // Legacy drivers see only the low 32 feature bits and never VERSION_1.
                let offered = self.device_features() & 0xffff_ffff;
                *lock(&sh.features) = u64::from(v) & offered;
            }
            0x08 => {
                if let (Some(q), Some(p)) = (sh.queues.get(qs), self.legacy_pfn.get_mut(qs)) {
                    *p = v;
                    let mut q = lock(q);
                    if v == 0 {
                        q.reset();
                        return;
                    }
                    let size = q.max_size();
                    let desc = u64::from(v) << 12;
                    let avail = desc + 16 * u64::from(size);
                    let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
                    q.set_size(size);
                    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
                    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
                    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
                    q.set_ready(true);
                }
            }
            0x0e => self.queue_select = v as u16,
            0x10 => self.notify(v as u16 as usize),
            0x12 => {
                let s = v as u8;
                if s == 0 {
                    sh.reset();
                    self.legacy_pfn.iter_mut().for_each(|p| *p = 0);
                    return;
                }
                let old = sh.status.load(Ordering::Acquire);
                sh.status
                    .store(s | (old & S_NEEDS_RESET), Ordering::Release);
                if s & S_DRIVER_OK != 0 && old & S_DRIVER_OK == 0 {
                    self.activate();
                }
            }
            0x14 if cfg_at == 0x18 => lock(&sh.vectors).config = self.valid_vector(v as u16),
            0x16 if cfg_at == 0x18 => {
                let vec = self.valid_vector(v as u16);
                if let Some(x) = lock(&sh.vectors).queues.get_mut(qs) {
                    *x = vec;
                }
            }
            o if o >= cfg_at => lock(&sh.device).write_config(o - cfg_at, data),
            _ => {}
        }
    }
}
