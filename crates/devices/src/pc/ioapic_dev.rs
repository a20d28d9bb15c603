//! `IOAPIC`: 24 pins at 0xFEC00000, delivering on the APIC bus of the `LAPIC` device.

use std::sync::{Arc, Mutex, OnceLock};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::apic_dev::ApicSystem;
use super::chips::apic::{Interrupt, Ioapic};
use super::irq_router::{GsiSink, IrqRouter};
use serde::{Deserialize, Serialize};

/// The checkpoint state of the IOAPIC.
#[derive(Serialize, Deserialize)]
struct IoapicState {
    ioapic: Ioapic,
    /// Level of each IRQ line as last passed on to the controllers (bit n = GSI n): shared with
    /// the PIC, and restored by either, so that a line's next change is seen as one.
    irq_levels: u32,
}

pub const IOAPIC_BASE: u64 = 0xfec0_0000;

pub struct IoapicClass;

const OPTIONS: &[DeviceOption] = &[DeviceOption {
    name: "apic_id",
    help: "IOAPIC ID (default: the number of cores, after the LAPIC IDs)",
}];

impl DeviceClass for IoapicClass {
    fn name(&self) -> &'static str {
        "IOAPIC"
    }
    fn help(&self) -> &'static str {
        "82093AA-style I/O APIC, 24 pins at 0xFEC00000 (ISA IRQ0 on pin 2)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        OPTIONS
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        if ctx.kernel_irqchip.is_some() {
            tracing::debug!("IOAPIC: emulated by the backend's in-kernel irqchip");
            ctx.state_in_backend();
            return Ok(());
        }
        let id = dev
            .node
            .num("apic_id")?
            .unwrap_or(u64::from(ctx.cores))
            .min(15) as u8;
        let shared = Arc::new(IoapicShared {
            ioapic: Mutex::new(Ioapic::new(id)),
            apics: OnceLock::new(),
        });
        ctx.add_mmio(
            IOAPIC_BASE,
            0x1000,
            &dev.id,
            Arc::new(Mutex::new(IoapicMmio(shared.clone()))),
        )
        .map_err(|e| dev.node.err(e.msg))?;
        let router = IrqRouter::get(ctx);
        router.attach_ioapic(shared.clone());
        ctx.provide(shared.clone());
        let (s1, s2, r1) = (shared.clone(), shared.clone(), router.clone());
        ctx.register_state(state_fn(
            1,
            move || IoapicState {
                ioapic: s1.lock().clone(),
                irq_levels: r1.levels(),
            },
            move |st: IoapicState| {
                st.ioapic.check()?;
                // Nothing is sent: delivery is instantaneous, so no message was in flight, and
                // the LAPICs' restored state already holds what was delivered.
                router.set_levels(st.irq_levels)?;
                *s2.lock() = st.ioapic;
                Ok(())
            },
        ));
        ctx.on_finish(move |ctx| {
            match ctx.service::<ApicSystem>() {
                Some(a) => {
                    let _ = shared.apics.set(a);
                }
                None => tracing::warn!("IOAPIC without a LAPIC device: its interrupts go nowhere"),
            }
            Ok(())
        });
        Ok(())
    }
}

pub struct IoapicShared {
    ioapic: Mutex<Ioapic>,
    apics: OnceLock<Arc<ApicSystem>>,
}

impl IoapicShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ioapic> {
        self.ioapic.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, msgs: Vec<Interrupt>) {
        if let Some(a) = self.apics.get() {
            for m in msgs {
                a.deliver(&m);
            }
        }
    }

    /// An EOI broadcast from a LAPIC; returns re-deliveries.
    pub fn eoi(&self, vector: u8) -> Vec<Interrupt> {
        self.lock().eoi(vector)
    }

    /// The redirection entry of `pin` (for tests and the inspector).
    pub fn entry(&self, pin: u32) -> Option<u64> {
        self.lock().entry(pin)
    }
}

impl GsiSink for IoapicShared {
    fn set_gsi(&self, gsi: u32, level: bool) {
        let msgs = self.lock().set_irq(gsi, level);
        self.send(msgs);
    }
}

struct IoapicMmio(Arc<IoapicShared>);

impl BusDevice for IoapicMmio {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let off = addr - IOAPIC_BASE;
        let v = self.0.lock().mmio_read(off & !3).to_le_bytes();
        let shift = (off & 3) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get(shift + i).copied().unwrap_or(0);
        }
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        let off = addr - IOAPIC_BASE;
        let mut b = [0u8; 4];
        for (i, d) in data.iter().take(4).enumerate() {
            b[i] = *d;
        }
        let msgs = self.0.lock().mmio_write(off & !3, u32::from_le_bytes(b));
        self.0.send(msgs);
    }
}
