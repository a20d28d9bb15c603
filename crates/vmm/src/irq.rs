//! Interrupt plumbing between devices, controllers and vCPUs.
//!
//! Devices raise or lower an [`IrqLine`] and never know what is behind it. A per-VM
//! [`InterruptController`] answers, per core, which vector is pending; the exit loop injects it
//! through the backend with interrupt-window handling. The PC platform's PIC/IOAPIC/LAPIC models
//! implement these traits; this module holds the simplest controller, [`VectorQueue`], used by
//! embedders that inject vectors directly and by the injection tests.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::control::Wakers;

/// An interrupt line as a device sees it.
pub trait IrqLine: Send + Sync {
    fn set_level(&self, high: bool);
    /// An edge: raise then lower.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// A line connected to nothing (no interrupt controller configured for it). Counts its edges
/// so tests can see the device tried.
#[derive(Default)]
pub struct UnconnectedLine {
    pub raised: std::sync::atomic::AtomicU64,
}

impl IrqLine for UnconnectedLine {
    fn set_level(&self, high: bool) {
        if high {
            self.raised
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// What the exit loop asks before each run of a core, in the hardware's INTR/INTA protocol.
pub trait InterruptController: Send + Sync {
    /// Whether an external interrupt is pending for `cpu` (the INTR line).
    fn has_interrupt(&self, cpu: u32) -> bool;
    /// The interrupt-acknowledge cycle: the vector to deliver now, which the controller records
    /// as in service. Called only when the core can take it; `None` if the request went away.
    fn acknowledge(&self, cpu: u32) -> Option<u8>;
    /// Take a pending NMI for `cpu`.
    fn take_nmi(&self, _cpu: u32) -> bool {
        false
    }
    /// Whether an NMI is pending for `cpu` (without taking it; wakes a halted core).
    fn nmi_pending(&self, _cpu: u32) -> bool {
        false
    }
}

/// A FIFO of vectors per core; [`VectorQueue::push`] wakes the core.
pub struct VectorQueue {
    queues: Vec<Mutex<VecDeque<u8>>>,
    wakers: Wakers,
}

impl VectorQueue {
    pub fn new(cores: u32, wakers: Wakers) -> Self {
        VectorQueue {
            queues: (0..cores).map(|_| Mutex::new(VecDeque::new())).collect(),
            wakers,
        }
    }

    /// Queue `vector` for `cpu` (ignored for a core that does not exist).
    pub fn push(&self, cpu: u32, vector: u8) {
        if let Some(q) = self.queues.get(cpu as usize) {
            crate::bus::lock(q).push_back(vector);
            self.wakers.wake(cpu);
        }
    }
}

impl InterruptController for VectorQueue {
    fn has_interrupt(&self, cpu: u32) -> bool {
        self.queues
            .get(cpu as usize)
            .is_some_and(|q| !crate::bus::lock(q).is_empty())
    }
    fn acknowledge(&self, cpu: u32) -> Option<u8> {
        self.queues
            .get(cpu as usize)
            .and_then(|q| crate::bus::lock(q).pop_front())
    }
}

/// A message-signalled interrupt (MSI or an MSI-X table entry) as a device writes it: the
/// address (0xFEEx_xxxx on x86: destination, mode) and the data (vector, delivery mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

impl MsiMessage {
    /// Whether the address is in the x86 interrupt window (0xFEE0_0000-0xFEEF_FFFF).
    pub fn is_interrupt(&self) -> bool {
        self.addr >> 20 == 0xfee
    }
}

/// Where MSI messages go: the emulated APIC bus, or the backend's in-kernel irqchip.
pub trait MsiController: Send + Sync {
    fn send_msi(&self, msg: MsiMessage);
}

/// The VM's MSI entry point, handed to devices when they are built. The interrupt controller
/// (the `LAPIC` device, or the in-kernel irqchip) connects itself later; a message sent while
/// nothing is connected, or outside the interrupt window, is dropped and counted (as on a
/// machine where the write goes nowhere).
#[derive(Default)]
pub struct MsiRouter {
    target: std::sync::OnceLock<std::sync::Arc<dyn MsiController>>,
    pub dropped: std::sync::atomic::AtomicU64,
    pub sent: std::sync::atomic::AtomicU64,
}

impl MsiRouter {
    /// Connect the controller (first one wins).
    pub fn connect(&self, c: std::sync::Arc<dyn MsiController>) {
        let _ = self.target.set(c);
    }

    pub fn is_connected(&self) -> bool {
        self.target.get().is_some()
    }
}

impl MsiController for MsiRouter {
    fn send_msi(&self, msg: MsiMessage) {
        use std::sync::atomic::Ordering::Relaxed;
        match self.target.get() {
            Some(t) if msg.is_interrupt() => {
                self.sent.fetch_add(1, Relaxed);
                t.send_msi(msg)
            }
            _ => {
                if self.dropped.fetch_add(1, Relaxed) == 0 {
                    tracing::debug!("MSI {msg:x?} dropped (no interrupt controller takes it)");
                }
            }
        }
    }
}
