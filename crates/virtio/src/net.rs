//! virtio-net (device type 1) over a TAP interface: queue 0 receives, queue 1 transmits.
//! The 12-byte virtio-net header goes to and from the TAP unchanged (IFF_VNET_HDR), so the
//! checksum and TSO offloads the guest negotiates are the host stack's. Mergeable receive
//! buffers let a 64 KiB segment land in page-sized guest buffers.

use std::os::fd::RawFd;

use palacios_vmm::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::blk_req::Desc;
use crate::device::{QueueCtx, RingError, VirtioDevice};
use crate::tap::{TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, Tap};

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;

pub const HDR: usize = 12;
/// Largest frame with its header: a 64 KiB GSO segment plus headers.
pub const MAX_FRAME: usize = HDR + 65550;

/// Why a transmit chain was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum TxError {
    WriteOnly,
    TooShort,
    TooLong,
}

/// Check a transmit chain: readable descriptors only, a header, at most [`MAX_FRAME`] bytes.
/// Returns the total length. Pure (fuzzed with the block parser).
pub fn tx_len(descs: &[Desc]) -> Result<usize, TxError> {
    let mut total = 0usize;
    for d in descs {
        if d.write_only {
            return Err(TxError::WriteOnly);
        }
        total = total.saturating_add(d.len as usize);
        if total > MAX_FRAME {
            return Err(TxError::TooLong);
        }
    }
    if total < HDR {
        return Err(TxError::TooShort);
    }
    Ok(total)
}

