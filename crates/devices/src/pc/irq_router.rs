//! ISA IRQ / GSI routing: a device's line goes to the PIC pair (IRQ 0-15) and to the IOAPIC
//! (pin = GSI, except ISA IRQ0 which is wired to pin 2 as on PC chipsets).

use std::sync::{Arc, Mutex, OnceLock};

use palacios_vmm::BuildCtx;
use palacios_vmm::irq::IrqLine;

/// Something that takes GSI levels (the IOAPIC).
pub trait GsiSink: Send + Sync {
    fn set_gsi(&self, gsi: u32, level: bool);
}

/// The per-VM router, created by the first interrupt controller device.
pub struct IrqRouter {
    pic: OnceLock<Arc<dyn GsiSink>>,
    ioapic: OnceLock<Arc<dyn GsiSink>>,
    /// Current level of each line, so that an edge is only passed on as a change.
    levels: Mutex<[bool; 24]>,
}

impl IrqRouter {
    /// The VM's router, created (and made the IRQ-line provider) on first use.
    pub fn get(ctx: &mut BuildCtx) -> Arc<IrqRouter> {
        if let Some(r) = ctx.service::<IrqRouter>() {
            return r;
        }
        let r = Arc::new(IrqRouter {
            pic: OnceLock::new(),
            ioapic: OnceLock::new(),
            levels: Mutex::new([false; 24]),
        });
        ctx.provide(r.clone());
        let r2 = r.clone();
        ctx.set_irq_provider(Box::new(move |gsi| {
            Arc::new(RouterLine {
                router: r2.clone(),
                gsi,
            }) as Arc<dyn IrqLine>
        }));
        r
    }

    pub fn attach_pic(&self, pic: Arc<dyn GsiSink>) {
        let _ = self.pic.set(pic);
    }

    pub fn attach_ioapic(&self, ioapic: Arc<dyn GsiSink>) {
        let _ = self.ioapic.set(ioapic);
    }

    /// The level of every line (bit n = GSI n), for checkpoints.
    pub fn levels(&self) -> u32 {
        let l = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        l.iter()
            .enumerate()
            .fold(0, |acc, (i, &high)| acc | (u32::from(high) << i))
    }

    /// Restore the line levels (bit n = GSI n) without passing anything on: the interrupt
    /// controllers' own state, restored with them, already reflects these levels.
    pub fn set_levels(&self, bits: u32) -> Result<(), String> {
        if bits >> 24 != 0 {
            return Err(format!("IRQ line levels {bits:#x}: there are 24 lines"));
        }
        let mut l = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        for (i, high) in l.iter_mut().enumerate() {
            *high = bits & (1 << i) != 0;
        }
        Ok(())
    }

    pub fn set_irq(&self, gsi: u32, level: bool) {
        if gsi >= 24 {
            return;
        }
        {
            let mut l = self.levels.lock().unwrap_or_else(|p| p.into_inner());
            if l[gsi as usize] == level {
                return;
            }
            l[gsi as usize] = level;
        }
        if gsi < 16 {
            if let Some(p) = self.pic.get() {
                p.set_gsi(gsi, level);
            }
        }
        if let Some(io) = self.ioapic.get() {
            io.set_gsi(if gsi == 0 { 2 } else { gsi }, level);
        }
    }
}

struct RouterLine {
    router: Arc<IrqRouter>,
    gsi: u32,
}

impl IrqLine for RouterLine {
    fn set_level(&self, high: bool) {
        self.router.set_irq(self.gsi, high);
    }
}
