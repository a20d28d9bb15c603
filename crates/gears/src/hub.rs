//! The part the GEARS services of one VM share: the guest kernel's layout (from the helper
//! module's hypercall) and the one set of intercepts every core applies, merged from what each
//! service wants.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use palacios_vmm::hypercall::err;
use palacios_vmm::intercept::{Intercepts, NrSet, SyscallFilter};
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, ConfigError, GuestMem, Vcpu};

use crate::linux::{Kernel, LinuxInfo, Task};
use crate::lock;

const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// What one service wants the cores to stop at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Want {
    pub syscalls: SyscallFilter,
    pub user_entry: Option<u64>,
    pub user_faults: Option<u64>,
}

/// The shared part (one per VM, created by the first GEARS extension).
pub struct Gears {
    pub mem: GuestMem,
    info: Mutex<Option<LinuxInfo>>,
    wants: Mutex<BTreeMap<&'static str, Want>>,
    merged: Mutex<Intercepts>,
    /// Generation of `merged`; each core applies it when it changes.
    generation: AtomicU64,
    applied: Vec<AtomicU64>,
    /// Why the backend refused system-call intercepts (None: it took them, or nothing tried).
    refused: Mutex<Option<String>>,
    /// Why it refused user-mode entry and fault intercepts.
    refused_user: Mutex<Option<String>>,
}

impl Gears {
    /// The VM's hub: the one an earlier GEARS extension made, or a new one (which registers
    /// the LINUX_INFO hypercall and its state).
    pub fn get_or_create(ctx: &mut BuildCtx) -> Result<Arc<Gears>, ConfigError> {
        if let Some(g) = ctx.service::<Gears>() {
            return Ok(g);
        }
        let g = Arc::new(Gears {
            mem: ctx.mem.clone(),
            info: Mutex::new(None),
            wants: Mutex::new(BTreeMap::new()),
            merged: Mutex::new(Intercepts::default()),
            generation: AtomicU64::new(1),
            applied: (0..ctx.cores).map(|_| AtomicU64::new(0)).collect(),
            refused: Mutex::new(None),
            refused_user: Mutex::new(None),
        });
        ctx.provide(g.clone());
        ctx.vm.add_control(&g);
        let h = g.clone();
        ctx.add_hypercall(crate::id::LINUX_INFO, move |c| {
            let (addr, len) = (c.arg(0), c.arg(1));
            let r = match c.read_guest(addr, len, 4096, true) {
                Ok(b) => match LinuxInfo::parse(&b).and_then(|i| stable_root(&h.mem, i)) {
                    Ok(i) => {
                        tracing::info!("gears: the guest kernel reported its layout: {i:x?}");
                        *lock(&h.info) = Some(i);
                        0
                    }
                    Err(e) => {
                        tracing::warn!("gears: the guest's layout is refused: {e}");
                        err::EINVAL
                    }
                },
                Err(e) => e,
            };
            c.ret(r);
        })?;
        let (s, r) = (g.clone(), g.clone());
        ctx.register_core_state(
            "core:gears",
            "gears",
            state_fn(
                1,
                move || *lock(&s.info),
                move |v: Option<LinuxInfo>| {
                    *lock(&r.info) = v;
                    r.generation.fetch_add(1, Ordering::AcqRel);
                    Ok(())
                },
            ),
        );
        Ok(g)
    }

    /// The guest kernel's layout, once its helper module reported it.
    pub fn linux(&self) -> Option<LinuxInfo> {
        *lock(&self.info)
    }

    /// Run `f` with kernel-memory access, or say why it is not possible.
    pub fn kernel<R>(&self, f: impl FnOnce(&Kernel) -> R) -> Result<R, String> {
        let info = self.linux().ok_or_else(|| {
            "the guest has not reported its kernel layout: load the GEARS helper module \
             (insmod /lib/gears/gears.ko) in the guest"
                .to_string()
        })?;
        Ok(f(&Kernel {
            mem: &self.mem,
            info: &info,
        }))
    }

