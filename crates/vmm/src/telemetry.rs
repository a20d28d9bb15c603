//! Per-core exit statistics, printed when the VM ends if telemetry is enabled.

use std::fmt::Write as _;
use std::time::Duration;

use crate::backend::ExitKind;

/// Counts and handling time of each exit kind on one core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub core: u32,
    pub counts: [u64; ExitKind::ALL.len()],
    pub time: [Duration; ExitKind::ALL.len()],
    /// Time spent inside the backend's run().
    pub guest_time: Duration,
    pub injected: u64,
    /// Backend-specific counters (the emulator's instruction count, unimplemented opcodes).
    pub backend: Vec<(String, u64)>,
}

impl CoreStats {
    pub fn new(core: u32) -> Self {
        CoreStats {
            core,
            ..Default::default()
        }
    }

    #[inline]
    pub fn record(&mut self, kind: ExitKind, spent: Duration) {
        let i = kind as usize;
        self.counts[i] += 1;
        self.time[i] += spent;
    }

    pub fn count(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize]
    }

    pub fn total_exits(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What a VM reports when it ends.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    pub cores: Vec<CoreStats>,
    /// Unclaimed (port, count).
    pub unclaimed_ports: Vec<(u64, u64)>,
    /// Unclaimed (physical address, count).
    pub unclaimed_mmio: Vec<(u64, u64)>,
    pub wall: Duration,
}

impl Telemetry {
    /// A readable table.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "=== telemetry: {:.3} s wall ===",
            self.wall.as_secs_f64()
        );
        for c in &self.cores {
            let _ = writeln!(
                s,
                "core {}: {} exits, {:.3} s in guest, {} interrupts injected",
                c.core,
                c.total_exits(),
                c.guest_time.as_secs_f64(),
                c.injected
            );
            for (name, v) in &c.backend {
                let _ = writeln!(s, "  {name:<28} {v:>12}");
            }
            for k in ExitKind::ALL {
                let n = c.count(k);
                if n > 0 {
                    let t = c.time[k as usize];
                    let _ = writeln!(
                        s,
                        "  {:<12} {:>10}  handling {:>9.3} ms  ({:.2} us/exit)",
                        k.name(),
                        n,
                        t.as_secs_f64() * 1e3,
                        t.as_secs_f64() * 1e6 / n as f64
                    );
                }
            }
        }
        for (what, list) in [
            ("port", &self.unclaimed_ports),
            ("mmio", &self.unclaimed_mmio),
        ] {
            if !list.is_empty() {
                let _ = writeln!(s, "unclaimed {what} accesses:");
                for (a, n) in list {
                    let _ = writeln!(s, "  {a:#x}: {n}");
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_render() {
        let mut c = CoreStats::new(0);
        c.record(ExitKind::IoOut, Duration::from_micros(3));
        c.record(ExitKind::IoOut, Duration::from_micros(5));
        c.record(ExitKind::Hlt, Duration::from_micros(1));
        assert_eq!(c.count(ExitKind::IoOut), 2);
        assert_eq!(c.total_exits(), 3);
        let t = Telemetry {
            cores: vec![c],
            unclaimed_ports: vec![(0x80, 2)],
            ..Default::default()
        };
        let r = t.render();
        assert!(
            r.contains("io-out") && r.contains("4.00 us/exit") && r.contains("0x80: 2"),
            "{r}"
        );
        assert!(!r.contains("mmio-read"));
    }
}
