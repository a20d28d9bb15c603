//! Port-I/O and MMIO buses: devices register address ranges; accesses are dispatched by address.
//!
//! Ranges can be added, moved and removed while the VM runs (PCI BAR programming, decode
//! enable). A range is either *absolute* (the device sees the port or physical address) or
//! *relative* (the device sees the offset within its range, so a moved BAR needs no change in
//! the device). Dispatch clones the device out of the map and releases the map before calling
//! it, so a device may remap ranges (its own or others') from inside an access.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus. `addr` is the absolute port or physical address, or the
/// offset within the range for a range registered with [`Bus::insert_relative`].
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
    #[error("no {bus} range starts at {start:#x}")]
    NoRange { bus: &'static str, start: u64 },
}

#[derive(Clone)]
struct Entry {
    /// Inclusive end.
    last: u64,
    name: String,
    dev: SharedDevice,
    /// The device is addressed by offset within the range.
    relative: bool,
}

/// An address space with registered device ranges.
pub struct Bus {
    kind: &'static str,
    ranges: RwLock<BTreeMap<u64, Entry>>,
    fallbacks: RwLock<Vec<Arc<dyn FallbackDevice>>>,
    unclaimed: Mutex<HashMap<u64, u64>>,
}

fn last_of(start: u64, len: u64) -> Option<u64> {
    if len == 0 {
        return None;
    }
    start.checked_add(len - 1)
}

