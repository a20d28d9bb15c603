//! What a virtio device type provides to the PCI transport.

use palacios_vmm::GuestMem;
use virtio_queue::Queue;

/// Feature bits every device here offers (transport features, virtio 1.2 section 6).
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;

/// Device status bits.
pub const S_ACKNOWLEDGE: u8 = 1;
pub const S_DRIVER: u8 = 2;
pub const S_DRIVER_OK: u8 = 4;
pub const S_FEATURES_OK: u8 = 8;
pub const S_NEEDS_RESET: u8 = 0x40;
pub const S_FAILED: u8 = 0x80;

/// Why a queue cannot be served: the driver broke the ring contract (the device then sets
/// NEEDS_RESET and stops using the queue until the driver resets it).
#[derive(Debug)]
pub struct RingError(pub String);

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<virtio_queue::Error> for RingError {
    fn from(e: virtio_queue::Error) -> Self {
        RingError(format!("virtqueue: {e}"))
    }
}

/// The context a device works in when it serves a queue.
pub struct QueueCtx<'a> {
    pub mem: &'a GuestMem,
    pub index: usize,
    pub queue: &'a mut Queue,
}

/// A virtio device type (block, net, ...). Called with the transport's device lock held,
/// on the device's worker thread for queue work and on a vCPU thread for config accesses.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 net, 2 block, 3 console, 4 entropy, 5 balloon).
    fn device_type(&self) -> u16;
    /// Maximum size of each queue (the number of queues is its length).
    fn queue_sizes(&self) -> Vec<u16>;
    /// Device feature bits (the transport adds VERSION_1, EVENT_IDX, INDIRECT_DESC).
    fn features(&self) -> u64;
    /// Device-specific configuration space.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Serve queue `q.index` after a notification: take available chains, complete them.
    /// Returns whether anything was added to the used ring.
    fn process(&mut self, q: QueueCtx<'_>) -> Result<bool, RingError>;
    /// Work that arrives from the host side (a received packet, console input): called on
    /// the worker after its host fd became readable, with every queue. Returns the queues
    /// whose used rings changed.
    fn poll_host(
        &mut self,
        _mem: &GuestMem,
        _queues: &mut [&mut Queue],
    ) -> Result<Vec<usize>, RingError> {
        Ok(Vec::new())
    }
    /// A host fd the worker should wait on besides the queue notifications.
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The device wants the worker to call `poll_host` again after this long even without
    /// an event (rate limits, periodic stats).
    fn poll_interval(&self) -> Option<std::time::Duration> {
        None
    }
    /// Device state for checkpoints (queue positions are the transport's).
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn restore(&mut self, _v: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// The configuration changed by itself (balloon target, link status): the transport
    /// raises a configuration interrupt when this returns true once.
    fn take_config_changed(&mut self) -> bool {
        false
    }
}
