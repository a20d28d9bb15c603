//! `PCI`, `i440FX` and `PIIX3`: PCI bus 0 (configuration mechanism #1 at 0xCF8/0xCFC and an
//! ECAM window described by the ACPI MCFG), the i440FX host bridge at 00:00.0 and the PIIX3
//! PCI-to-ISA bridge at 00:01.0 with its PIRQ route registers.
//!
//! INTx: slot S pin P drives PIRQ[(S+P-1) mod 4], wired to IOAPIC pins 16-19 (described by
//! the DSDT's `_PRT`). PCI interrupt lines are active low, as the `_PRT` tells the guest; with
//! the VMM's own IOAPIC the line is driven electrically (idle high), with KVM's in-kernel
//! irqchip as "asserted". The PIIX3's PIRQ route registers (0x60-0x63) also route each PIRQ
//! to an ISA IRQ (the 8259's input), as firmware programs them for PIC-only guests. An ISA
//! IRQ shared with an ISA device is not wired-OR: firmware picks free IRQs.
//!
//! Without firmware the bus gives every BAR an address and enables decoding once all devices
//! are created, as a BIOS would.

use std::sync::{Arc, Mutex};

use palacios_pci::config::ConfigSpace;
use palacios_pci::{Conf1, DevFn, Ecam, PciDevice, PciRoot, pci_root};
use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::IrqLine;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, ConfigError, DeviceClass, DeviceOption};

pub struct PciClass;

/// A line in active-low sense on an electrically modelled interrupt controller.
struct ActiveLow(Arc<dyn IrqLine>);

impl IrqLine for ActiveLow {
    fn set_level(&self, asserted: bool) {
        self.0.set_level(!asserted);
    }
}

impl DeviceClass for PciClass {
    fn name(&self) -> &'static str {
        "PCI"
    }
    fn help(&self) -> &'static str {
        "PCI bus 0: configuration mechanism #1 (0xcf8/0xcfc) and ECAM at 0xb0000000 (ACPI MCFG); \
         BARs are assigned at boot and follow the guest's programming"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[DeviceOption {
            name: "assign",
            help: "give BARs addresses at boot as firmware would: yes (default) or no",
        }]
    }
    fn stateless(&self) -> bool {
        // The bus holds no state of its own: each function saves its config space, and the
        // BAR mappings are rebuilt from those after a restore.
        true
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        if ctx.service::<PciRoot>().is_some() {
            return Err(dev.node.err("only one PCI bus is supported"));
        }
        let assign = match dev.node.val("assign")? {
            None | Some("yes") | Some("1") | Some("true") => true,
            Some("no") | Some("0") | Some("false") => false,
            Some(v) => return Err(dev.node.val_err("assign", format!("'{v}': use yes or no"))),
        };
        let kernel = ctx.kernel_irqchip.is_some();
        let lines: [Arc<dyn IrqLine>; 4] = std::array::from_fn(|i| {
            let l = ctx.irq_line(palacios_pci::PIRQ_GSI[i]);
            if kernel {
                l
            } else {
                // Idle: electrically high.
                l.set_level(true);
                Arc::new(ActiveLow(l)) as Arc<dyn IrqLine>
            }
        });
        let root = PciRoot::new(ctx.pio.clone(), ctx.mmio.clone(), lines);
        // ISA IRQs a PIRQ may be routed to by the PIIX3 (asserted-high, like ISA devices).
        root.set_isa_lines((0..16).map(|i| ctx.irq_line(i)).collect());
        ctx.add_ports(
            0xcf8,
            8,
            &dev.id,
            Arc::new(Mutex::new(Conf1::new(root.clone()))),
        )
        .map_err(|e| dev.node.err(e.msg))?;
        ctx.mmio
            .insert_relative(
                palacios_pci::ECAM_BASE,
                palacios_pci::ECAM_SIZE,
                &format!("{}.ecam", dev.id),
                Arc::new(Mutex::new(Ecam { root: root.clone() })),
            )
            .map_err(|e| dev.node.err(e.to_string()))?;
        ctx.provide(root.clone());
        let node = dev.node.clone();
        // Assign in a second round of finishers: functions whose backends are only known at
        // the end (virtio disks) plug themselves in during the first.
        ctx.on_finish(move |ctx| {
            ctx.on_finish(move |_ctx| {
                if assign {
                    root.assign_resources().map_err(|e| node.err(e))?;
                }
                Ok(())
            });
            Ok(())
        });
        Ok(())
    }
}

