//! The per-VM control channel (pause, resume, stop) and the wake-up of halted or running cores.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::backend::{CoreMode, VcpuState};
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
    /// The VM moved to another VMM (a live migration); it runs there now.
    Migrated(String),
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
            Outcome::Migrated(to) => write!(f, "migrated to {to}"),
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

    /// Make core `cpu` leave the backend's run() if it is in it (no event for it).
    pub fn kick(&self, cpu: u32) {
        let k = lock(&self.kickers).get(cpu as usize).cloned().flatten();
        if let Some(k) = k {
            k.kick();
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
    /// Core threads that are alive (started and not finished).
    live: u32,
    /// Core threads parked by a pause (they serve commands while parked).
    parked: u32,
}

/// A command run on a core's own thread at a safe point (between exits, or while parked).
pub type CoreCommand = Box<dyn FnOnce(&mut dyn crate::backend::Vcpu) + Send>;

/// What a command sent to a VM could not do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("the VM has ended ({0})")]
    Ended(String),
    #[error("no core {0} in this VM")]
    NoSuchCore(u32),
    #[error("core {cpu} did not answer within {ms} ms")]
    Timeout { cpu: u32, ms: u64 },
    #[error("the VM did not pause within {0} ms")]
    PauseTimeout(u64),
    #[error("the VM must be paused for this")]
    NotPaused,
    #[error("a checkpoint is being saved: try again when it is done")]
    Busy,
    #[error("dirty-page tracking is not on (start it first)")]
    NotTracking,
}

