//! PCI for Palacios-rs: configuration spaces, MSI-X, and the root bus (configuration
//! mechanism #1 at 0xCF8/0xCFC and ECAM) that maps each function's BARs onto the VM's port
//! and MMIO buses as the guest programs them.
//!
//! A function implements [`PciDevice`]; the [`PciRoot`] owns the slot table, answers
//! configuration cycles, and after every configuration write compares the BARs that decode
//! with what it mapped, moving, adding or removing bus ranges to match. BAR accesses reach the
//! function as (BAR index, offset), so a moved BAR needs nothing from the device.

pub mod config;
pub mod msi;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use palacios_vmm::bus::{Bus, BusDevice, lock};
use palacios_vmm::irq::IrqLine;

pub use config::{BarKind, BarMapping, BarSpec, ConfigSpace};

/// The VM's PCI bus, for a device that sits on it (`<bus>`), or an error naming what to add.
pub fn pci_root(
    ctx: &palacios_vmm::BuildCtx,
    dev: &palacios_vmm::config::DeviceConfig,
) -> Result<Arc<PciRoot>, palacios_vmm::ConfigError> {
    ctx.service::<PciRoot>().ok_or_else(|| {
        dev.node.err(format!(
            "device '{}' ({}) sits on a PCI bus: add <device class=\"PCI\" id=\"pci0\"/> before it",
            dev.id, dev.class
        ))
    })
}

/// One PCI function.
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// A configuration read; the default reads the config space. Devices with registers that
    /// change by themselves override it.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A configuration write; the default applies the write masks, then calls
    /// [`PciDevice::config_written`].
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
        self.config_written(offset, data.len());
    }
    /// After the guest wrote `[offset, offset+len)` (MSI-X enable, command register, ...).
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The BARs now decode at these addresses (for example to register ioeventfds).
    fn bars_mapped(&mut self, _bars: &[BarMapping]) {}
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// A device function number: slot (0-31) and function (0-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevFn(pub u8);

impl DevFn {
    pub fn new(slot: u8, func: u8) -> Self {
        DevFn((slot & 31) << 3 | (func & 7))
    }
    pub fn slot(self) -> u8 {
        self.0 >> 3
    }
    pub fn func(self) -> u8 {
        self.0 & 7
    }
}

impl std::fmt::Display for DevFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00:{:02x}.{}", self.slot(), self.func())
    }
}

struct Slot {
    name: String,
    dev: SharedPciDevice,
    mapped: Vec<BarMapping>,
}

/// The first ECAM window (bus 0 only): 1 MiB at this address, described by the MCFG.
pub const ECAM_BASE: u64 = 0xb000_0000;
pub const ECAM_SIZE: u64 = 1 << 20;
/// Where firmware-less boots place BARs: 32-bit memory BARs from here (below the IOAPIC),
/// I/O BARs from 0xc000.
pub const MEM_WINDOW: (u64, u64) = (0xc000_0000, 0xfec0_0000);
pub const IO_WINDOW: (u64, u64) = (0xc000, 0x1_0000);
/// The x86 interrupt window (local APICs, MSI targets): never decoded by PCI.
pub const LAPIC_WINDOW: (u64, u64) = (0xfee0_0000, 0xfef0_0000);
/// The GSIs of PIRQA..D on the IOAPIC (pins 16-19): INTx of slot S pin P (1-4) goes to
/// PIRQ[(S + P - 1) % 4].
pub const PIRQ_GSI: [u32; 4] = [16, 17, 18, 19];

/// Bus 0 of the VM.
pub struct PciRoot {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    slots: Mutex<BTreeMap<DevFn, Slot>>,
    /// PIRQA..D lines, each shared by the functions routed to it: asserted while any is.
    pirq: [Arc<dyn IrqLine>; 4],
    pirq_state: Mutex<[u32; 4]>,
    /// PIRQ → ISA IRQ routes (the PIIX3's registers 0x60-0x63) and the ISA lines (0-15).
    pirq_route: Mutex<[Option<u8>; 4]>,
    isa_lines: std::sync::OnceLock<Vec<Arc<dyn IrqLine>>>,
    /// Counts of configuration writes the root ignored (no such function, bad BAR).
    pub bad_bar_maps: std::sync::atomic::AtomicU64,
}

