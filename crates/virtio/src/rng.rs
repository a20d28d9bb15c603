//! virtio-rng (device type 4): fills the driver's buffers from the host's getrandom(2).

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::device::{QueueCtx, RingError, VirtioDevice};

/// Bytes served per buffer at most (a guest asking for more gets this much).
const MAX_PER_BUFFER: usize = 64 << 10;

#[derive(Default)]
pub struct Rng {
    pub bytes_served: u64,
}

fn fill(buf: &mut [u8]) -> bool {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[off..].as_mut_ptr().cast(), buf.len() - off, 0) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        off += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        4
    }
    fn queue_sizes(&self) -> Vec<u16> {
        vec![64]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn process(&mut self, q: QueueCtx<'_>) -> Result<bool, RingError> {
        let mem = q.mem;
        let chains: Vec<_> = q.queue.iter(mem)?.collect();
        let mut any = false;
        let mut buf = vec![0u8; 4096];
        for chain in chains {
            let head = chain.head_index();
            let mut written = 0u32;
            for d in chain.clone().filter(|d| d.is_write_only()) {
                let mut left = (d.len() as usize).min(MAX_PER_BUFFER - written as usize);
                let mut at = d.addr().0;
                while left > 0 {
                    let n = left.min(buf.len());
                    if !fill(&mut buf[..n]) || mem.write_slice(&buf[..n], GuestAddress(at)).is_err()
                    {
                        left = 0;
                        continue;
                    }
                    at += n as u64;
                    left -= n;
                    written += n as u32;
                }
            }
            self.bytes_served += u64::from(written);
            q.queue.add_used(mem, head, written)?;
            any = true;
        }
        Ok(any)
    }
}
