//! The per-VM control channel (pause, resume, stop) and the wake-up of halted or running cores.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::bus::lock;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every started core halted with interrupts disabled.
    Halted,
    /// The guest wrote `value` to the debug-exit device.
    DebugExit(u32),
    /// Stopped from the outside (control channel, Ctrl-C).
    Stopped,
    /// The guest asked for a reset and the VM is configured to stop on reset.
    Reset,
    /// The guest powered the machine off (ACPI sleep state S5).
    PowerOff,
    /// The guest asked for a reset and the VM is configured to reboot: the embedder builds
    /// the VM afresh (power-on state, guest image reloaded) and runs it again.
    Reboot,
    /// Triple fault (or another shutdown condition) on a core.
    Shutdown { vcpu: u32, rip: u64 },
    /// A backend or VMM error.
    Failed(String),
}

impl Outcome {
    /// Whether this is a VM failure (as opposed to a guest-requested or user-requested end).
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Shutdown { .. } | Outcome::Failed(_))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Halted => write!(f, "guest halted"),
            Outcome::DebugExit(v) => write!(f, "guest wrote {v:#x} to the debug-exit port"),
            Outcome::Stopped => write!(f, "stopped by request"),
            Outcome::Reset => write!(f, "guest requested a reset"),
            Outcome::PowerOff => write!(f, "guest powered off (ACPI S5)"),
            Outcome::Reboot => write!(f, "guest reset the machine (rebooting)"),
            Outcome::Shutdown { vcpu, rip } => {
                write!(f, "vCPU {vcpu}: triple fault / shutdown at RIP {rip:#x}")
            }
            Outcome::Failed(m) => write!(f, "VM failed: {m}"),
        }
    }
}

/// Something that can make a core's `run()` return promptly (a signal to its thread).
pub trait Kick: Send + Sync {
    fn kick(&self);
}

#[derive(Default)]
struct WakeState {
    /// A wake-up not yet consumed by [`Wakers::wait`].
    pending: bool,
    /// The core sleeps in [`Wakers::wait`] (a condition-variable notify reaches it; no kick).
    sleeping: bool,
}

struct CoreWake {
    state: Mutex<WakeState>,
    cond: Condvar,
}

/// Wake-up of each core: for a halted core a condition variable, for a running one a kick.
#[derive(Clone)]
pub struct Wakers {
    cores: Arc<Vec<CoreWake>>,
    kickers: Arc<Mutex<Vec<Option<Arc<dyn Kick>>>>>,
    stopping: Arc<AtomicBool>,
}

impl Wakers {
    fn new(cores: u32, stopping: Arc<AtomicBool>) -> Self {
        Wakers {
            cores: Arc::new(
                (0..cores)
                    .map(|_| CoreWake {
                        state: Mutex::new(WakeState::default()),
                        cond: Condvar::new(),
                    })
                    .collect(),
            ),
            kickers: Arc::new(Mutex::new((0..cores).map(|_| None).collect())),
            stopping,
        }
    }

    /// Number of cores.
    pub fn cores(&self) -> u32 {
        self.cores.len() as u32
    }

    /// Install the kicker of core `cpu` (done by the VM when it starts the core's thread).
    pub fn set_kicker(&self, cpu: u32, k: Option<Arc<dyn Kick>>) {
        if let Some(slot) = lock(&self.kickers).get_mut(cpu as usize) {
            *slot = k;
        }
    }

    /// Something happened for `cpu` (an interrupt became pending).
    pub fn wake(&self, cpu: u32) {
        let Some(c) = self.cores.get(cpu as usize) else {
            return;
        };
        let sleeping = {
            let mut st = lock(&c.state);
            st.pending = true;
            st.sleeping
        };
        c.cond.notify_all();
        // A core that is not asleep may be inside the backend's run(): make it return.
        if !sleeping {
            let k = lock(&self.kickers).get(cpu as usize).cloned().flatten();
            if let Some(k) = k {
                k.kick();
            }
        }
    }

    pub fn wake_all(&self) {
        for cpu in 0..self.cores() {
            self.wake(cpu);
        }
    }