impl PciRoot {
    /// `pirq` are the four INTx lines in "asserted" sense.
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>, pirq: [Arc<dyn IrqLine>; 4]) -> Arc<Self> {
        Arc::new(PciRoot {
            pio,
            mmio,
            slots: Mutex::new(BTreeMap::new()),
            pirq,
            pirq_state: Mutex::new([0; 4]),
            pirq_route: Mutex::new([None; 4]),
            isa_lines: std::sync::OnceLock::new(),
            bad_bar_maps: Default::default(),
        })
    }

    /// Plug a function in at `at` or at the first free slot (function 0). Returns where.
    pub fn add(
        &self,
        at: Option<DevFn>,
        name: &str,
        dev: SharedPciDevice,
    ) -> Result<DevFn, String> {
        let mut slots = lock(&self.slots);
        let at = match at {
            Some(a) => {
                if let Some(s) = slots.get(&a) {
                    return Err(format!(
                        "PCI {a} is taken by '{}', cannot add '{name}'",
                        s.name
                    ));
                }
                a
            }
            None => (0..32)
                .map(|s| DevFn::new(s, 0))
                .find(|d| !slots.contains_key(d))
                .ok_or_else(|| format!("no free PCI slot for '{name}' (all 32 are used)"))?,
        };
        slots.insert(
            at,
            Slot {
                name: name.into(),
                dev,
                mapped: Vec::new(),
            },
        );
        Ok(at)
    }

    /// The functions plugged in: (address, name, vendor, device).
    pub fn functions(&self) -> Vec<(DevFn, String, u16, u16)> {
        lock(&self.slots)
            .iter()
            .map(|(a, s)| {
                let d = lock(&s.dev);
                (*a, s.name.clone(), d.config().vendor(), d.config().device())
            })
            .collect()
    }

    /// The INTx line a function at `at` with interrupt pin `pin` (1-4) drives.
    pub fn intx_line(self: &Arc<Self>, at: DevFn, pin: u8) -> Arc<dyn IrqLine> {
        let pirq = (at.slot() as usize + (pin.clamp(1, 4) as usize - 1)) % 4;
        Arc::new(IntxLine {
            root: Arc::downgrade(self),
            pirq,
            devfn: at,
            level: Mutex::new(false),
        })
    }

    fn set_pirq(&self, pirq: usize, delta: i32) {
        let mut st = lock(&self.pirq_state);
        let before = st[pirq] > 0;
        st[pirq] = st[pirq].saturating_add_signed(delta);
        let after = st[pirq] > 0;
        if before != after {
            self.pirq[pirq].set_level(after);
            if let Some(irq) = lock(&self.pirq_route)[pirq] {
                self.isa(irq, after);
            }
        }
    }

    fn isa(&self, irq: u8, level: bool) {
        if let Some(l) = self.isa_lines.get().and_then(|v| v.get(irq as usize)) {
            l.set_level(level);
        }
    }

    /// The ISA IRQ lines 0-15 a PIRQ can be routed to (the PIC's inputs).
    pub fn set_isa_lines(&self, lines: Vec<Arc<dyn IrqLine>>) {
        let _ = self.isa_lines.set(lines);
    }

    /// A PIIX3 PIRQ route register (0x60 + `pirq`): bit 7 disables the route, bits 3-0 are
    /// the ISA IRQ. IRQs the PIIX3 cannot route to (0-2, 8, 13) disable it too.
    pub fn set_pirq_route(&self, pirq: usize, reg: u8) {
        if pirq >= 4 {
            return;
        }
        let irq = reg & 0x0f;
        let new = (reg & 0x80 == 0 && !matches!(irq, 0..=2 | 8 | 13)).then_some(irq);
        let asserted = lock(&self.pirq_state)[pirq] > 0;
        let mut routes = lock(&self.pirq_route);
        let old = std::mem::replace(&mut routes[pirq], new);
        drop(routes);
        if old != new && asserted {
            if let Some(o) = old {
                self.isa(o, false);
            }
            if let Some(n) = new {
                self.isa(n, true);
            }
        }
    }

    /// A configuration read of function `devfn` on bus `bus`. Absent functions read as
    /// all-ones (the master abort a probe expects).
    pub fn config_read(&self, bus: u8, devfn: DevFn, offset: usize, data: &mut [u8]) {
        let dev = (bus == 0)
            .then(|| lock(&self.slots).get(&devfn).map(|s| s.dev.clone()))
            .flatten();
        match dev {
            Some(d) => lock(&d).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; BAR mappings follow.
    pub fn config_write(&self, bus: u8, devfn: DevFn, offset: usize, data: &[u8]) {
        if bus != 0 {
            return;
        }
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(&devfn) else {
            return;
        };
        let dev = slot.dev.clone();
        let mut d = lock(&dev);
        d.config_write(offset, data);
        let want = d.config().active_bars();
        if want != slot.mapped {
            self.remap(&slot.name, &dev, &mut slot.mapped, &want);
            let now = slot.mapped.clone();
            d.bars_mapped(&now);
        }
    }

    /// Move the bus ranges of one function from `mapped` to `want`. A BAR that would overlap
    /// another device's range is left unmapped (it decodes nothing) and counted.
    fn remap(
        &self,
        name: &str,
        dev: &SharedPciDevice,
        mapped: &mut Vec<BarMapping>,
        want: &[BarMapping],
    ) {
        for m in mapped.drain(..) {
            let _ = self.bus(m.kind).remove(m.addr);
        }
        for w in want {
            // The interrupt window belongs to the local APICs: the CPU never sends those
            // accesses to PCI (and MSI writes target it), so a BAR there decodes nothing.
            if w.kind != BarKind::Io && w.addr < LAPIC_WINDOW.1 && w.addr + w.size > LAPIC_WINDOW.0
            {
                self.bad_bar_maps
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    "PCI: BAR {} of '{name}' at {:#x} overlaps the local APIC window; not mapped",
                    w.index,
                    w.addr
                );
                continue;
            }
            let region = Arc::new(Mutex::new(BarRegion {
                dev: dev.clone(),
                bar: w.index,
            }));
            let label = format!("{name}.bar{}", w.index);
            match self
                .bus(w.kind)
                .insert_relative(w.addr, w.size, &label, region)
            {
                Ok(()) => mapped.push(*w),
                Err(e) => {
                    self.bad_bar_maps
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!("PCI: BAR not mapped: {e}");
                }
            }
        }
    }

    fn bus(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio,
            _ => &self.mmio,
        }
    }

    /// Give every function's BARs addresses and enable decoding, as firmware would (for
    /// boots without a BIOS). Memory BARs are packed largest first from the memory window,
    /// I/O BARs from the I/O window; bus mastering is enabled.
    pub fn assign_resources(&self) -> Result<(), String> {
        let list: Vec<(DevFn, SharedPciDevice)> = lock(&self.slots)
            .iter()
            .map(|(a, s)| (*a, s.dev.clone()))
            .collect();
        let mut bars = Vec::new();
        for (at, dev) in &list {
            let d = lock(dev);
            for i in 0..6 {
                if let Some(spec) = d.config().bar_spec(i) {
                    bars.push((*at, dev.clone(), i, spec));
                }
            }
        }
        bars.sort_by_key(|b| std::cmp::Reverse(b.3.size));
        let (mut mem, mut io) = (MEM_WINDOW.0, IO_WINDOW.0);
        for (at, dev, i, spec) in bars {
            let (next, end) = if spec.kind == BarKind::Io {
                (&mut io, IO_WINDOW.1)
            } else {
                (&mut mem, MEM_WINDOW.1)
            };
            let addr = next.next_multiple_of(spec.size);
            if addr + spec.size > end {
                return Err(format!(
                    "the PCI BARs do not fit the {} window (BAR {i} of {at}, {} bytes)",
                    if spec.kind == BarKind::Io {
                        "I/O"
                    } else {
                        "memory"
                    },
                    spec.size
                ));
            }
            *next = addr + spec.size;
            lock(&dev).config_mut().set_bar_address(i, addr);
        }
        for (at, dev) in list {
            let cmd = {
                let d = lock(&dev);
                d.config().command() | config::CMD_MEMORY | config::CMD_IO | config::CMD_BUS_MASTER
            };
            self.config_write(0, at, config::COMMAND, &cmd.to_le_bytes());
        }
        Ok(())
    }

    /// Re-establish BAR mappings from the functions' config spaces (after a restore).
    pub fn refresh_mappings(&self) {
        let mut slots = lock(&self.slots);
        for s in slots.values_mut() {
            let dev = s.dev.clone();
            let mut d = lock(&dev);
            let want = d.config().active_bars();
            if want != s.mapped {
                self.remap(&s.name, &dev, &mut s.mapped, &want);
                let now = s.mapped.clone();
                d.bars_mapped(&now);
            }
        }
    }
}

