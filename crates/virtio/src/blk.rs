//! virtio-blk (device type 2) over a [`BlockBackend`]: read, write, flush, GET_ID, discard,
//! write zeroes, read-only disks. Requests run on the device's worker thread.

use std::sync::Arc;

use palacios_storage::BlockBackend;
use palacios_vmm::GuestMem;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::blk_req::*;
use crate::device::{QueueCtx, RingError, VirtioDevice};

pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

const SECTOR: u64 = 512;
/// Segments per request: the queue size less the header and status descriptors.
const SEG_MAX: u32 = 254;
const SIZE_MAX: u32 = 1 << 20;
const CHUNK: usize = 128 << 10;

/// Counters (telemetry and tests).
#[derive(Default, Debug, Clone, serde::Serialize)]
pub struct BlkStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

pub struct Blk {
    disk: Arc<dyn BlockBackend>,
    read_only: bool,
    buf: Vec<u8>,
    pub stats: Arc<std::sync::Mutex<BlkStats>>,
}

impl Blk {
    pub fn new(disk: Arc<dyn BlockBackend>, read_only: bool) -> Self {
        let read_only = read_only || disk.read_only();
        Blk {
            disk,
            read_only,
            buf: vec![0; CHUNK],
            stats: Default::default(),
        }
    }

    fn sectors(&self) -> u64 {
        self.disk.capacity() / SECTOR
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.sectors().to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        // Discard and write zeroes: up to 32 MiB per segment, one segment, sector aligned.
        c[36..40].copy_from_slice(&(65536u32).to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&(65536u32).to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = 1;
        c
    }

    /// Run one parsed request; returns (status, bytes written into the guest's buffers).
    fn execute(&mut self, mem: &GuestMem, r: &Request) -> (u8, u32) {
        let cap = self.disk.capacity();
        let in_range = |sector: u64, len: u64| {
            sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|end| end <= cap)
        };
        match r.kind {
            T_IN => {
                if !r.data_len.is_multiple_of(SECTOR) || !in_range(r.sector, r.data_len) {
                    return (S_IOERR, 0);
                }
                let mut off = r.sector * SECTOR;
                let mut done = 0u32;
                for d in &r.data {
                    let mut left = d.len as usize;
                    let mut at = d.addr;
                    while left > 0 {
                        let n = left.min(CHUNK);
                        if let Err(e) = self.disk.read_at(&mut self.buf[..n], off) {
                            tracing::warn!("virtio-blk: read at {off}: {e}");
                            return (S_IOERR, done);
                        }
                        if mem.write_slice(&self.buf[..n], GuestAddress(at)).is_err() {
                            return (S_IOERR, done);
                        }
                        off += n as u64;
                        at += n as u64;
                        left -= n;
                        done += n as u32;
                    }
                }
                let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                s.reads += 1;
                s.bytes_read += r.data_len;
                (S_OK, done)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                if !r.data_len.is_multiple_of(SECTOR) || !in_range(r.sector, r.data_len) {
                    return (S_IOERR, 0);
                }
                let mut off = r.sector * SECTOR;
                for d in &r.data {
                    let mut left = d.len as usize;
                    let mut at = d.addr;
                    while left > 0 {
                        let n = left.min(CHUNK);
                        if mem
                            .read_slice(&mut self.buf[..n], GuestAddress(at))
                            .is_err()
                        {
                            return (S_IOERR, 0);
                        }
                        if let Err(e) = self.disk.write_at(&self.buf[..n], off) {
                            tracing::warn!("virtio-blk: write at {off}: {e}");
                            return (S_IOERR, 0);
                        }
                        off += n as u64;
                        at += n as u64;
                        left -= n;
                    }
                }
                let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                s.writes += 1;
                s.bytes_written += r.data_len;
                (S_OK, 0)
            }
            T_FLUSH => {
                self.stats.lock().unwrap_or_else(|p| p.into_inner()).flushes += 1;
                match self.disk.flush() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        tracing::warn!("virtio-blk: flush: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            T_GET_ID => {
                let mut id = [0u8; 20];
                let s = self.disk.serial();
                let n = s.len().min(20);
                id[..n].copy_from_slice(&s.as_bytes()[..n]);
                let mut done = 0usize;
                for d in &r.data {
                    let n = (d.len as usize).min(20 - done);
                    if n == 0 {
                        break;
                    }
                    if mem
                        .write_slice(&id[done..done + n], GuestAddress(d.addr))
                        .is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    done += n;
                }
                (S_OK, done as u32)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                // Segments of 16 bytes: sector u64, num_sectors u32, flags u32.
                let mut seg = [0u8; 16];
                for d in &r.data {
                    if d.len != 16 || mem.read_slice(&mut seg, GuestAddress(d.addr)).is_err() {
                        return (S_IOERR, 0);
                    }
                    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                    let n = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                    if flags & !1 != 0 || (r.kind == T_DISCARD && flags != 0) {
                        return (S_UNSUPP, 0);
                    }
                    if !in_range(sector, n * SECTOR) {
                        return (S_IOERR, 0);
                    }
                    let res = if r.kind == T_DISCARD {
                        self.disk.discard(sector * SECTOR, n * SECTOR)
                    } else {
                        self.disk
                            .write_zeroes(sector * SECTOR, n * SECTOR, flags & 1 != 0)
                    };
                    if let Err(e) = res {
                        tracing::warn!("virtio-blk: discard/write zeroes: {e}");
                        return (S_IOERR, 0);
                    }
                }
                (S_OK, 0)
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u16 {
        2
    }
    fn queue_sizes(&self) -> Vec<u16> {
        vec![256]
    }
    fn features(&self) -> u64 {
        let mut f = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn process(&mut self, q: QueueCtx<'_>) -> Result<bool, RingError> {
        let mem = q.mem;
        let mut any = false;
        {
            let chains: Vec<_> = q.queue.iter(mem)?.collect();
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
                let mut header = [0u8; 16];
                let header_ok = descs
                    .first()
                    .is_some_and(|d| mem.read_slice(&mut header, GuestAddress(d.addr)).is_ok());
                let (status_at, status, len) = match parse(header, &descs) {
                    Ok(r) if header_ok => {
                        let (s, n) = self.execute(mem, &r);
                        (Some(r.status), s, n)
                    }
                    Ok(r) => (Some(r.status), S_IOERR, 0),
                    Err(ReqError::Bad { status, why }) => {
                        tracing::debug!("virtio-blk: bad request: {why}");
                        (Some(status), S_IOERR, 0)
                    }
                    Err(ReqError::NoStatus) => (None, S_IOERR, 0),
                };
                if status != S_OK {
                    self.stats.lock().unwrap_or_else(|p| p.into_inner()).errors += 1;
                }
                let mut used_len = len;
                if let Some(at) = status_at
                    && mem.write_obj(status, GuestAddress(at)).is_ok()
                {
                    used_len += 1;
                }
                q.queue.add_used(mem, head, used_len)?;
                any = true;
            }
        }
        Ok(any)
    }
}
