//! `8259A`: the master/slave PIC pair at 0x20/0xa0 with the ELCR at 0x4d0/0x4d1.
//!
//! Its INTR output goes to core 0: through the BSP's LAPIC (LINT0, virtual-wire mode) when a
//! `LAPIC` device exists, else straight to the core.

use std::sync::{Arc, Mutex, OnceLock};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::control::Wakers;
use palacios_vmm::irq::InterruptController;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::chips::pic::PicPair;
use super::irq_router::{GsiSink, IrqRouter};
use serde::{Deserialize, Serialize};

/// The checkpoint state of the PIC pair.
#[derive(Serialize, Deserialize)]
struct PicState {
    pic: PicPair,
    /// Level of each IRQ line as last passed on to the controllers (bit n = GSI n): shared with
    /// the IOAPIC, and restored by either, so that a line's next change is seen as one.
    irq_levels: u32,
}

pub struct PicClass;

impl DeviceClass for PicClass {
    fn name(&self) -> &'static str {
        "8259A"
    }
    fn help(&self) -> &'static str {
        "master/slave 8259A PIC pair (0x20-0x21, 0xa0-0xa1) with the ELCR (0x4d0-0x4d1)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        if ctx.kernel_irqchip.is_some() {
            tracing::debug!("8259A: emulated by the backend's in-kernel irqchip");
            ctx.state_in_backend();
            return Ok(());
        }
        let shared = Arc::new(PicShared {
            pic: Mutex::new(PicPair::new()),
            wakers: ctx.vm.wakers().clone(),
            lint0: OnceLock::new(),
        });
        for (port, len) in [(0x20, 2), (0xa0, 2), (0x4d0, 2)] {
            ctx.add_ports(
                port,
                len,
                &dev.id,
                Arc::new(Mutex::new(PicPorts(shared.clone()))),
            )
            .map_err(|e| dev.node.err(e.msg))?;
        }
        let router = IrqRouter::get(ctx);
        router.attach_pic(shared.clone());
        ctx.provide(shared.clone());
        let (s1, s2, r1) = (shared.clone(), shared.clone(), router.clone());
        ctx.register_state(state_fn(
            1,
            move || PicState {
                pic: s1.lock().clone(),
                irq_levels: r1.levels(),
            },
            move |st: PicState| {
                st.pic.check()?;
                // The INTR output follows from the state: the controller polls it, and core 0
                // looks when it starts.
                router.set_levels(st.irq_levels)?;
                *s2.lock() = st.pic;
                Ok(())
            },
        ));
        // Without a LAPIC the PIC alone interrupts core 0.
        ctx.on_finish(move |ctx| {
            if ctx.interrupt_controller.is_none() {
                ctx.interrupt_controller = Some(Arc::new(PicController(shared)));
            }
            Ok(())
        });
        Ok(())
    }
}

/// The PIC pair as the rest of the platform sees it.
pub struct PicShared {
    pic: Mutex<PicPair>,
    wakers: Wakers,
    /// The BSP's LINT0 when a LAPIC exists.
    lint0: OnceLock<Arc<dyn Fn(bool) + Send + Sync>>,
}

impl PicShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PicPair> {
        self.pic.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, out: bool) {
        match self.lint0.get() {
            Some(l) => l(out),
            None if out => self.wakers.wake(0),
            None => {}
        }
    }

    pub fn set_irq(&self, irq: u8, level: bool) {
        let out = {
            let mut p = self.lock();
            p.set_irq(irq, level);
            p.output()
        };
        self.notify(out);
    }

    /// The INTR pin.
    pub fn output(&self) -> bool {
        self.lock().output()
    }

    /// INTA: the vector to deliver.
    pub fn acknowledge(&self) -> u8 {
        let (v, out) = {
            let mut p = self.lock();
            let v = p.acknowledge();
            (v, p.output())
        };
        self.notify(out);
        v
    }

    /// Send INTR to the BSP's LINT0 instead of straight to core 0.
    pub fn connect_lint0(&self, f: Arc<dyn Fn(bool) + Send + Sync>) {
        let _ = self.lint0.set(f);
    }
}

impl GsiSink for PicShared {
    fn set_gsi(&self, gsi: u32, level: bool) {
        self.set_irq(gsi as u8, level);
    }
}

struct PicPorts(Arc<PicShared>);

impl BusDevice for PicPorts {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let v = self.0.lock().read(addr as u16);
        data.fill(0);
        data[0] = v;
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        let out = {
            let mut p = self.0.lock();
            p.write(addr as u16, data[0]);
            p.output()
        };
        self.0.notify(out);
    }
}

/// Core 0's interrupts when the PIC is the only controller.
struct PicController(Arc<PicShared>);

impl InterruptController for PicController {
    fn has_interrupt(&self, cpu: u32) -> bool {
        cpu == 0 && self.0.output()
    }
    fn acknowledge(&self, cpu: u32) -> Option<u8> {
        (cpu == 0).then(|| self.0.acknowledge())
    }
}