impl Bus {
    pub fn new(kind: &'static str) -> Self {
        Bus {
            kind,
            ranges: RwLock::new(BTreeMap::new()),
            fallbacks: RwLock::new(Vec::new()),
            unclaimed: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.read().unwrap_or_else(|p| p.into_inner())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.write().unwrap_or_else(|p| p.into_inner())
    }

    /// "port" or "mmio".
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Register `dev` for `[start, start+len)`, addressed absolutely. Overlaps are refused,
    /// naming both devices.
    pub fn insert(
        &self,
        start: u64,
        len: u64,
        name: &str,
        dev: SharedDevice,
    ) -> Result<(), BusError> {
        self.insert_entry(start, len, name, dev, false)
    }

    /// Register `dev` for `[start, start+len)`; it sees offsets within the range.
    pub fn insert_relative(
        &self,
        start: u64,
        len: u64,
        name: &str,
        dev: SharedDevice,
    ) -> Result<(), BusError> {
        self.insert_entry(start, len, name, dev, true)
    }

    fn insert_entry(
        &self,
        start: u64,
        len: u64,
        name: &str,
        dev: SharedDevice,
        relative: bool,
    ) -> Result<(), BusError> {
        let last = last_of(start, len).ok_or_else(|| BusError::BadRange {
            bus: self.kind,
            name: name.into(),
        })?;
        let mut map = self.map_mut();
        Self::check_free(self.kind, &map, start, last, name, None)?;
        map.insert(
            start,
            Entry {
                last,
                name: name.into(),
                dev,
                relative,
            },
        );
        Ok(())
    }

    fn check_free(
        kind: &'static str,
        map: &BTreeMap<u64, Entry>,
        start: u64,
        last: u64,
        name: &str,
        ignore: Option<u64>,
    ) -> Result<(), BusError> {
        let clash = map
            .range(..=last)
            .rev()
            .find(|(s, _)| Some(**s) != ignore)
            .filter(|(_, e)| e.last >= start)
            .map(|(s, e)| (*s, e.last, e.name.clone()));
        match clash {
            Some((old_start, old_end, old)) => Err(BusError::Overlap {
                bus: kind,
                new: name.into(),
                new_start: start,
                new_end: last,
                old,
                old_start,
                old_end,
            }),
            None => Ok(()),
        }
    }

    /// Remove the range starting at `start`; returns its device.
    pub fn remove(&self, start: u64) -> Result<SharedDevice, BusError> {
        self.map_mut()
            .remove(&start)
            .map(|e| e.dev)
            .ok_or(BusError::NoRange {
                bus: self.kind,
                start,
            })
    }

    /// Move the range starting at `old` to start at `new` (same length, same device). On an
    /// overlap nothing changes.
    pub fn relocate(&self, old: u64, new: u64) -> Result<(), BusError> {
        let mut map = self.map_mut();
        let e = map.get(&old).cloned().ok_or(BusError::NoRange {
            bus: self.kind,
            start: old,
        })?;
        let len = e.last - old + 1;
        let last = last_of(new, len).ok_or_else(|| BusError::BadRange {
            bus: self.kind,
            name: e.name.clone(),
        })?;
        Self::check_free(self.kind, &map, new, last, &e.name, Some(old))?;
        map.remove(&old);
        map.insert(new, Entry { last, ..e });
        Ok(())
    }

    /// Remove every range and fallback (when the VM goes away: devices may hold the bus they
    /// sit on, such as a PCI host bridge, and this breaks the cycle so they are dropped).
    pub fn clear(&self) {
        self.map_mut().clear();
        self.fallbacks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Add a device consulted for unclaimed addresses.
    pub fn add_fallback(&self, dev: Arc<dyn FallbackDevice>) {
        self.fallbacks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(dev);
    }

    /// The device claiming `addr` and the address it is to see.
    fn find(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        self.map()
            .range(..=addr)
            .next_back()
            .filter(|(_, e)| e.last >= addr)
            .map(|(s, e)| (e.dev.clone(), if e.relative { addr - s } else { addr }))
    }

    fn fallback(&self, mut f: impl FnMut(&dyn FallbackDevice) -> bool) -> bool {
        let fbs = self.fallbacks.read().unwrap_or_else(|p| p.into_inner());
        fbs.iter().any(|d| f(d.as_ref()))
    }

    /// Name of the device claiming `addr`, if any.
    pub fn owner(&self, addr: u64) -> Option<String> {
        self.map()
            .range(..=addr)
            .next_back()
            .filter(|(_, e)| e.last >= addr)
            .map(|(_, e)| e.name.clone())
    }

    /// Dispatch a read. Unclaimed addresses read as all-ones. Returns whether a device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, a)) => {
                lock(&dev).read(a, data);
                true
            }
            None => {
                if self.fallback(|f| f.try_read(addr, data)) {
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
            Some((dev, a)) => {
                lock(&dev).write(a, data);
                true
            }
            None => {
                if self.fallback(|f| f.try_write(addr, data)) {
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
        self.map()
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
        let bus = Bus::new("port");
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
        let bus = Bus::new("port");
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

    #[test]
    fn relative_ranges_move_and_go() {
        let bus = Bus::new("mmio");
        let a = dev(0x33);
        bus.insert_relative(0xe000_0000, 0x1000, "bar0", a.clone())
            .unwrap();
        bus.insert(0xe000_2000, 0x1000, "other", dev(0x44)).unwrap();
        assert!(bus.write(0xe000_0010, &[9]));
        assert_eq!(a.lock().unwrap().1, vec![(0x10, 9)]);
        // Onto another range: refused, nothing moves.
        assert!(bus.relocate(0xe000_0000, 0xe000_1800).is_err());
        assert_eq!(bus.owner(0xe000_0000).as_deref(), Some("bar0"));
        // Overlapping its own old place is fine.
        bus.relocate(0xe000_0000, 0xe000_0800).unwrap();
        assert!(!bus.write(0xe000_0000, &[1]));
        assert!(bus.write(0xe000_0810, &[7]));
        assert_eq!(a.lock().unwrap().1, vec![(0x10, 9), (0x10, 7)]);
        bus.remove(0xe000_0800).unwrap();
        assert!(bus.remove(0xe000_0800).is_err());
        assert!(!bus.read(0xe000_0810, &mut [0]));
    }

    /// A device may remap ranges from inside an access (a PCI BAR write).
    #[test]
    fn a_device_may_remap_from_inside_an_access() {
        struct Mover(Arc<Bus>);
        impl BusDevice for Mover {
            fn read(&mut self, _a: u64, d: &mut [u8]) {
                d.fill(0);
            }
            fn write(&mut self, _a: u64, _d: &[u8]) {
                self.0.relocate(0x100, 0x200).unwrap();
            }
        }
        let bus = Arc::new(Bus::new("port"));
        let m = Arc::new(Mutex::new(Mover(bus.clone())));
        bus.insert(0x100, 4, "mover", m).unwrap();
        assert!(bus.write(0x100, &[0]));
        assert_eq!(bus.owner(0x200).as_deref(), Some("mover"));
    }
}