/// A fixed-function bridge: config space only.
struct Bridge {
    cfg: ConfigSpace,
}

impl PciDevice for Bridge {
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

fn add_bridge(
    ctx: &mut BuildCtx,
    dev: &DeviceConfig,
    at: DevFn,
    cfg: ConfigSpace,
) -> Result<(), ConfigError> {
    let root = pci_root(ctx, dev)?;
    let b = Arc::new(Mutex::new(Bridge { cfg }));
    root.add(Some(at), &dev.id, b.clone())
        .map_err(|e| dev.node.err(e))?;
    let (b1, b2) = (b.clone(), b);
    ctx.register_state(state_fn(
        1,
        move || palacios_vmm::bus::lock(&b1).cfg.clone(),
        move |saved: ConfigSpace| palacios_vmm::bus::lock(&b2).cfg.restore_from(&saved),
    ));
    Ok(())
}

pub struct I440fxClass;

impl DeviceClass for I440fxClass {
    fn name(&self) -> &'static str {
        "i440FX"
    }
    fn help(&self) -> &'static str {
        "the i440FX host bridge (8086:1237) at 00:00.0"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[DeviceOption {
            name: "bus",
            help: "the PCI bus device's id",
        }]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let cfg = ConfigSpace::new(0x8086, 0x1237, (0x06, 0x00, 0x00), 2);
        add_bridge(ctx, dev, DevFn::new(0, 0), cfg)
    }
}

pub struct Piix3Class;

impl DeviceClass for Piix3Class {
    fn name(&self) -> &'static str {
        "PIIX3"
    }
    fn help(&self) -> &'static str {
        "the PIIX3 PCI-to-ISA bridge (8086:7000) at 00:01.0 with PIRQ route registers 0x60-0x63"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[DeviceOption {
            name: "bus",
            help: "the PCI bus device's id",
        }]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let mut cfg = ConfigSpace::new(0x8086, 0x7000, (0x06, 0x01, 0x00), 0);
        // Multi-function (the IDE controller is function 1 on real boards).
        cfg.set_header_type(0x80);
        for r in 0x60..0x64 {
            // PIRQ route: IRQ in bits 3:0, disable in bit 7; default disabled.
            cfg.bytes_mut()[r] = 0x80;
        }
        for o in 0x60..0x64 {
            cfg.set_wmask_byte(o, 0x8f);
        }
        let root = pci_root(ctx, dev)?;
        let p = Arc::new(Mutex::new(Piix3 {
            cfg,
            root: Arc::downgrade(&root),
        }));
        root.add(Some(DevFn::new(1, 0)), &dev.id, p.clone())
            .map_err(|e| dev.node.err(e))?;
        let (p1, p2) = (p.clone(), p);
        ctx.register_state(state_fn(
            1,
            move || palacios_vmm::bus::lock(&p1).cfg.clone(),
            move |saved: ConfigSpace| {
                let mut p = palacios_vmm::bus::lock(&p2);
                p.cfg.restore_from(&saved)?;
                p.apply_routes();
                Ok(())
            },
        ));
        Ok(())
    }
}

/// The PIIX3 ISA bridge: its PIRQ route registers steer PCI INTx to ISA IRQs.
struct Piix3 {
    cfg: ConfigSpace,
    root: std::sync::Weak<PciRoot>,
}

impl Piix3 {
    fn apply_routes(&self) {
        if let Some(root) = self.root.upgrade() {
            for i in 0..4 {
                root.set_pirq_route(i, self.cfg.bytes()[0x60 + i]);
            }
        }
    }
}

impl PciDevice for Piix3 {
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn config_written(&mut self, offset: usize, len: usize) {
        if offset < 0x64 && offset + len > 0x60 {
            self.apply_routes();
        }
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
