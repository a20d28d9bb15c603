//! Port-I/O and MMIO buses: devices register address ranges; accesses are dispatched by address.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `addr` is the absolute port or physical address.
pub trait BusDevice: Send {
    fn read(&mut self, addr: u64, data: &mut [u8]);
    fn write(&mut self, addr: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Consulted for addresses no range claims (devices whose address moves at run time, like a
/// relocated local APIC). Returns whether it handled the access.
pub trait FallbackDevice: Send + Sync {
    fn try_read(&self, addr: u64, data: &mut [u8]) -> bool;
    fn try_write(&self, addr: u64, data: &[u8]) -> bool;
}

thread_local! {
    static CURRENT_CPU: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The vCPU on whose behalf this thread is running (per-core devices such as the LAPIC use it).
pub fn current_cpu() -> u32 {
    CURRENT_CPU.with(|c| c.get())
}

/// Set by the exit loop on each vCPU thread.
pub fn set_current_cpu(cpu: u32) {
    CURRENT_CPU.with(|c| c.set(cpu));
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error(
        "{bus} range {new_start:#x}-{new_end:#x} of device '{new}' overlaps {old_start:#x}-{old_end:#x} of device '{old}'"
    )]
    Overlap {
        bus: &'static str,
        new: String,
        new_start: u64,
        new_end: u64,
        old: String,
        old_start: u64,
        old_end: u64,
    },
    #[error("{bus} range of device '{name}' is empty or wraps around")]
    BadRange { bus: &'static str, name: String },
}

struct Entry {
    /// Inclusive end.
    last: u64,
    name: String,
    dev: SharedDevice,
}

/// An address space with registered device ranges.
pub struct Bus {
    kind: &'static str,
    ranges: BTreeMap<u64, Entry>,
    fallbacks: Vec<Arc<dyn FallbackDevice>>,
    unclaimed: Mutex<HashMap<u64, u64>>,
}

impl Bus {
    pub fn new(kind: &'static str) -> Self {
        Bus {
            kind,
            ranges: BTreeMap::new(),
            fallbacks: Vec::new(),
            unclaimed: Mutex::new(HashMap::new()),
        }
    }

    /// "port" or "mmio".
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Register `dev` for `[start, start+len)`. Overlaps are refused, naming both devices.
    pub fn insert(
        &mut self,
        start: u64,
        len: u64,
        name: &str,
        dev: SharedDevice,
    ) -> Result<(), BusError> {
        let last = match len.checked_sub(1).and_then(|l| start.checked_add(l)) {
            Some(l) if len > 0 => l,
            _ => {
                return Err(BusError::BadRange {
                    bus: self.kind,
                    name: name.into(),
                });
            }
        };
        let clash = self
            .ranges
            .range(..=last)
            .next_back()
            .filter(|(_, e)| e.last >= start)
            .map(|(s, e)| (*s, e.last, e.name.clone()));
        if let Some((old_start, old_end, old)) = clash {
            return Err(BusError::Overlap {
                bus: self.kind,
                new: name.into(),
                new_start: start,
                new_end: last,
                old,
                old_start,
                old_end,
            });
        }
        self.ranges.insert(
            start,
            Entry {
                last,
                name: name.into(),
                dev,
            },
        );
        Ok(())
    }

    /// Add a device consulted for unclaimed addresses.
    pub fn add_fallback(&mut self, dev: Arc<dyn FallbackDevice>) {
        self.fallbacks.push(dev);
    }

    fn find(&self, addr: u64) -> Option<&Entry> {
        self.ranges
            .range(..=addr)
            .next_back()
            .map(|(_, e)| e)
            .filter(|e| e.last >= addr)
    }

    /// Name of the device claiming `addr`, if any.
    pub fn owner(&self, addr: u64) -> Option<&str> {
        self.find(addr).map(|e| e.name.as_str())
    }

    /// Dispatch a read. Unclaimed addresses read as all-ones. Returns whether a device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some(e) => {
                lock(&e.dev).read(addr, data);
                true
            }
            None => {
                if self.fallbacks.iter().any(|f| f.try_read(addr, data)) {
                    return true;
                }
                data.fill(0xff);
                self.note_unclaimed(addr, "read");
                false
            }
        }
    }

    /// Dispatch a write. Unclaimed writes are dropped. Returns whether a device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some(e) => {
                lock(&e.dev).write(addr, data);
                true
            }
            None => {
                if self.fallbacks.iter().any(|f| f.try_write(addr, data)) {
                    return true;
                }
                self.note_unclaimed(addr, "write");
                false
            }
        }
    }

    fn note_unclaimed(&self, addr: u64, what: &str) {
        let mut map = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(addr).or_insert(0);
        if *n == 0 {
            tracing::debug!(
                "unclaimed {} {what} at {addr:#x} (reads as all-ones, writes ignored)",
                self.kind
            );
        }
        *n += 1;
    }

    /// Accesses nobody claimed, per address, ascending.
    pub fn unclaimed(&self) -> Vec<(u64, u64)> {
        let map = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(a, n)| (*a, *n)).collect();
        v.sort_unstable();
        v
    }

    /// Registered ranges as (start, inclusive end, device name).
    pub fn ranges(&self) -> Vec<(u64, u64, String)> {
        self.ranges
            .iter()
            .map(|(s, e)| (*s, e.last, e.name.clone()))
            .collect()
    }
}

/// Lock a device; a device that panicked while locked is still served (its state is its own).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8, Vec<(u64, u8)>);
    impl BusDevice for Reg {
        fn read(&mut self, _addr: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, addr: u64, data: &[u8]) {
            self.1.push((addr, data[0]));
        }
    }

    fn dev(v: u8) -> Arc<Mutex<Reg>> {
        Arc::new(Mutex::new(Reg(v, vec![])))
    }

    #[test]
    fn dispatches_by_range_with_absolute_addresses() {
        let mut bus = Bus::new("port");
        let a = dev(0x11);
        bus.insert(0x3f8, 8, "com1", a.clone()).unwrap();
        bus.insert(0x2f8, 8, "com2", dev(0x22)).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3ff, &mut b));
        assert_eq!(b, [0x11]);
        assert!(bus.read(0x2f8, &mut b));
        assert_eq!(b, [0x22]);
        assert!(bus.write(0x3fb, &[7]));
        assert_eq!(a.lock().unwrap().1, vec![(0x3fb, 7)]);
    }

    #[test]
    fn overlap_names_both_devices() {
        let mut bus = Bus::new("port");
        bus.insert(0x3f8, 8, "com1", dev(0)).unwrap();
        let err = bus.insert(0x3fc, 2, "generic", dev(0)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'generic'") && msg.contains("'com1'"), "{msg}");
        // Touching but not overlapping is fine, on both sides.
        bus.insert(0x400, 1, "after", dev(0)).unwrap();
        bus.insert(0x3f0, 8, "before", dev(0)).unwrap();
        assert!(bus.insert(0x3f0, 0x20, "wide", dev(0)).is_err());
        assert!(bus.insert(u64::MAX, 2, "wrap", dev(0)).is_err());
        assert!(bus.insert(5, 0, "empty", dev(0)).is_err());
    }

    #[test]
    fn unclaimed_reads_all_ones_and_is_counted() {
        let bus = Bus::new("mmio");
        let mut b = [0u8; 4];
        assert!(!bus.read(0xfed0_0000, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0xfed0_0000, &[1]));
        assert!(!bus.write(0x10, &[1]));
        assert_eq!(bus.unclaimed(), vec![(0x10, 1), (0xfed0_0000, 2)]);
    }
}
