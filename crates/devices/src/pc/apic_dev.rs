//! `LAPIC`: one local APIC per core (xAPIC MMIO at the relocatable APIC base, x2APIC and
//! TSC-deadline through trapped MSRs), the APIC bus between them and the IOAPIC, INIT/SIPI
//! bring-up of application processors, and the interrupt controller the exit loop asks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use palacios_vmm::bus::{FallbackDevice, current_cpu};
use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::InterruptController;
use palacios_vmm::msr::MsrDevice;
use palacios_vmm::state::state_fn;
use palacios_vmm::time::GuestClock;
use palacios_vmm::timer::Timer;
use palacios_vmm::{BuildCtx, ConfigError, DeviceClass, DeviceOption, VmHandle};
use palacios_x86::CpuState;
use serde::{Deserialize, Serialize};

use super::chips::apic::{Action, Interrupt, Lapic};
use super::ioapic_dev::IoapicShared;
use super::pic_dev::PicShared;

pub struct LapicClass;

impl DeviceClass for LapicClass {
    fn name(&self) -> &'static str {
        "LAPIC"
    }
    fn help(&self) -> &'static str {
        "a local APIC per core: xAPIC MMIO at IA32_APIC_BASE, x2APIC MSRs, timer (one-shot, periodic, TSC-deadline), IPIs, INIT/SIPI"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, _dev: &DeviceConfig) -> Result<(), ConfigError> {
        if ctx.kernel_irqchip.is_some() {
            tracing::debug!("LAPIC: emulated by the backend's in-kernel irqchip");
            ctx.state_in_backend();
            return Ok(());
        }
        let tsc_hz = ctx.clock.tsc_hz();
        let sys = Arc::new(ApicSystem {
            apics: Mutex::new(
                (0..ctx.cores)
                    .map(|i| Lapic::new(i, i == 0, tsc_hz))
                    .collect(),
            ),
            timers: OnceLock::new(),
            nmi: (0..ctx.cores).map(|_| AtomicBool::new(false)).collect(),
            started: (0..ctx.cores).map(|i| AtomicBool::new(i == 0)).collect(),
            ioapic: OnceLock::new(),
            pic: OnceLock::new(),
            vm: ctx.vm.clone(),
            clock: ctx.clock.clone(),
        });
        let timers = (0..ctx.cores)
            .map(|i| {
                let w: Weak<ApicSystem> = Arc::downgrade(&sys);
                ctx.timers.timer(move |now| {
                    if let Some(s) = w.upgrade() {
                        let acts = s.lock()[i as usize].timer_tick(now);
                        s.process(i, acts);
                        s.rearm(i);
                        // The timer latched its vector locally: let the core look.
                        s.vm.wakers().wake(i);
                    }
                })
            })
            .collect();
        let _ = sys.timers.set(timers);
        let (s1, s2) = (sys.clone(), sys.clone());
        ctx.register_state(state_fn(1, move || s1.save(), move |st| s2.restore(st)));
        ctx.mmio.add_fallback(sys.clone());
        ctx.msrs
            .insert(0x1b, 0x1b, sys.clone())
            .map_err(|e| ConfigError::new(None, e))?;
        ctx.msrs
            .insert(0x6e0, 0x6e0, sys.clone())
            .map_err(|e| ConfigError::new(None, e))?;
        ctx.msrs
            .insert(0x800, 0x8ff, sys.clone())
            .map_err(|e| ConfigError::new(None, e))?;
        ctx.provide(sys.clone());
        ctx.msi.connect(sys.clone());
        ctx.on_finish(move |ctx| {
            if let Some(pic) = ctx.service::<PicShared>() {
                let s = sys.clone();
                pic.connect_lint0(Arc::new(move |level| {
                    if level {
                        s.vm.wakers().wake(0);
                    }
                }));
                let _ = sys.pic.set(pic);
            }
            if let Some(io) = ctx.service::<IoapicShared>() {
                let _ = sys.ioapic.set(io);
            }
            ctx.interrupt_controller = Some(sys.clone());
            Ok(())
        });
        Ok(())
    }
}

