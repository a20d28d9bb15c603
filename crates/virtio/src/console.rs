//! virtio-console (device type 3), a single port (/dev/hvc0 in Linux): queue 0 carries host
//! input to the guest, queue 1 guest output to the host. It is a character frontend: a
//! `CHAR_STREAM` backend connects it to a file, a Unix socket or the console.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use palacios_vmm::GuestMem;
use palacios_vmm::config::{ConfigError, ConfigNode};
use palacios_vmm::registry::{CharFrontend, CharInput};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{QueueCtx, RingError, VirtioDevice};

/// Input held for the guest at most (a host that writes faster than the guest reads waits).
const INPUT_LIMIT: usize = 64 << 10;

/// What the console shares with its backend.
pub struct ConsolePort {
    input: Mutex<VecDeque<u8>>,
    output: Mutex<Option<Box<dyn Write + Send>>>,
    wake: EventFd,
}

impl ConsolePort {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ConsolePort {
            input: Mutex::new(VecDeque::new()),
            output: Mutex::new(None),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }
}

struct PortInput(Arc<ConsolePort>);

impl CharInput for PortInput {
    fn push(&self, bytes: &[u8]) -> usize {
        let mut q = palacios_vmm::bus::lock(&self.0.input);
        let n = bytes.len().min(INPUT_LIMIT.saturating_sub(q.len()));
        q.extend(&bytes[..n]);
        drop(q);
        if n > 0 {
            let _ = self.0.wake.write(1);
        }
        n
    }
}

/// The frontend side a `CHAR_STREAM` connects to.
pub struct ConsoleFrontend(pub Arc<ConsolePort>);

impl CharFrontend for ConsoleFrontend {
    fn connect(
        &self,
        _cfg: &ConfigNode,
        output: Box<dyn Write + Send>,
    ) -> Result<Arc<dyn CharInput>, ConfigError> {
        let mut o = palacios_vmm::bus::lock(&self.0.output);
        if o.is_some() {
            return Err(ConfigError::new(
                None,
                "the virtio console already has a backend",
            ));
        }
        *o = Some(output);
        Ok(Arc::new(PortInput(self.0.clone())))
    }
}

pub struct Console {
    port: Arc<ConsolePort>,
    pub bytes_out: u64,
}

impl Console {
    pub fn new(port: Arc<ConsolePort>) -> Self {
        Console { port, bytes_out: 0 }
    }

    fn output(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<bool, RingError> {
        let chains: Vec<_> = queue.iter(mem)?.collect();
        let mut any = false;
        let mut buf = Vec::new();
        for chain in chains {
            let head = chain.head_index();
            for d in chain.clone().filter(|d| !d.is_write_only()) {
                let l = (d.len() as usize).min(64 << 10);
                let at = buf.len();
                buf.resize(at + l, 0);
                if mem.read_slice(&mut buf[at..], d.addr()).is_err() {
                    buf.truncate(at);
                }
            }
            queue.add_used(mem, head, 0)?;
            any = true;
        }
        if !buf.is_empty() {
            self.bytes_out += buf.len() as u64;
            if let Some(o) = palacios_vmm::bus::lock(&self.port.output).as_mut() {
                let _ = o.write_all(&buf);
                let _ = o.flush();
            }
        }
        Ok(any)
    }

    fn input(&mut self, mem: &GuestMem, queue: &mut Queue) -> Result<bool, RingError> {
        let _ = self.port.wake.read();
        let mut any = false;
        loop {
            if palacios_vmm::bus::lock(&self.port.input).is_empty() {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for d in chain.filter(|d| d.is_write_only()) {
                let mut q = palacios_vmm::bus::lock(&self.port.input);
                let n = (d.len() as usize).min(q.len());
                if n == 0 {
                    break;
                }
                let bytes: Vec<u8> = q.drain(..n).collect();
                drop(q);
                if mem.write_slice(&bytes, GuestAddress(d.addr().0)).is_err() {
                    break;
                }
                written += n as u32;
            }
            queue.add_used(mem, head, written)?;
            any = true;
        }
        Ok(any)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        3
    }
    fn queue_sizes(&self) -> Vec<u16> {
        vec![64, 64]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports (1), emerg_wr.
        let mut c = [0u8; 12];
        c[0..2].copy_from_slice(&80u16.to_le_bytes());
        c[2..4].copy_from_slice(&25u16.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn process(&mut self, q: QueueCtx<'_>) -> Result<bool, RingError> {
        match q.index {
            0 => self.input(q.mem, q.queue),
            1 => self.output(q.mem, q.queue),
            _ => Ok(false),
        }
    }
    fn poll_host(
        &mut self,
        mem: &GuestMem,
        queues: &mut [&mut Queue],
    ) -> Result<Vec<usize>, RingError> {
        match queues.get_mut(0) {
            Some(rx) if rx.ready() => Ok(if self.input(mem, rx)? {
                vec![0]
            } else {
                Vec::new()
            }),
            _ => {
                let _ = self.port.wake.read();
                Ok(Vec::new())
            }
        }
    }
    fn host_fd(&self) -> Option<RawFd> {
        Some(self.port.wake.as_raw_fd())
    }
}