    /// Block core `cpu` until it is woken, the VM stops, or `timeout` passes.
    pub fn wait(&self, cpu: u32, timeout: Option<Duration>) {
        let Some(c) = self.cores.get(cpu as usize) else {
            return;
        };
        let mut p = lock(&c.state);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        p.sleeping = true;
        while !p.pending && !self.stopping.load(Ordering::Acquire) {
            match deadline {
                None => p = c.cond.wait(p).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        break;
                    }
                    p = c
                        .cond
                        .wait_timeout(p, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        p.pending = false;
        p.sleeping = false;
    }
}

struct State {
    paused: bool,
    outcome: Option<Outcome>,
}

struct Shared {
    state: Mutex<State>,
    /// A core waits for a start state here (core 0 gets the loader's; the others get one from
    /// INIT/SIPI).
    starts: Vec<Mutex<Option<palacios_x86::CpuState>>>,
    cond: Condvar,
    stopping: Arc<AtomicBool>,
    paused: AtomicBool,
    wakers: Wakers,
}

/// A clonable handle on a VM's control channel.
#[derive(Clone)]
pub struct VmHandle(Arc<Shared>);

impl VmHandle {
    pub fn new(cores: u32) -> Self {
        let stopping = Arc::new(AtomicBool::new(false));
        VmHandle(Arc::new(Shared {
            state: Mutex::new(State {
                paused: false,
                outcome: None,
            }),
            starts: (0..cores).map(|_| Mutex::new(None)).collect(),
            cond: Condvar::new(),
            wakers: Wakers::new(cores, stopping.clone()),
            stopping,
            paused: AtomicBool::new(false),
        }))
    }

    pub fn wakers(&self) -> &Wakers {
        &self.0.wakers
    }

    /// Start core `cpu` in `state` (it is waiting for INIT/SIPI); false if there is no such core.
    pub fn start_core(&self, cpu: u32, state: palacios_x86::CpuState) -> bool {
        match self.0.starts.get(cpu as usize) {
            Some(s) => {
                *lock(s) = Some(state);
                self.0.wakers.wake(cpu);
                true
            }
            None => false,
        }
    }

    /// Take the start state of core `cpu`, if one was given.
    pub fn take_start(&self, cpu: u32) -> Option<palacios_x86::CpuState> {
        self.0.starts.get(cpu as usize).and_then(|s| lock(s).take())
    }

    /// End the VM. The first outcome wins; later ones are ignored.
    pub fn stop(&self, outcome: Outcome) {
        {
            let mut s = lock(&self.0.state);
            if s.outcome.is_none() {
                tracing::debug!("VM stopping: {outcome}");
                s.outcome = Some(outcome);
            }
            s.paused = false;
        }
        self.0.stopping.store(true, Ordering::Release);
        self.0.paused.store(false, Ordering::Release);
        self.0.cond.notify_all();
        self.0.wakers.wake_all();
    }

    /// Fast check for the exit loop.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::Acquire)
    }

    pub fn pause(&self) {
        let s = lock(&self.0.state);
        if s.outcome.is_none() {
            self.0.paused.store(true, Ordering::Release);
            drop(s);
            self.0.wakers.wake_all();
        }
    }

    pub fn resume(&self) {
        let _s = lock(&self.0.state);
        self.0.paused.store(false, Ordering::Release);
        self.0.cond.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.0.paused.load(Ordering::Acquire)
    }

    /// Called by a core that saw [`VmHandle::is_paused`]: park until resumed or stopped.
    pub fn wait_while_paused(&self) {
        let mut s = lock(&self.0.state);
        while self.0.paused.load(Ordering::Acquire) && s.outcome.is_none() {
            s = self.0.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.0.state).outcome.clone()
    }

    /// Block until the VM has an outcome, or `timeout` passes.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Outcome> {
        let mut s = lock(&self.0.state);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while s.outcome.is_none() {
            match deadline {
                None => s = self.0.cond.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        break;
                    }
                    s = self
                        .0
                        .cond
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        s.outcome.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_wins_and_wakes_waiters() {
        let h = VmHandle::new(2);
        let h2 = h.clone();
        let t = std::thread::spawn(move || {
            h2.wakers().wait(1, None);
            h2.is_stopping()
        });
        h.stop(Outcome::DebugExit(3));
        h.stop(Outcome::Halted);
        assert!(t.join().unwrap());
        assert_eq!(h.outcome(), Some(Outcome::DebugExit(3)));
        assert_eq!(
            h.wait(Some(Duration::from_millis(1))),
            Some(Outcome::DebugExit(3))
        );
    }

    #[test]
    fn pause_parks_until_resume() {
        let h = VmHandle::new(1);
        h.pause();
        assert!(h.is_paused());
        let h2 = h.clone();
        let t = std::thread::spawn(move || {
            h2.wait_while_paused();
            h2.is_paused()
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        h.resume();
        assert!(!t.join().unwrap());
    }

    #[test]
    fn wake_before_wait_is_not_lost() {
        let h = VmHandle::new(1);
        h.wakers().wake(0);
        h.wakers().wait(0, Some(Duration::from_secs(5)));
        assert!(h.outcome().is_none());
    }
}