impl palacios_vmm::irq::MsiController for ApicSystem {
    fn send_msi(&self, msg: palacios_vmm::irq::MsiMessage) {
        match super::chips::apic::msg::Interrupt::from_msi(msg.addr, msg.data) {
            Some(intr) => self.deliver(&intr),
            None => tracing::debug!("MSI {msg:x?} with a reserved delivery mode dropped"),
        }
    }
}

/// The checkpoint state of one core's LAPIC.
#[derive(Serialize, Deserialize)]
struct CoreApic {
    lapic: Lapic,
    /// An NMI is waiting for the core.
    nmi_pending: bool,
    /// The core has been started: the BSP at once, an AP by its first SIPI (later ones are
    /// ignored).
    started: bool,
}

/// Every core's LAPIC and what connects them.
pub struct ApicSystem {
    apics: Mutex<Vec<Lapic>>,
    timers: OnceLock<Vec<Timer>>,
    nmi: Vec<AtomicBool>,
    /// Whether each core has been started (the BSP at once, APs by their first SIPI).
    started: Vec<AtomicBool>,
    ioapic: OnceLock<Arc<IoapicShared>>,
    pic: OnceLock<Arc<PicShared>>,
    vm: VmHandle,
    clock: Arc<GuestClock>,
}

impl ApicSystem {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Lapic>> {
        self.apics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self) -> Vec<CoreApic> {
        self.lock()
            .iter()
            .enumerate()
            .map(|(i, l)| CoreApic {
                lapic: l.clone(),
                nmi_pending: self.nmi[i].load(Ordering::Acquire),
                started: self.started[i].load(Ordering::Acquire),
            })
            .collect()
    }

    fn restore(&self, cores: Vec<CoreApic>) -> Result<(), String> {
        if cores.len() != self.nmi.len() {
            return Err(format!(
                "{} LAPICs saved, but the VM has {} cores",
                cores.len(),
                self.nmi.len()
            ));
        }
        for (i, c) in cores.iter().enumerate() {
            c.lapic.check(i as u32, i == 0)?;
        }
        if cores.first().is_some_and(|c| !c.started) {
            return Err("core 0 (the BSP) is always started".into());
        }
        let tsc_hz = self.clock.tsc_hz();
        {
            let mut apics = self.lock();
            for (a, c) in apics.iter_mut().zip(&cores) {
                *a = c.lapic.clone();
                a.set_tsc_hz(tsc_hz);
            }
        }
        for (i, c) in cores.iter().enumerate() {
            self.nmi[i].store(c.nmi_pending, Ordering::Release);
            self.started[i].store(c.started, Ordering::Release);
        }
        // Timers from the restored deadlines (absolute guest time, still valid).
        for i in 0..cores.len() {
            self.rearm(i as u32);
        }
        Ok(())
    }

    /// Deliver a message on the APIC bus (from an IOAPIC pin or an IPI).
    pub fn deliver(&self, intr: &Interrupt) {
        let acts = {
            let mut apics = self.lock();
            super::chips::apic::bus::deliver(&mut apics, intr)
        };
        if acts.is_empty() {
            tracing::debug!("APIC bus: no APIC accepted {intr:?}");
        }
        let targets: Vec<usize> = {
            let apics = self.lock();
            (0..apics.len())
                .filter(|&i| apics[i].is_destination(intr))
                .collect()
        };
        for (i, a) in acts {
            self.process(i as u32, vec![a]);
        }
        // A fixed interrupt has been latched in the target's IRR: make it look.
        for i in targets {
            self.vm.wakers().wake(i as u32);
        }
    }