    /// The task running on this core (needs the layout).
    pub fn current(&self, vcpu: &dyn Vcpu) -> Option<Task> {
        let info = self.linux()?;
        let (cpl, _) = vcpu.cpl_and_64bit().ok()?;
        let msr = if cpl == 0 {
            MSR_GS_BASE
        } else {
            MSR_KERNEL_GS_BASE
        };
        let gs = vcpu.msrs(&[msr]).ok()?.first()?.1;
        Kernel {
            mem: &self.mem,
            info: &info,
        }
        .current(gs)
        .ok()
    }

    /// Replace what service `who` wants the cores to stop at.
    pub fn want(&self, who: &'static str, w: Want) {
        let mut wants = lock(&self.wants);
        if wants.get(who) == Some(&w) {
            return;
        }
        wants.insert(who, w);
        let mut m = Intercepts::default();
        let mut f = SyscallFilter::default();
        for w in wants.values() {
            for abi in 0..2 {
                or(&mut f.everywhere[abi], &w.syscalls.everywhere[abi]);
            }
            for (space, sets) in &w.syscalls.by_space {
                match f.by_space.iter_mut().find(|(s, _)| s == space) {
                    Some((_, mine)) => {
                        for abi in 0..2 {
                            or(&mut mine[abi], &sets[abi]);
                        }
                    }
                    None => f.by_space.push((*space, *sets)),
                }
            }
            m.user_entry = m.user_entry.or(w.user_entry);
            m.user_faults = m.user_faults.or(w.user_faults);
        }
        if !f.is_empty() {
            m.syscalls = Some(Arc::new(f));
        }
        *lock(&self.merged) = m;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Before a core enters the guest: apply the intercepts if they changed.
    pub fn sync(&self, cpu: u32, vcpu: &mut dyn Vcpu) {
        let g = self.generation.load(Ordering::Acquire);
        let Some(applied) = self.applied.get(cpu as usize) else {
            return;
        };
        if applied.load(Ordering::Relaxed) == g {
            return;
        }
        if applied.load(Ordering::Relaxed) == 0 {
            // First entry: find out what the backend can stop at (with settings that never
            // match), so services can refuse to start where it cannot.
            let mut never = SyscallFilter::default();
            never
                .by_space
                .push((u64::MAX, [[0, 0, 0, 0, 0, 0, 0, 1 << 63]; 2]));
            let probe = Intercepts {
                syscalls: Some(Arc::new(never)),
                ..Intercepts::default()
            };
            if let Err(e) = vcpu.set_intercepts(&probe) {
                *lock(&self.refused) = Some(e.to_string());
            }
            let probe = Intercepts {
                user_entry: Some(u64::MAX),
                ..Intercepts::default()
            };
            if let Err(e) = vcpu.set_intercepts(&probe) {
                *lock(&self.refused_user) = Some(e.to_string());
            }
        }
        let mut m = lock(&self.merged).clone();
        if lock(&self.refused_user).is_some() {
            // What the backend can do still applies (system calls on KVM).
            m.user_entry = None;
            m.user_faults = None;
        }
        if let Err(e) = vcpu.set_intercepts(&m) {
            let mut r = lock(&self.refused);
            if r.is_none() {
                tracing::warn!("gears: {e}");
            }
            *r = Some(e.to_string());
        }
        applied.store(g, Ordering::Relaxed);
    }

    /// Whether the backend takes system-call intercepts: an error once a core refused them.
    pub fn check_backend(&self) -> Result<(), String> {
        match &*lock(&self.refused) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Whether it also stops at user-mode entries and user faults (code and environment
    /// injection).
    pub fn check_user(&self) -> Result<(), String> {
        self.check_backend()?;
        match &*lock(&self.refused_user) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// The layout as the helper reports it names the page directory of the process that loaded it
/// (its kernel half maps what every process's does); keep init's instead (pid 1 lives as long
/// as the guest, the loader's directory is freed when it exits).
fn stable_root(mem: &GuestMem, mut i: LinuxInfo) -> Result<LinuxInfo, String> {
    let k = Kernel { mem, info: &i };
    let init = k
        .process(1)
        .map_err(|e| format!("reading the process list: {e}"))?
        .ok_or("no process 1 on the task list")?;
    i.kernel_pgd = init.space.ok_or("process 1 has no address space")?;
    Ok(i)
}

fn or(a: &mut NrSet, b: &NrSet) {
    for (x, y) in a.iter_mut().zip(b) {
        *x |= y;
    }
}
