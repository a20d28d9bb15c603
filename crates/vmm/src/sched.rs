//! VSched: periodic real-time reservations for vCPUs. A reservation is (period, slice): the
//! vCPU gets `slice` of CPU time in every `period`, in microseconds as in Palacios' EDF
//! scheduler (`<core period=".." slice="..">`).
//!
//! On Linux the vCPU thread runs under SCHED_DEADLINE (the kernel's EDF: runtime = slice,
//! deadline = period = period). Where the kernel refuses it (not privileged, an old kernel),
//! the core's own loop throttles the thread: once it has used its slice in the current
//! period it sleeps until the next one (a user-level EDF that enforces the cap; it cannot
//! make the host give the thread its slice). The mechanism is chosen per core, automatically,
//! and reported.
//!
//! Admission control: the reservations of the VM together may not need more CPU than the
//! host allows real-time work (CPUs x sched_rt_runtime_us / sched_rt_period_us).
//! Telemetry per core: CPU time and wall time under the reservation (achieved utilization),
//! periods and deadline misses (a period in which a busy core got less than 90 % of its slice).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shortest and longest period accepted (µs).
pub const MIN_PERIOD_US: u64 = 1_000;
pub const MAX_PERIOD_US: u64 = 10_000_000;
/// Shortest slice accepted (µs).
pub const MIN_SLICE_US: u64 = 100;

/// (period, slice) in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    pub period_us: u64,
    pub slice_us: u64,
}

impl Reservation {
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_PERIOD_US..=MAX_PERIOD_US).contains(&self.period_us) {
            return Err(format!(
                "a period is {MIN_PERIOD_US} to {MAX_PERIOD_US} µs, not {}",
                self.period_us
            ));
        }
        if self.slice_us < MIN_SLICE_US || self.slice_us > self.period_us {
            return Err(format!(
                "a slice is {MIN_SLICE_US} µs to the period ({} µs), not {}",
                self.period_us, self.slice_us
            ));
        }
        Ok(())
    }

    pub fn utilization(&self) -> f64 {
        self.slice_us as f64 / self.period_us as f64
    }
}

/// How much CPU the host lets real-time work use: (CPUs, the allowed fraction of each, a
/// description for messages).
pub fn host_limit() -> (f64, String) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let read = |p: &str| -> Option<i64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let frac = match (
        read("/proc/sys/kernel/sched_rt_runtime_us"),
        read("/proc/sys/kernel/sched_rt_period_us"),
    ) {
        (Some(r), Some(p)) if r >= 0 && p > 0 => r as f64 / p as f64,
        (Some(-1), _) => 1.0,
        _ => 0.95,
    };
    (
        cpus * frac,
        format!(
            "{cpus} CPUs x {:.0} % (sched_rt_runtime_us / sched_rt_period_us)",
            frac * 100.0
        ),
    )
}

/// Check a set of reservations against the host's limit; the error gives the numbers.
pub fn admit(set: &[(u32, Reservation)]) -> Result<(), String> {
    for (cpu, r) in set {
        r.check().map_err(|e| format!("vCPU {cpu}: {e}"))?;
    }
    let total: f64 = set.iter().map(|(_, r)| r.utilization()).sum();
    let (limit, how) = host_limit();
    if total > limit + 1e-9 {
        let parts: Vec<String> = set
            .iter()
            .map(|(c, r)| {
                format!(
                    "vCPU {c} {}/{} µs = {:.3}",
                    r.slice_us,
                    r.period_us,
                    r.utilization()
                )
            })
            .collect();
        return Err(format!(
            "the reservations need {total:.3} CPUs ({}) but the host allows {limit:.3} ({how})",
            parts.join(", ")
        ));
    }
    Ok(())
}