    /// Carry out what an APIC asked for.
    fn process(&self, cpu: u32, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::SendIpi(intr) => self.deliver(&intr),
                Action::Eoi { vector } => {
                    if let Some(io) = self.ioapic.get() {
                        for intr in io.eoi(vector) {
                            self.deliver(&intr);
                        }
                    }
                }
                Action::Nmi => {
                    if let Some(n) = self.nmi.get(cpu as usize) {
                        n.store(true, Ordering::Release);
                        self.vm.wakers().wake(cpu);
                    }
                }
                Action::Init => tracing::debug!("LAPIC {cpu}: INIT"),
                Action::StartUp { vector } => self.startup(cpu, vector),
                Action::ExtInt => self.vm.wakers().wake(cpu),
                Action::TimerChanged => self.rearm(cpu),
                Action::Smi => tracing::debug!("LAPIC {cpu}: SMI ignored (no SMM)"),
            }
        }
    }

    fn startup(&self, cpu: u32, vector: u8) {
        let Some(flag) = self.started.get(cpu as usize) else {
            return;
        };
        if flag.swap(true, Ordering::AcqRel) {
            tracing::debug!("LAPIC {cpu}: SIPI to a running core ignored");
            return;
        }
        tracing::debug!("LAPIC {cpu}: STARTUP at {:#x}", u32::from(vector) << 12);
        self.vm.start_core(cpu, CpuState::sipi(vector));
    }

    fn rearm(&self, cpu: u32) {
        let next = self
            .lock()
            .get(cpu as usize)
            .and_then(|l| l.next_timer_deadline());
        if let Some(t) = self.timers.get().and_then(|t| t.get(cpu as usize)) {
            match next {
                Some(at) => t.arm(at),
                None => t.disarm(),
            }
        }
    }

    fn in_page(l: &Lapic, addr: u64) -> Option<u32> {
        (l.mmio_active() && addr >= l.base_addr() && addr < l.base_addr() + 0x1000)
            .then(|| (addr - l.base_addr()) as u32)
    }
}

impl FallbackDevice for ApicSystem {
    fn try_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let cpu = current_cpu() as usize;
        let now = self.clock.now();
        let mut apics = self.lock();
        let Some(l) = apics.get_mut(cpu) else {
            return false;
        };
        let Some(off) = Self::in_page(l, addr) else {
            return false;
        };
        let v = l.mmio_read(off & !3, now).to_le_bytes();
        let shift = (off & 3) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get(shift + i).copied().unwrap_or(0);
        }
        true
    }

    fn try_write(&self, addr: u64, data: &[u8]) -> bool {
        let cpu = current_cpu();
        let now = self.clock.now();
        let acts = {
            let mut apics = self.lock();
            let Some(l) = apics.get_mut(cpu as usize) else {
                return false;
            };
            let Some(off) = Self::in_page(l, addr) else {
                return false;
            };
            let mut b = [0u8; 4];
            for (i, d) in data.iter().take(4).enumerate() {
                b[i] = *d;
            }
            l.mmio_write(off & !3, u32::from_le_bytes(b), now)
        };
        self.process(cpu, acts);
        true
    }
}

impl MsrDevice for ApicSystem {
    fn read(&self, cpu: u32, msr: u32) -> Option<u64> {
        let now = self.clock.now();
        self.lock().get_mut(cpu as usize)?.msr_read(msr, now).ok()
    }

    fn write(&self, cpu: u32, msr: u32, value: u64) -> bool {
        let now = self.clock.now();
        let tsc = self.clock.tsc_at(now);
        let r = match self.lock().get_mut(cpu as usize) {
            Some(l) => l.msr_write(msr, value, now, tsc),
            None => return false,
        };
        match r {
            Ok(acts) => {
                self.process(cpu, acts);
                true
            }
            Err(_) => false,
        }
    }
}

impl InterruptController for ApicSystem {
    fn has_interrupt(&self, cpu: u32) -> bool {
        let (fixed, extint) = match self.lock().get(cpu as usize) {
            Some(l) => (l.pending_vector().is_some(), l.wants_extint()),
            None => return false,
        };
        fixed || (extint && self.pic.get().is_some_and(|p| p.output()))
    }

    fn acknowledge(&self, cpu: u32) -> Option<u8> {
        let extint = {
            let mut apics = self.lock();
            let l = apics.get_mut(cpu as usize)?;
            if let Some(v) = l.pending_vector() {
                l.acknowledge(v);
                return Some(v);
            }
            l.wants_extint()
        };
        match self.pic.get() {
            Some(p) if extint && p.output() => Some(p.acknowledge()),
            _ => None,
        }
    }

    fn take_nmi(&self, cpu: u32) -> bool {
        self.nmi
            .get(cpu as usize)
            .is_some_and(|n| n.swap(false, Ordering::AcqRel))
    }

    fn nmi_pending(&self, cpu: u32) -> bool {
        self.nmi
            .get(cpu as usize)
            .is_some_and(|n| n.load(Ordering::Acquire))
    }
}
