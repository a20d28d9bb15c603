//! `8254_PIT`: the timer at 0x40-0x43 with port 0x61 (channel 2 gate, speaker, OUT2), channel 0
//! on IRQ0. Lost ticks: one IRQ0 edge per timer expiry; if the VMM runs late, missed periods are
//! coalesced into that edge and never replayed (see [`super::chips::pit`]).

use std::sync::{Arc, Mutex, OnceLock, Weak};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::IrqLine;
use palacios_vmm::state::state_fn;
use palacios_vmm::time::GuestClock;
use palacios_vmm::timer::Timer;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::chips::pit::Pit;
use serde::{Deserialize, Serialize};

/// The checkpoint state of the PIT.
#[derive(Serialize, Deserialize)]
struct PitState {
    pit: Pit,
    /// Guest time of the IRQ0 edge the timer is armed for. It can already be due when the VM
    /// is paused; restored as it is, that edge is delivered (late) as it would have been.
    irq0_at: Option<u64>,
}

pub struct PitClass;

impl DeviceClass for PitClass {
    fn name(&self) -> &'static str {
        "8254_PIT"
    }
    fn help(&self) -> &'static str {
        "8254 PIT (0x40-0x43) and port 0x61; channel 0 drives IRQ0"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        if ctx.kernel_irqchip.is_some() {
            tracing::debug!("8254_PIT: emulated by the backend's in-kernel PIT");
            ctx.state_in_backend();
            return Ok(());
        }
        let shared = Arc::new(PitShared {
            pit: Mutex::new(Pit::new()),
            clock: ctx.clock.clone(),
            irq0: ctx.irq_line(0),
            timer: OnceLock::new(),
            irq0_at: Mutex::new(None),
        });
        let weak: Weak<PitShared> = Arc::downgrade(&shared);
        let timer = ctx.timers.timer(move |now| {
            if let Some(s) = weak.upgrade() {
                s.irq0.pulse();
                s.rearm(now);
            }
        });
        let _ = shared.timer.set(timer);
        let (s1, s2) = (shared.clone(), shared.clone());
        ctx.register_state(state_fn(
            1,
            move || PitState {
                pit: s1.lock().clone(),
                irq0_at: *lock(&s1.irq0_at),
            },
            move |st: PitState| {
                st.pit.check()?;
                *s2.lock() = st.pit;
                // IRQ0 is only ever pulsed: there is no level to restore, just the next tick.
                s2.arm(st.irq0_at);
                Ok(())
            },
        ));
        ctx.add_ports(
            0x40,
            4,
            &dev.id,
            Arc::new(Mutex::new(PitPorts(shared.clone()))),
        )
        .map_err(|e| dev.node.err(e.msg))?;
        ctx.add_ports(0x61, 1, &dev.id, Arc::new(Mutex::new(PitPorts(shared))))
            .map_err(|e| dev.node.err(e.msg))
    }
}

struct PitShared {
    pit: Mutex<Pit>,
    clock: Arc<GuestClock>,
    irq0: Arc<dyn IrqLine>,
    timer: OnceLock<Timer>,
    /// What the timer is armed for.
    irq0_at: Mutex<Option<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PitShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pit> {
        lock(&self.pit)
    }

    fn rearm(&self, now: u64) {
        let next = self.lock().next_irq0(now);
        self.arm(next);
    }

    fn arm(&self, next: Option<u64>) {
        let mut at = lock(&self.irq0_at);
        *at = next;
        if let Some(t) = self.timer.get() {
            match next {
                Some(at) => t.arm(at),
                None => t.disarm(),
            }
        }
    }
}

struct PitPorts(Arc<PitShared>);

impl BusDevice for PitPorts {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let now = self.0.clock.now();
        let v = self
            .0
            .pit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(addr as u16, now);
        data.fill(0);
        data[0] = v;
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        let now = self.0.clock.now();
        self.0
            .pit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(addr as u16, data[0], now);
        self.0.rearm(now);
    }
}