/// A function's INTx pin: asserted while the function asserts it, shared on its PIRQ.
struct IntxLine {
    root: std::sync::Weak<PciRoot>,
    pirq: usize,
    #[allow(dead_code)]
    devfn: DevFn,
    level: Mutex<bool>,
}

impl IrqLine for IntxLine {
    fn set_level(&self, high: bool) {
        let mut l = lock(&self.level);
        if *l == high {
            return;
        }
        *l = high;
        if let Some(r) = self.root.upgrade() {
            r.set_pirq(self.pirq, if high { 1 } else { -1 });
        }
    }
}

/// One mapped BAR on a bus: accesses arrive as offsets within the BAR.
struct BarRegion {
    dev: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data);
    }
}

/// Configuration mechanism #1: the address latch at 0xCF8 and the data window 0xCFC-0xCFF.
pub struct Conf1 {
    root: Arc<PciRoot>,
    addr: u32,
}

impl Conf1 {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Conf1 { root, addr: 0 }
    }

    fn target(&self, port_off: u64) -> Option<(u8, DevFn, usize)> {
        if self.addr & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.addr >> 16) as u8;
        let devfn = DevFn((self.addr >> 8) as u8);
        let reg = (self.addr & 0xfc) as usize + (port_off as usize & 3);
        Some((bus, devfn, reg))
    }
}