#[derive(Default, Debug, Clone, serde::Serialize)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    features: u64,
    /// A received frame waiting for guest buffers.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    pub stats: std::sync::Arc<std::sync::Mutex<NetStats>>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap,
            mac,
            features: 0,
            pending: None,
            buf: vec![0; MAX_FRAME],
            stats: Default::default(),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, NetStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn transmit(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<bool, RingError> {
        let chains: Vec<_> = virtio_queue::QueueOwnedT::iter(queue, mem)?.collect();
        tracing::trace!("virtio-net: {} chains to transmit", chains.len());
        let mut any = false;
        for chain in chains {
            let head = chain.head_index();
            let descs: Vec<Desc> = chain
                .clone()
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write_only: d.is_write_only(),
                })
                .collect();
            match tx_len(&descs) {
                Ok(n) => {
                    let mut off = 0;
                    let mut ok = true;
                    for d in &descs {
                        let l = d.len as usize;
                        if mem
                            .read_slice(&mut self.buf[off..off + l], GuestAddress(d.addr))
                            .is_err()
                        {
                            ok = false;
                            break;
                        }
                        off += l;
                    }
                    // The TAP ignores num_buffers on transmit.
                    let w = if ok {
                        self.tap.write(&self.buf[..n])
                    } else {
                        Err(std::io::Error::other("guest memory"))
                    };
                    if let Err(e) = &w {
                        tracing::debug!("virtio-net: transmit to {}: {e}", self.tap.name);
                    }
                    if w.is_ok() {
                        let mut s = self.stats();
                        s.tx_frames += 1;
                        s.tx_bytes += (n - HDR) as u64;
                    } else {
                        self.stats().tx_dropped += 1;
                    }
                }
                Err(e) => {
                    tracing::debug!("virtio-net: transmit chain dropped: {e:?}");
                    self.stats().tx_dropped += 1;
                }
            }
            queue.add_used(mem, head, 0)?;
            any = true;
        }
        Ok(any)
    }

    /// Put the pending frame into the guest's receive buffers. Returns false when there are
    /// not enough buffers (the frame stays pending).
    fn deliver(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<bool, RingError> {
        let Some(frame) = self.pending.as_ref() else {
            return Ok(false);
        };
        let mrg = self.features & F_MRG_RXBUF != 0;
        let start = queue.next_avail();
        // Gather chains until the frame fits (one chain without mergeable buffers).
        let mut chains: Vec<(u16, Vec<Desc>, usize)> = Vec::new();
        let mut room = 0usize;
        while room < frame.len() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                queue.set_next_avail(start);
                return Ok(false);
            };
            let head = chain.head_index();
            let descs: Vec<Desc> = chain
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write_only: d.is_write_only(),
                })
                .filter(|d| d.write_only)
                .collect();
            let cap: usize = descs.iter().map(|d| d.len as usize).sum();
            room += cap;
            chains.push((head, descs, cap));
            if !mrg {
                break;
            }
        }
        let frame = self.pending.take().unwrap_or_default();
        if room < frame.len() {
            // A single buffer too small for the frame (no mergeable buffers): the frame is
            // dropped and the buffer returned empty, as a NIC drops an oversized frame.
            for (head, _, _) in &chains {
                queue.add_used(mem, *head, 0)?;
            }
            self.stats().rx_dropped += 1;
            return Ok(true);
        }
        let mut off = 0usize;
        let n_used = chains.len();
        let mut first_hdr_addr = None;
        for (head, descs, _) in &chains {
            let mut written = 0u32;
            for d in descs {
                if off >= frame.len() {
                    break;
                }
                let l = (d.len as usize).min(frame.len() - off);
                if first_hdr_addr.is_none() {
                    first_hdr_addr = Some(d.addr);
                }
                if mem
                    .write_slice(&frame[off..off + l], GuestAddress(d.addr))
                    .is_err()
                {
                    return Err(RingError("a receive buffer outside guest memory".into()));
                }
                off += l;
                written += l as u32;
            }
            queue.add_used(mem, *head, written)?;
        }
        // num_buffers (the header's last field) says how many buffers the frame took.
        if let Some(a) = first_hdr_addr {
            let _ = mem.write_obj((n_used as u16).to_le(), GuestAddress(a + 10));
        }
        let mut s = self.stats();
        s.rx_frames += 1;
        s.rx_bytes += (frame.len() - HDR) as u64;
        Ok(true)
    }

    fn receive(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<bool, RingError> {
        let mut any = false;
        // Bounded per call so transmit and the other queue get their turn.
        for _ in 0..256 {
            if self.pending.is_none() {
                match self.tap.read(&mut self.buf) {
                    Ok(Some(n)) if n >= HDR => self.pending = Some(self.buf[..n].to_vec()),
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("virtio-net: reading {}: {e}", self.tap.name);
                        break;
                    }
                }
            }
            if !self.deliver(mem, queue)? {
                break;
            }
            any = true;
        }
        Ok(any)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        1
    }
    fn queue_sizes(&self) -> Vec<u16> {
        vec![256, 256]
    }
    fn features(&self) -> u64 {
        F_CSUM
            | F_GUEST_CSUM
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_MRG_RXBUF
            | F_STATUS
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // link up
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // one queue pair
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Legacy drivers may set the MAC.
        for (i, b) in data.iter().enumerate() {
            if let Some(m) = self.mac.get_mut(offset as usize + i) {
                *m = *b;
            }
        }
    }
    fn activate(&mut self, features: u64) {
        self.features = features;
        let mut off = 0;
        if features & F_GUEST_CSUM != 0 {
            off |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                off |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                off |= TUN_F_TSO6;
            }
            if features & F_GUEST_ECN != 0 && off & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                off |= TUN_F_TSO_ECN;
            }
        }
        if let Err(e) = self.tap.set_offload(off) {
            tracing::warn!("virtio-net: offloads {off:#x} on {}: {e}", self.tap.name);
        }
    }
    fn reset(&mut self) {
        self.features = 0;
        self.pending = None;
    }
    fn process(&mut self, q: QueueCtx<'_>) -> Result<bool, RingError> {
        match q.index {
            0 => self.receive(q.mem, q.queue),
            1 => self.transmit(q.mem, q.queue),
            _ => Ok(false),
        }
    }
    fn poll_host(
        &mut self,
        mem: &GuestMem,
        queues: &mut [&mut Queue],
    ) -> Result<Vec<usize>, RingError> {
        let Some(rx) = queues.get_mut(0) else {
            return Ok(Vec::new());
        };
        if !rx.ready() {
            return Ok(Vec::new());
        }
        Ok(if self.receive(mem, rx)? {
            vec![0]
        } else {
            Vec::new()
        })
    }
    fn host_fd(&self) -> Option<RawFd> {
        // While a frame waits for buffers the TAP is not watched (the guest's notification
        // on the receive queue resumes it).
        self.pending.is_none().then(|| self.tap.raw_fd())
    }
    fn save(&self) -> serde_json::Value {
        serde_json::json!({ "mac": self.mac, "features": self.features })
    }
    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        if let Some(m) = v
            .get("mac")
            .and_then(|m| serde_json::from_value::<[u8; 6]>(m.clone()).ok())
        {
            self.mac = m;
        }
        Ok(())
    }
}