/// Reading or writing a core's state failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreStateError {
    #[error("{0}")]
    Control(#[from] ControlError),
    #[error("{0}")]
    Backend(#[from] crate::backend::BackendError),
}

/// Parts of the VM that pause stops besides the cores: guest time and the timer thread.
pub trait Quiesce: Send + Sync {
    /// Stop (true) or restart (false).
    fn quiesce(&self, stop: bool);
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
    /// Commands for each core, and a flag the exit loop checks without locking.
    commands: Vec<Mutex<std::collections::VecDeque<CoreCommand>>>,
    has_commands: Vec<AtomicBool>,
    /// What each core does ([`CoreMode`] as u8), kept by the exit loop.
    modes: Vec<std::sync::atomic::AtomicU8>,
    /// A command replaced the core's whole state while it was parked.
    replaced: Vec<AtomicBool>,
    /// The guest TSC of each parked core when it parked (`u64::MAX`: not parked): the TSC
    /// a checkpoint records, as the guest's time stopped there.
    parked_tsc: Vec<std::sync::atomic::AtomicU64>,
    quiesce: Mutex<Vec<Arc<dyn Quiesce>>>,
    /// Run-time controls devices offer the control API (a balloon's target), by type. Held
    /// weakly: the VM handle outlives its devices.
    controls: Mutex<Vec<std::sync::Weak<dyn std::any::Any + Send + Sync>>>,
    /// What a checkpoint needs (set when the VM is built).
    parts: std::sync::OnceLock<Arc<crate::snapshot::VmParts>>,
    /// The VM's cores have been started (devices may take host input from now on).
    started: AtomicBool,
    /// A save is collecting state: a resume must wait.
    held: AtomicBool,
    /// Serialises pause and resume (and the clock and timer quiescing they do).
    ctl: Mutex<()>,
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
                live: 0,
                parked: 0,
            }),
            starts: (0..cores).map(|_| Mutex::new(None)).collect(),
            cond: Condvar::new(),
            wakers: Wakers::new(cores, stopping.clone()),
            stopping,
            paused: AtomicBool::new(false),
            commands: (0..cores).map(|_| Mutex::default()).collect(),
            has_commands: (0..cores).map(|_| AtomicBool::new(false)).collect(),
            modes: (0..cores)
                .map(|_| std::sync::atomic::AtomicU8::new(0))
                .collect(),
            replaced: (0..cores).map(|_| AtomicBool::new(false)).collect(),
            parked_tsc: (0..cores)
                .map(|_| std::sync::atomic::AtomicU64::new(u64::MAX))
                .collect(),
            quiesce: Mutex::new(Vec::new()),
            controls: Mutex::new(Vec::new()),
            parts: std::sync::OnceLock::new(),
            started: AtomicBool::new(false),
            held: AtomicBool::new(false),
            ctl: Mutex::new(()),
        }))
    }

    pub fn wakers(&self) -> &Wakers {
        &self.0.wakers
    }

    /// The parts a checkpoint reads (memory, clock, devices), once the VM is built.
    pub fn parts(&self) -> Option<&Arc<crate::snapshot::VmParts>> {
        self.0.parts.get()
    }

    pub fn set_parts(&self, p: Arc<crate::snapshot::VmParts>) {
        let _ = self.0.parts.set(p);
    }

    /// Number of cores.
    pub fn cores(&self) -> u32 {
        self.0.starts.len() as u32
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
        for q in lock(&self.0.quiesce).iter() {
            q.quiesce(false);
        }
    }

    /// Fast check for the exit loop.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::Acquire)
    }

    /// Offer a device's run-time control to the control API (found by type with
    /// [`VmHandle::controls`]).
    pub fn add_control<T: std::any::Any + Send + Sync>(&self, c: &Arc<T>) {
        let c: Arc<dyn std::any::Any + Send + Sync> = c.clone();
        lock(&self.0.controls).push(Arc::downgrade(&c));
    }

    /// The live controls of type `T`, in the order the devices were created.
    pub fn controls<T: std::any::Any + Send + Sync>(&self) -> Vec<Arc<T>> {
        lock(&self.0.controls)
            .iter()
            .filter_map(|w| w.upgrade())
            .filter_map(|a| a.downcast::<T>().ok())
            .collect()
    }

    /// Something besides the cores that pause must stop (guest time, timers, I/O workers).
    pub fn add_quiesce(&self, q: Arc<dyn Quiesce>) {
        lock(&self.0.quiesce).push(q);
    }

    /// `n` core threads are about to start (set before spawning them, so that a pause asked
    /// for meanwhile waits for them).
    pub fn expect_cores(&self, n: u32) {
        lock(&self.0.state).live += n;
        self.0.started.store(true, Ordering::Release);
    }

    /// Whether the VM runs (its cores were started). Before that a restore may still replace
    /// device state, so host input waits.
    pub fn has_started(&self) -> bool {
        self.0.started.load(Ordering::Acquire)
    }

    /// A core thread has finished (or was never started).
    pub fn core_exited(&self) {
        let mut s = lock(&self.0.state);
        s.live = s.live.saturating_sub(1);
        drop(s);
        self.0.cond.notify_all();
    }

    /// Pause the VM: returns once every core is out of guest mode and parked, guest time has
    /// stopped and no timer callback runs; how long that took. Paused again: no effect.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, ControlError> {
        let t0 = std::time::Instant::now();
        // One pause or resume at a time, so the clock and timers follow the paused flag.
        let _ctl = lock(&self.0.ctl);
        let was_paused = {
            let mut s = lock(&self.0.state);
            if let Some(o) = &s.outcome {
                return Err(ControlError::Ended(o.to_string()));
            }
            let was = s.paused;
            s.paused = true;
            self.0.paused.store(true, Ordering::Release);
            was
        };
        if !was_paused {
            for q in lock(&self.0.quiesce).iter() {
                q.quiesce(true);
            }
        }
        self.0.wakers.wake_all();
        let mut s = lock(&self.0.state);
        while s.parked < s.live && s.outcome.is_none() {
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                drop(s);
                if !was_paused {
                    self.resume_locked();
                }
                return Err(ControlError::PauseTimeout(timeout.as_millis() as u64));
            }
            s = self
                .0
                .cond
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if let Some(o) = &s.outcome {
            return Err(ControlError::Ended(o.to_string()));
        }
        Ok(if was_paused {
            Duration::ZERO
        } else {
            t0.elapsed()
        })
    }

    /// Keep the VM paused (a save collects its state): [`VmHandle::try_resume`] refuses.
    pub fn hold_paused(&self, hold: bool) {
        self.0.held.store(hold, Ordering::Release);
    }

    /// Resume unless a save holds the VM paused.
    pub fn try_resume(&self) -> Result<(), ControlError> {
        let _ctl = lock(&self.0.ctl);
        if self.0.held.load(Ordering::Acquire) {
            return Err(ControlError::Busy);
        }
        self.resume_locked();
        Ok(())
    }

    /// Let a paused VM run again (guest time continues where it stopped). A VM a save or a
    /// migration's last copy holds paused stays paused.
    pub fn resume(&self) {
        let _ctl = lock(&self.0.ctl);
        if self.0.held.load(Ordering::Acquire) {
            return;
        }
        self.resume_locked();
    }

    /// Resume even a held VM (the holder itself, when it is done).
    pub fn release_and_resume(&self) {
        let _ctl = lock(&self.0.ctl);
        self.0.held.store(false, Ordering::Release);
        self.resume_locked();
    }

    fn resume_locked(&self) {
        {
            let mut s = lock(&self.0.state);
            if !s.paused {
                return;
            }
            s.paused = false;
            self.0.paused.store(false, Ordering::Release);
        }
        for q in lock(&self.0.quiesce).iter() {
            q.quiesce(false);
        }
        self.0.cond.notify_all();
        self.0.wakers.wake_all();
    }

    pub fn is_paused(&self) -> bool {
        self.0.paused.load(Ordering::Acquire)
    }

    /// Run `f` on core `cpu`'s thread at its next safe point (between two exits, or at once
    /// if it is parked or halted) and return its result.
    pub fn with_core<R: Send + 'static>(
        &self,
        cpu: u32,
        timeout: Duration,
        f: impl FnOnce(&mut dyn crate::backend::Vcpu) -> R + Send + 'static,
    ) -> Result<R, ControlError> {
        let q = self
            .0
            .commands
            .get(cpu as usize)
            .ok_or(ControlError::NoSuchCore(cpu))?;
        if let Some(o) = self.outcome() {
            return Err(ControlError::Ended(o.to_string()));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        lock(q).push_back(Box::new(move |v: &mut dyn crate::backend::Vcpu| {
            let _ = tx.send(f(v));
        }));
        self.0.has_commands[cpu as usize].store(true, Ordering::Release);
        self.0.wakers.wake(cpu);
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ControlError::Ended(
                self.outcome()
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "core thread gone".into()),
            )),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(ControlError::Timeout {
                cpu,
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// The exit loop of core `cpu`: run queued commands (cheap when there are none).
    pub fn run_commands(&self, cpu: u32, vcpu: &mut dyn crate::backend::Vcpu) {
        let Some(flag) = self.0.has_commands.get(cpu as usize) else {
            return;
        };
        if !flag.load(Ordering::Acquire) {
            return;
        }
        loop {
            let next = {
                let mut q = lock(&self.0.commands[cpu as usize]);
                let c = q.pop_front();
                if q.is_empty() {
                    flag.store(false, Ordering::Release);
                }
                c
            };
            match next {
                Some(c) => c(vcpu),
                None => break,
            }
        }
    }

    /// Drop the commands nobody will run (the core's thread is ending): their senders see
    /// the VM ended.
    pub fn drop_commands(&self, cpu: u32) {
        if let Some(q) = self.0.commands.get(cpu as usize) {
            lock(q).clear();
        }
    }

    /// Called by core `cpu` when it sees [`VmHandle::is_paused`]: acknowledge, serve commands
    /// until resumed or stopped.
    pub fn park(&self, cpu: u32, vcpu: &mut dyn crate::backend::Vcpu, tsc: Option<u64>) {
        if let (Some(t), Some(slot)) = (tsc, self.0.parked_tsc.get(cpu as usize)) {
            slot.store(t, Ordering::Release);
        }
        {
            let mut s = lock(&self.0.state);
            s.parked += 1;
        }
        self.0.cond.notify_all();
        loop {
            self.run_commands(cpu, vcpu);
            if !self.is_paused() || self.is_stopping() {
                break;
            }
            self.0.wakers.wait(cpu, None);
        }
        // Commands that arrived with the resume.
        self.run_commands(cpu, vcpu);
        if let Some(slot) = self.0.parked_tsc.get(cpu as usize) {
            slot.store(u64::MAX, Ordering::Release);
        }
        let mut s = lock(&self.0.state);
        s.parked = s.parked.saturating_sub(1);
    }

    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.0.state).outcome.clone()
    }

    /// What core `cpu` does (kept by the exit loop; set before the VM runs by a restore).
    pub fn core_mode(&self, cpu: u32) -> CoreMode {
        match self
            .0
            .modes
            .get(cpu as usize)
            .map(|m| m.load(Ordering::Acquire))
        {
            Some(1) => CoreMode::Running,
            Some(2) => CoreMode::Halted,
            Some(3) => CoreMode::Off,
            _ => CoreMode::WaitStart,
        }
    }

    pub fn set_core_mode(&self, cpu: u32, mode: CoreMode) {
        if let Some(m) = self.0.modes.get(cpu as usize) {
            m.store(
                match mode {
                    CoreMode::WaitStart => 0,
                    CoreMode::Running => 1,
                    CoreMode::Halted => 2,
                    CoreMode::Off => 3,
                },
                Ordering::Release,
            );
        }
    }

    /// The complete state of core `cpu` (its own thread reads it; the VM should be paused
    /// for a consistent snapshot of several cores).
    pub fn save_core(&self, cpu: u32, timeout: Duration) -> Result<VcpuState, CoreStateError> {
        let mode = self.core_mode(cpu);
        let mut s = self.with_core(cpu, timeout, |v| v.save_state())??;
        s.mode = mode;
        if mode == CoreMode::WaitStart {
            s.pending_start = self
                .0
                .starts
                .get(cpu as usize)
                .and_then(|st| lock(st).clone());
        }
        // A parked core's TSC stopped when it parked (the backend's keeps counting).
        let parked = self
            .0
            .parked_tsc
            .get(cpu as usize)
            .map(|t| t.load(Ordering::Acquire))
            .unwrap_or(u64::MAX);
        if parked != u64::MAX {
            for m in s
                .msrs
                .iter_mut()
                .filter(|m| m.0 == palacios_x86::msr::IA32_TSC)
            {
                m.1 = parked;
            }
        }
        Ok(s)
    }

    /// Replace the complete state of core `cpu` (VM paused).
    pub fn restore_core(
        &self,
        cpu: u32,
        state: VcpuState,
        timeout: Duration,
    ) -> Result<(), CoreStateError> {
        if !self.is_paused() {
            return Err(ControlError::NotPaused.into());
        }
        let mode = state.mode;
        self.with_core(cpu, timeout, move |v| v.restore_state(&state))??;
        self.set_core_mode(cpu, mode);
        if let Some(r) = self.0.replaced.get(cpu as usize) {
            r.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Start dirty-page tracking for migration (every page written from now on is marked).
    pub fn start_dirty_tracking(&self) -> Result<Arc<crate::dirty::DirtyLog>, CoreStateError> {
        let parts = self.parts().cloned().ok_or(ControlError::NotPaused)?;
        let id = {
            let mut p = crate::bus::lock(&parts.dirty.primary);
            if let Some(old) = p.take() {
                parts.dirty.remove_tap(old);
            }
            let id = parts.dirty.add_tap();
            *p = Some(id);
            id
        };
        self.attach_tap(&parts, id)?;
        Ok(parts.dirty.clone())
    }

    /// A consumer of its own (ConCORD's content tracking): rounds independent of migration's.
    pub fn dirty_tap(&self) -> Result<DirtyTap, CoreStateError> {
        let parts = self.parts().cloned().ok_or(ControlError::NotPaused)?;
        let id = parts.dirty.add_tap();
        let tap = DirtyTap {
            handle: self.clone(),
            id,
        };
        self.attach_tap(&parts, id)?;
        Ok(tap)
    }

    /// Tell the backends and cores about tracking, for a consumer just added.
    fn attach_tap(&self, parts: &crate::snapshot::VmParts, id: u64) -> Result<(), CoreStateError> {
        // Marks made meanwhile stay: clearing them after the cores synchronised could drop the
        // mark of a write translation granted in between (a page would then be missed).
        let _ = parts.dirty.take_tap(id);
        let r = parts
            .backend_obj
            .set_dirty_log(Some(parts.dirty.clone()))
            .map_err(CoreStateError::from)
            .and_then(|_| self.sync_dirty_cores());
        if r.is_err() {
            self.drop_tap(parts, id);
        }
        r
    }

    /// The pages written since migration's last round (or since tracking started);
    /// afterwards every page's next write is marked again.
    pub fn dirty_round(&self) -> Result<crate::dirty::DirtySet, CoreStateError> {
        let parts = self.parts().cloned().ok_or(ControlError::NotPaused)?;
        let id = (*crate::bus::lock(&parts.dirty.primary)).ok_or(ControlError::NotTracking)?;
        self.round_of(&parts, id)
    }

    fn round_of(
        &self,
        parts: &crate::snapshot::VmParts,
        id: u64,
    ) -> Result<crate::dirty::DirtySet, CoreStateError> {
        let mut set = parts.dirty.take_tap(id);
        parts.backend_obj.collect_dirty(&parts.dirty)?;
        set.union(&parts.dirty.take_tap(id));
        self.sync_dirty_cores()?;
        Ok(set)
    }

    /// Stop migration's tracking (tracking stays on for other consumers).
    pub fn stop_dirty_tracking(&self) {
        if let Some(parts) = self.parts() {
            let id = crate::bus::lock(&parts.dirty.primary).take();
            if let Some(id) = id {
                self.drop_tap(parts, id);
            }
        }
    }

    fn drop_tap(&self, parts: &crate::snapshot::VmParts, id: u64) {
        if !parts.dirty.remove_tap(id) {
            let _ = parts.backend_obj.set_dirty_log(None);
            let _ = parts.dirty.take();
        }
    }

    /// Every core drops write permissions granted before now (the emulator's TLB).
    fn sync_dirty_cores(&self) -> Result<(), CoreStateError> {
        if !self.has_started() {
            return Ok(());
        }
        for cpu in 0..self.cores() {
            match self.with_core(cpu, Duration::from_secs(10), |v| v.sync_dirty()) {
                Ok(()) => {}
                // A VM that ended has no writers left.
                Err(ControlError::Ended(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Whether a command replaced core `cpu`'s state since the last call.
    pub fn take_state_replaced(&self, cpu: u32) -> bool {
        self.0
            .replaced
            .get(cpu as usize)
            .is_some_and(|r| r.swap(false, Ordering::AcqRel))
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
    fn pause_with_no_live_core_returns_at_once_and_resume_clears_it() {
        let h = VmHandle::new(1);
        h.pause(Duration::from_secs(1)).unwrap();
        assert!(h.is_paused());
        h.resume();
        assert!(!h.is_paused());
        h.stop(Outcome::Stopped);
        assert!(matches!(
            h.pause(Duration::from_secs(1)),
            Err(ControlError::Ended(_))
        ));
    }

    #[test]
    fn wake_before_wait_is_not_lost() {
        let h = VmHandle::new(1);
        h.wakers().wake(0);
        h.wakers().wait(0, Some(Duration::from_secs(5)));
        assert!(h.outcome().is_none());
    }
}

/// A consumer of the VM's dirty-page log with rounds of its own (see [`crate::dirty`]);
/// dropping it ends its tracking.
pub struct DirtyTap {
    handle: VmHandle,
    id: u64,
}

impl DirtyTap {
    /// The pages written since this consumer's previous round (or since it was made).
    pub fn round(&self) -> Result<crate::dirty::DirtySet, CoreStateError> {
        let parts = self
            .handle
            .parts()
            .cloned()
            .ok_or(ControlError::NotPaused)?;
        self.handle.round_of(&parts, self.id)
    }
}

impl Drop for DirtyTap {
    fn drop(&mut self) {
        if let Some(parts) = self.handle.parts() {
            self.handle.drop_tap(parts, self.id);
        }
    }
}