impl BusDevice for Conf1 {
    fn read(&mut self, port: u64, data: &mut [u8]) {
        match port {
            0xcf8 if data.len() == 4 => data.copy_from_slice(&self.addr.to_le_bytes()),
            0xcfc..=0xcff => match self.target(port - 0xcfc) {
                Some((bus, devfn, reg)) => self.root.config_read(bus, devfn, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }
    fn write(&mut self, port: u64, data: &[u8]) {
        match port {
            // Only dword writes latch an address (byte writes to 0xCF8-0xCFB belong to other
            // chipset registers, such as the reset control at 0xCF9).
            0xcf8 if data.len() == 4 => {
                self.addr = u32::from_le_bytes(data.try_into().unwrap()) & 0x80ff_fffc;
            }
            0xcfc..=0xcff => {
                if let Some((bus, devfn, reg)) = self.target(port - 0xcfc) {
                    self.root.config_write(bus, devfn, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM (memory-mapped configuration, PCIe): offset = bus << 20 | devfn << 12 | register.
pub struct Ecam {
    pub root: Arc<PciRoot>,
}

impl BusDevice for Ecam {
    fn read(&mut self, off: u64, data: &mut [u8]) {
        let (bus, devfn, reg) = (
            (off >> 20) as u8,
            DevFn((off >> 12) as u8),
            (off & 0xfff) as usize,
        );
        self.root.config_read(bus, devfn, reg, data);
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        let (bus, devfn, reg) = (
            (off >> 20) as u8,
            DevFn((off >> 12) as u8),
            (off & 0xfff) as usize,
        );
        self.root.config_write(bus, devfn, reg, data);
    }
}

#[cfg(test)]
mod tests;