/// What a core does while its guest is idle (HLT): Palacios' `<perftune><group name="yield">`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum YieldStrategy {
    /// Sleep until an interrupt is due (the host gets the CPU at once).
    #[default]
    Friendly,
    /// Spin, never giving the CPU up (lowest wake-up latency, a full CPU per idle core).
    Greedy,
    /// Spin for `threshold_us`, then sleep in steps of `time_us`.
    Adaptive,
}

/// The yield policy of idle cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct YieldPolicy {
    pub strategy: YieldStrategy,
    pub threshold_us: u64,
    pub time_us: u64,
}

/// How a core's reservation is enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    #[default]
    None,
    SchedDeadline,
    UserEdf,
}

/// What a core reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CoreReport {
    pub reservation: Option<Reservation>,
    pub mechanism: Mechanism,
    /// Why SCHED_DEADLINE was not used, when it was not.
    pub fallback_reason: Option<String>,
    /// Under the current reservation: thread CPU time and wall time.
    pub cpu_ns: u64,
    pub wall_ns: u64,
    pub utilization: f64,
    pub periods: u64,
    pub misses: u64,
}

/// The VM's reservations and what the cores report (shared with the control API).
pub struct VSched {
    res: Vec<Mutex<Option<Reservation>>>,
    reports: Vec<Mutex<CoreReport>>,
    generation: AtomicU64,
}

impl VSched {
    pub fn new(initial: Vec<Option<Reservation>>) -> VSched {
        VSched {
            reports: initial
                .iter()
                .map(|r| {
                    Mutex::new(CoreReport {
                        reservation: *r,
                        ..CoreReport::default()
                    })
                })
                .collect(),
            res: initial.into_iter().map(Mutex::new).collect(),
            generation: AtomicU64::new(1),
        }
    }

    pub fn cores(&self) -> usize {
        self.res.len()
    }

