//! Model-specific registers emulated by devices (the LAPIC's x2APIC and TSC-deadline MSRs).

use std::sync::Arc;

/// A device that owns some MSRs.
pub trait MsrDevice: Send + Sync {
    /// `None` raises #GP.
    fn read(&self, cpu: u32, msr: u32) -> Option<u64>;
    /// `false` raises #GP.
    fn write(&self, cpu: u32, msr: u32, value: u64) -> bool;
}

/// MSR ranges and their devices.
#[derive(Default, Clone)]
pub struct MsrBus {
    ranges: Vec<(u32, u32, Arc<dyn MsrDevice>)>,
}

impl MsrBus {
    /// Claim `first..=last`; an overlap is refused with the range already claimed.
    pub fn insert(&mut self, first: u32, last: u32, dev: Arc<dyn MsrDevice>) -> Result<(), String> {
        if let Some((a, b, _)) = self
            .ranges
            .iter()
            .find(|(a, b, _)| first <= *b && *a <= last)
        {
            return Err(format!("MSRs {first:#x}-{last:#x} overlap {a:#x}-{b:#x}"));
        }
        self.ranges.push((first, last, dev));
        Ok(())
    }

    fn find(&self, msr: u32) -> Option<&Arc<dyn MsrDevice>> {
        self.ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&msr))
            .map(|(_, _, d)| d)
    }

    pub fn read(&self, cpu: u32, msr: u32) -> Option<u64> {
        self.find(msr).and_then(|d| d.read(cpu, msr))
    }

    pub fn write(&self, cpu: u32, msr: u32, value: u64) -> bool {
        self.find(msr).is_some_and(|d| d.write(cpu, msr, value))
    }

    /// The claimed ranges (for the backend's trap list).
    pub fn ranges(&self) -> Vec<(u32, u32)> {
        self.ranges.iter().map(|(a, b, _)| (*a, *b)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl MsrDevice for Echo {
        fn read(&self, cpu: u32, msr: u32) -> Option<u64> {
            Some(u64::from(cpu) << 32 | u64::from(msr))
        }
        fn write(&self, _: u32, _: u32, v: u64) -> bool {
            v != 0
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut b = MsrBus::default();
        b.insert(0x800, 0x8ff, Arc::new(Echo)).unwrap();
        assert!(b.insert(0x8ff, 0x900, Arc::new(Echo)).is_err());
        b.insert(0x6e0, 0x6e0, Arc::new(Echo)).unwrap();
        assert_eq!(b.read(2, 0x802), Some(0x2_0000_0802));
        assert_eq!(b.read(0, 0x10), None);
        assert!(b.write(0, 0x6e0, 1));
        assert!(!b.write(0, 0x6e0, 0));
        assert!(!b.write(0, 0x11, 1));
        assert_eq!(b.ranges(), vec![(0x800, 0x8ff), (0x6e0, 0x6e0)]);
    }
}
