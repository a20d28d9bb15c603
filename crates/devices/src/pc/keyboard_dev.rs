//! `KEYBOARD`: the i8042 controller at 0x60/0x64 and port 0x92. The reset line (command 0xFE,
//! output-port bit 0, port 0x92 bit 0) either ends the VM (`on_reset="stop"`, exit status 0) or
//! reboots it (`on_reset="reset"`: the VMM builds it afresh and loads the guest again).

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::IrqLine;
use palacios_vmm::state::state_fn;
use palacios_vmm::{
    BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption, Outcome, VmHandle,
};

use super::chips::i8042::{I8042, I8042Action};

pub struct KeyboardClass;

const OPTIONS: &[DeviceOption] = &[DeviceOption {
    name: "on_reset",
    help: "what the reset line does: 'stop' (default: the VM ends, exit status 0) or 'reset' (the VM reboots from power-on state)",
}];

impl DeviceClass for KeyboardClass {
    fn name(&self) -> &'static str {
        "KEYBOARD"
    }
    fn help(&self) -> &'static str {
        "i8042 keyboard controller (0x60, 0x64) and port 0x92: self-test, A20, reset line"
    }
    fn options(&self) -> &'static [DeviceOption] {
        OPTIONS
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let outcome = match dev.node.val("on_reset")? {
            None | Some("stop") => Outcome::Reset,
            Some("reset") => Outcome::Reboot,
            Some(o) => {
                return Err(dev.node.val_err(
                    "on_reset",
                    format!("on_reset must be 'stop' or 'reset', not '{o}'"),
                ));
            }
        };
        let kb = Arc::new(Mutex::new(Keyboard {
            i8042: I8042::new(),
            vm: ctx.vm.clone(),
            on_reset: outcome,
            irq1: ctx.irq_line(1),
            irq12: ctx.irq_line(12),
        }));
        let (k1, k2) = (kb.clone(), kb.clone());
        ctx.register_state(state_fn(
            1,
            move || lock(&k1).i8042.clone(),
            move |i8042: I8042| {
                i8042.check()?;
                // IRQ1/IRQ12 are only ever pulsed: no line level to restore.
                lock(&k2).i8042 = i8042;
                Ok(())
            },
        ));
        ctx.add_ports(0x60, 1, &dev.id, kb.clone())
            .map_err(|e| dev.node.err(e.msg))?;
        ctx.add_ports(0x64, 1, &dev.id, kb.clone())
            .map_err(|e| dev.node.err(e.msg))?;
        ctx.add_ports(0x92, 1, &dev.id, kb)
            .map_err(|e| dev.node.err(e.msg))
    }
}

fn lock(k: &Mutex<Keyboard>) -> std::sync::MutexGuard<'_, Keyboard> {
    k.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Keyboard {
    i8042: I8042,
    vm: VmHandle,
    on_reset: Outcome,
    irq1: Arc<dyn IrqLine>,
    irq12: Arc<dyn IrqLine>,
}

impl Keyboard {
    fn act(&self, acts: Vec<I8042Action>) {
        for a in acts {
            match a {
                I8042Action::None => {}
                I8042Action::Reset => {
                    tracing::info!("i8042: the guest pulsed the reset line");
                    self.vm.stop(self.on_reset.clone());
                }
                // Guest RAM is not aliased at 1 MiB, so the A20 gate has no visible effect.
                I8042Action::A20(on) => {
                    tracing::debug!("i8042: A20 {}", if on { "on" } else { "off" })
                }
                I8042Action::Irq1 => self.irq1.pulse(),
                I8042Action::Irq12 => self.irq12.pulse(),
            }
        }
    }
}

impl BusDevice for Keyboard {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let (v, acts) = self.i8042.read(addr as u16);
        data.fill(0);
        data[0] = v;
        self.act(acts);
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        let acts = self.i8042.write(addr as u16, data[0]);
        self.act(acts);
    }
}