    /// Change reservations (`None` removes one), after admission control over the whole set.
    pub fn set(&self, changes: &[(u32, Option<Reservation>)]) -> Result<(), String> {
        let mut next: Vec<Option<Reservation>> = self.res.iter().map(|r| *lock(r)).collect();
        for (cpu, r) in changes {
            let slot = next
                .get_mut(*cpu as usize)
                .ok_or_else(|| format!("the VM has no vCPU {cpu}"))?;
            *slot = *r;
        }
        let set: Vec<(u32, Reservation)> = next
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.map(|r| (i as u32, r)))
            .collect();
        admit(&set)?;
        for (i, r) in next.into_iter().enumerate() {
            *lock(&self.res[i]) = r;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub fn reservation(&self, cpu: u32) -> Option<Reservation> {
        self.res.get(cpu as usize).and_then(|r| *lock(r))
    }

    pub fn reports(&self) -> Vec<CoreReport> {
        self.reports.iter().map(|r| lock(r).clone()).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This thread's CPU time.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// struct sched_attr (include/uapi/linux/sched/types.h), the part SCHED_DEADLINE uses.
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

const SCHED_OTHER: u32 = 0;
const SCHED_DEADLINE: u32 = 6;

/// Put the calling thread under SCHED_DEADLINE with `r`, or back under SCHED_OTHER.
fn set_deadline(r: Option<Reservation>) -> std::io::Result<()> {
    let mut a = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: SCHED_OTHER,
        flags: 0,
        nice: 0,
        priority: 0,
        runtime: 0,
        deadline: 0,
        period: 0,
    };
    if let Some(r) = r {
        a.policy = SCHED_DEADLINE;
        a.runtime = r.slice_us * 1000;
        a.deadline = r.period_us * 1000;
        a.period = r.period_us * 1000;
    }
    // SAFETY: sched_setattr(0, attr, 0) reads one sched_attr of the size given in it and
    // applies it to the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &mut a as *mut SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One core's enforcement and accounting, owned by its thread.
pub struct CoreThrottle {
    cpu: u32,
    generation: u64,
    res: Option<Reservation>,
    mechanism: Mechanism,
    started: Instant,
    cpu_at_start: u64,
    period_start: Instant,
    cpu_at_period: u64,
    /// The core was halted at some point in this period (not a miss then).
    idle_in_period: bool,
    periods: u64,
    misses: u64,
    last_report: Instant,
}

impl CoreThrottle {
    pub fn new(cpu: u32) -> CoreThrottle {
        let now = Instant::now();
        CoreThrottle {
            cpu,
            generation: 0,
            res: None,
            mechanism: Mechanism::None,
            started: now,
            cpu_at_start: 0,
            period_start: now,
            cpu_at_period: 0,
            idle_in_period: false,
            periods: 0,
            misses: 0,
            last_report: now,
        }
    }

    /// Apply a changed reservation (on the core's own thread).
    fn apply(&mut self, vs: &VSched) {
        self.generation = vs.generation.load(Ordering::Acquire);
        let r = vs.reservation(self.cpu);
        let mut fallback = None;
        self.mechanism = match r {
            None => {
                if self.mechanism == Mechanism::SchedDeadline {
                    let _ = set_deadline(None);
                }
                Mechanism::None
            }
            Some(r) => match set_deadline(Some(r)) {
                Ok(()) => Mechanism::SchedDeadline,
                Err(e) => {
                    if self.mechanism == Mechanism::SchedDeadline {
                        let _ = set_deadline(None);
                    }
                    fallback = Some(format!("SCHED_DEADLINE refused: {e}"));
                    Mechanism::UserEdf
                }
            },
        };
        if let Some(why) = &fallback {
            tracing::info!("vCPU {}: {why}; throttling in the VMM", self.cpu);
        }
        self.res = r;
        let now = Instant::now();
        let cpu_ns = thread_cpu_ns();
        self.started = now;
        self.cpu_at_start = cpu_ns;
        self.period_start = now;
        self.cpu_at_period = cpu_ns;
        self.idle_in_period = false;
        self.periods = 0;
        self.misses = 0;
        let mut rep = lock(&vs.reports[self.cpu as usize]);
        *rep = CoreReport {
            reservation: r,
            mechanism: self.mechanism,
            fallback_reason: fallback,
            ..CoreReport::default()
        };
    }

    /// Lines for the end-of-run telemetry (none without a reservation).
    pub fn telemetry(&self) -> Vec<(String, u64)> {
        let Some(r) = self.res else {
            return Vec::new();
        };
        let cpu = thread_cpu_ns().saturating_sub(self.cpu_at_start);
        let wall = self.started.elapsed().as_nanos() as u64;
        vec![
            (
                format!(
                    "vsched {}/{} us ({:?})",
                    r.slice_us, r.period_us, self.mechanism
                ),
                1,
            ),
            ("vsched cpu ms".into(), cpu / 1_000_000),
            ("vsched wall ms".into(), wall / 1_000_000),
            (
                "vsched utilization permille".into(),
                (cpu as u128 * 1000 / u128::from(wall.max(1))) as u64,
            ),
            ("vsched periods".into(), self.periods),
            ("vsched deadline misses".into(), self.misses),
        ]
    }

    /// Before each entry into the guest (`halted`: the core was idle since the last call).
    pub fn tick(&mut self, vs: &VSched, halted: bool) {
        let g = vs.generation.load(Ordering::Relaxed);
        if g != self.generation {
            // Another core's change leaves this one's reservation and figures alone.
            if vs.reservation(self.cpu) != self.res || self.generation == 0 {
                self.apply(vs);
            }
            self.generation = g;
        }
        let Some(r) = self.res else { return };
        self.idle_in_period |= halted;
        let period = Duration::from_micros(r.period_us);
        let mut now = Instant::now();
        let mut cpu_ns = thread_cpu_ns();
        if self.mechanism == Mechanism::UserEdf
            && cpu_ns - self.cpu_at_period >= r.slice_us * 1000
            && now < self.period_start + period
        {
            // The slice is used up: wait for the next period.
            std::thread::sleep(self.period_start + period - now);
            now = Instant::now();
            cpu_ns = thread_cpu_ns();
        }
        if now >= self.period_start + period {
            let got = cpu_ns - self.cpu_at_period;
            let elapsed = now - self.period_start;
            let n = (elapsed.as_nanos() / period.as_nanos()).max(1) as u64;
            self.periods += n;
            // A busy core owed `slice` per period it spanned.
            if !self.idle_in_period && got * 10 < r.slice_us * 1000 * 9 * n {
                self.misses += 1;
            }
            self.period_start += period * n as u32;
            self.cpu_at_period = cpu_ns;
            self.idle_in_period = false;
        }
        if now - self.last_report >= Duration::from_millis(100) {
            self.last_report = now;
            let wall = (now - self.started).as_nanos() as u64;
            let cpu = cpu_ns - self.cpu_at_start;
            let mut rep = lock(&vs.reports[self.cpu as usize]);
            rep.cpu_ns = cpu;
            rep.wall_ns = wall;
            rep.utilization = if wall > 0 {
                cpu as f64 / wall as f64
            } else {
                0.0
            };
            rep.periods = self.periods;
            rep.misses = self.misses;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_checked_and_admitted_against_the_host() {
        let r = |p, s| Reservation {
            period_us: p,
            slice_us: s,
        };
        assert!(r(10_000, 3_000).check().is_ok());
        assert!(r(500, 100).check().is_err());
        assert!(r(10_000, 20_000).check().unwrap_err().contains("slice"));
        let (limit, _) = host_limit();
        assert!(admit(&[(0, r(10_000, 3_000)), (1, r(20_000, 10_000))]).is_ok());
        // More cores at full slices than the host has: refused with the numbers.
        let too_many: Vec<(u32, Reservation)> = (0..(limit.ceil() as u32 + 1))
            .map(|c| (c, r(10_000, 10_000)))
            .collect();
        let e = admit(&too_many).unwrap_err();
        assert!(e.contains("the reservations need"), "{e}");
        assert!(e.contains("vCPU 0 10000/10000 µs = 1.000"), "{e}");
        assert!(e.contains("but the host allows"), "{e}");
    }

    #[test]
    fn set_is_all_or_nothing() {
        let vs = VSched::new(vec![None, None]);
        let r = Reservation {
            period_us: 10_000,
            slice_us: 3_000,
        };
        vs.set(&[(0, Some(r))]).unwrap();
        assert_eq!(vs.reservation(0), Some(r));
        assert!(vs.set(&[(5, Some(r))]).unwrap_err().contains("no vCPU 5"));
        let (limit, _) = host_limit();
        let full = Reservation {
            period_us: 10_000,
            slice_us: 10_000,
        };
        if limit < 2.0 {
            assert!(vs.set(&[(0, Some(full)), (1, Some(full))]).is_err());
            assert_eq!(vs.reservation(0), Some(r), "a refused set changes nothing");
        }
    }

    #[test]
    fn user_level_throttle_caps_a_busy_thread() {
        // A thread that asks for no SCHED_DEADLINE (it may be refused here anyway) measures
        // the user-level mechanism directly: 30 % of each 10 ms period.
        let vs = VSched::new(vec![Some(Reservation {
            period_us: 10_000,
            slice_us: 3_000,
        })]);
        let mut t = CoreThrottle::new(0);
        t.apply(&vs);
        if t.mechanism == Mechanism::SchedDeadline {
            let _ = set_deadline(None);
        }
        t.mechanism = Mechanism::UserEdf;
        let start = Instant::now();
        let cpu0 = thread_cpu_ns();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(500) {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            t.tick(&vs, false);
        }
        std::hint::black_box(x);
        let util = (thread_cpu_ns() - cpu0) as f64 / start.elapsed().as_nanos() as f64;
        assert!(util < 0.40, "utilization {util}");
    }
}
