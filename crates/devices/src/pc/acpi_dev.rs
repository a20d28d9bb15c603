//! `ACPI`: static ACPI tables and the fixed power-management registers a guest needs to find
//! the interrupt controllers and to power the machine off.
//!
//! Tables (built with rust-vmm's `acpi_tables`) go to 0xE0000, where guests search for the
//! RSDP: RSDP → XSDT → FADT (→ FACS, DSDT) and MADT.
//! - The MADT lists a local APIC per core, the IOAPIC at 0xFEC00000 (GSIs 0-23) and the ISA
//!   overrides of the standard PC: IRQ0 → GSI2, and the SCI (IRQ9) level-triggered.
//! - The FADT is a full (not hardware-reduced) one, so guests keep the PIT and the PIC: PM1a
//!   event block at 0x600, PM1a control at 0x604, and the `PM_TIMER` at 0x608. SMI_CMD is 0:
//!   the machine is always in ACPI mode (SCI_EN reads as 1).
//! - The DSDT declares only `\_S5` (soft off, SLP_TYP 5).
//!
//! Power off: a guest write of SLP_EN with SLP_TYP=5 to PM1a control ends the VM with
//! [`Outcome::PowerOff`] (`v3` exit status 0). This is what Linux's `poweroff` does.

use std::sync::{Arc, Mutex};

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use palacios_vmm::config::DeviceConfig;
use palacios_vmm::state::state_fn;
use palacios_vmm::{
    BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption, Outcome, VmHandle,
};
use vm_memory::{Bytes, GuestAddress};

pub const TABLES_BASE: u64 = 0xe_0000;
pub const PM1A_EVT: u16 = 0x600;
pub const PM1A_CNT: u16 = 0x604;
pub const PM_TMR: u16 = 0x608;
pub const SCI_IRQ: u16 = 9;
/// SLP_TYP of `\_S5`.
pub const S5_TYP: u16 = 5;
const OEM_ID: [u8; 6] = *b"PALRS ";
const OEM_TABLE: [u8; 8] = *b"PALACIOS";

pub struct AcpiClass;

impl DeviceClass for AcpiClass {
    fn name(&self) -> &'static str {
        "ACPI"
    }
    fn help(&self) -> &'static str {
        "ACPI tables at 0xe0000 (MADT, FADT, DSDT with \\_S5) and PM1 registers at 0x600/0x604: \
         the guest finds its cores and IOAPIC, and powers off through S5"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        // The tables describe devices created after this one too (the PCI root bridge).
        let node = dev.node.clone();
        ctx.on_finish(move |ctx| {
            let pci = ctx.service::<palacios_pci::PciRoot>().is_some();
            let tables = build_tables(ctx.cores, TABLES_BASE, pci);
            if !ctx.map.is_backed(TABLES_BASE, tables.len() as u64) {
                return Err(node.err(format!(
                    "the ACPI tables ({} bytes at {TABLES_BASE:#x}) do not fit in guest RAM",
                    tables.len()
                )));
            }
            ctx.mem
                .write_slice(&tables, GuestAddress(TABLES_BASE))
                .map_err(|e| node.err(format!("writing the ACPI tables: {e}")))
        });
        let pm = Arc::new(Mutex::new(Pm1 {
            regs: Pm1Regs::default(),
            vm: ctx.vm.clone(),
        }));
        let (p1, p2) = (pm.clone(), pm.clone());
        ctx.register_state(state_fn(
            1,
            move || lock(&p1).regs.clone(),
            move |regs: Pm1Regs| {
                if regs.control & SLP_EN != 0 {
                    return Err("ACPI: PM1a control with SLP_EN set (it reads as 0)".into());
                }
                lock(&p2).regs = regs;
                Ok(())
            },
        ));
        ctx.add_ports(PM1A_EVT, 4, &dev.id, pm.clone())
            .map_err(|e| dev.node.err(e.msg))?;
        ctx.add_ports(PM1A_CNT, 2, &dev.id, pm)
            .map_err(|e| dev.node.err(e.msg))
    }
}

/// The DSDT's PCI part: the root bridge `\_SB.PCI0` (bus 0, its I/O and memory windows, and
/// `_PRT` routing INTx of every slot to the IOAPIC's PIRQ pins, swizzled by slot), and a
/// motherboard resource reserving the ECAM window (Linux uses MMCONFIG only where it is).
fn pci_aml(out: &mut Vec<u8>) {
    use palacios_pci::{ECAM_BASE, ECAM_SIZE, IO_WINDOW, MEM_WINDOW, PIRQ_GSI};
    let mut entries: Vec<(u32, u8, u32)> = Vec::new();
    for slot in 0..32u32 {
        for pin in 0..4u8 {
            let gsi = PIRQ_GSI[(slot as usize + pin as usize) % 4];
            entries.push(((slot << 16) | 0xffff, pin, gsi));
        }
    }
    let pkgs: Vec<aml::Package> = entries
        .iter()
        .map(|(adr, pin, gsi)| aml::Package::new(vec![adr, pin, &aml::ZERO, gsi]))
        .collect();
    let refs: Vec<&dyn Aml> = pkgs.iter().map(|p| p as &dyn Aml).collect();
    let prt = aml::Package::new(refs);
    let io_lo = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let conf = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_hi = aml::AddressSpace::new_io(0xd00u16, (IO_WINDOW.1 - 1) as u16, None);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let vga = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        0xa_0000u32,
        0xb_ffffu32,
        None,
    );
    let mem = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        MEM_WINDOW.0 as u32,
        (MEM_WINDOW.1 - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &conf, &io_lo, &io_hi, &vga, &mem]);
    let hid = aml::EISAName::new("PNP0A03");
    let hid_c02 = aml::EISAName::new("PNP0C02");
    let ecam = aml::Memory32Fixed::new(false, ECAM_BASE as u32, ECAM_SIZE as u32);
    let ecam_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let n = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_ADR".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
        aml::Name::new("_PRT".into(), &prt),
    ];
    let pci0 = aml::Device::new("PCI0".into(), n.iter().map(|x| x as &dyn Aml).collect());
    let m = [
        aml::Name::new("_HID".into(), &hid_c02),
        aml::Name::new("_UID".into(), &aml::ONE),
        aml::Name::new("_CRS".into(), &ecam_crs),
    ];
    let mres = aml::Device::new("MRES".into(), m.iter().map(|x| x as &dyn Aml).collect());
    aml::Scope::new("\\_SB_".into(), vec![&pci0, &mres]).to_aml_bytes(out);
}

/// The tables, laid out from `base` (the RSDP first, 16-byte aligned; FACS 64-byte aligned).
/// With `pci`, the DSDT describes the PCI root bridge and an MCFG the ECAM window.
pub fn build_tables(cores: u32, base: u64, pci: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let align = |out: &mut Vec<u8>, a: usize| out.resize(out.len().next_multiple_of(a), 0);
    let rsdp_len = Rsdp::len();
    out.resize(rsdp_len, 0);
    align(&mut out, 64);

    let facs_at = base + out.len() as u64;
    FACS::new().to_aml_bytes(&mut out);
    align(&mut out, 16);

    // DSDT: Name (\_S5, Package (4) { 5, 0, 0, 0 }).
    let dsdt_at = base + out.len() as u64;
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&(S5_TYP as u8), &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);
    if pci {
        pci_aml(&mut body);
    }
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, 1);
    dsdt.append_slice(&body);
    dsdt.update_checksum();
    out.extend_from_slice(dsdt.as_slice());
    align(&mut out, 16);

    let fadt_at = base + out.len() as u64;
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1);
    f.sci_int = SCI_IRQ.into();
    f.pm1a_evt_blk = u32::from(PM1A_EVT).into();
    f.pm1a_cnt_blk = u32::from(PM1A_CNT).into();
    f.pm_tmr_blk = u32::from(PM_TMR).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    // The RTC has a century register at CMOS 0x32.
    f.century = 0x32;
    // Legacy devices and an 8042 are present (guests keep probing the ISA devices).
    f.iapc_boot_arch = 0x3u16.into();
    let io = |port: u16, bytes: u8| {
        acpi_tables::gas::GAS::new(
            acpi_tables::gas::AddressSpace::SystemIo,
            bytes * 8,
            0,
            acpi_tables::gas::AccessSize::Undefined,
            u64::from(port),
        )
    };
    f.x_pm1a_evt_blk = io(PM1A_EVT, 4);
    f.x_pm1a_cnt_blk = io(PM1A_CNT, 2);
    f.x_pm_tmr_blk = io(PM_TMR, 4);
    let fadt = f
        .dsdt_64(dsdt_at)
        .firmware_ctrl_64(facs_at)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::TmrValExt)
        .finalize();
    fadt.to_aml_bytes(&mut out);
    align(&mut out, 16);

    let madt_at = base + out.len() as u64;
    out.extend_from_slice(madt(cores).as_slice());
    align(&mut out, 16);

    let mcfg_at = base + out.len() as u64;
    if pci {
        let mut m = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE, 1);
        m.add_ecam(palacios_pci::ECAM_BASE, 0, 0, 0);
        m.to_aml_bytes(&mut out);
        align(&mut out, 16);
    }

    let xsdt_at = base + out.len() as u64;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    if pci {
        xsdt.add_entry(mcfg_at);
    }
    xsdt.to_aml_bytes(&mut out);

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp);
    out[..rsdp_len].copy_from_slice(&rsdp);
    out
}

/// The MADT: local APICs 0..cores-1, the IOAPIC, the ISA interrupt overrides.
fn madt(cores: u32) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 3, OEM_ID, OEM_TABLE, 1);
    t.write_u32(36, 0xfee0_0000);
    t.write_u32(40, 1); // PCAT_COMPAT: there is a PIC pair.
    for i in 0..cores.min(255) {
        // Processor local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
        t.append_slice(&[0, 8, i as u8, i as u8, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, ID, reserved, address, GSI base.
    let mut io = vec![1, 12, cores.min(15) as u8, 0];
    io.extend_from_slice(&0xfec0_0000u32.to_le_bytes());
    io.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&io);
    // Interrupt source overrides: type 2, length 10, bus 0 (ISA), source, GSI, flags.
    let iso = |src: u8, gsi: u32, flags: u16| {
        let mut v = vec![2, 10, 0, src];
        v.extend_from_slice(&gsi.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    };
    t.append_slice(&iso(0, 2, 0));
    // SCI: active high (01), level triggered (11 << 2).
    t.append_slice(&iso(SCI_IRQ as u8, u32::from(SCI_IRQ), 0x0d));
    // Local APIC NMI on LINT1 of every processor: type 4, length 6, UID 0xff, flags, LINT#.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t
}

/// The PM1a event (status, enable) and control registers; their serde form is the checkpoint
/// state (the tables are rebuilt into guest memory with the VM, and saved with it).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pm1Regs {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

/// SCI_EN: the machine is in ACPI mode.
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;

impl Pm1Regs {
    /// Read `off` (0-3: event block, 4-5: control) of `size` bytes.
    pub fn read(&self, off: u16) -> u16 {
        match off {
            0 => self.status,
            2 => self.enable,
            4 => self.control | SCI_EN,
            _ => 0,
        }
    }

    /// Write; returns the SLP_TYP the guest asked to enter, if it set SLP_EN.
    pub fn write(&mut self, off: u16, v: u16) -> Option<u16> {
        match off {
            // Status bits are write-one-to-clear.
            0 => self.status &= !v,
            2 => self.enable = v,
            4 => {
                self.control = v & !SLP_EN;
                if v & SLP_EN != 0 {
                    return Some((v >> 10) & 7);
                }
            }
            _ => {}
        }
        None
    }
}

fn lock(p: &Mutex<Pm1>) -> std::sync::MutexGuard<'_, Pm1> {
    p.lock().unwrap_or_else(|p| p.into_inner())
}

struct Pm1 {
    regs: Pm1Regs,
    vm: VmHandle,
}

impl BusDevice for Pm1 {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let off = (addr as u16).wrapping_sub(PM1A_EVT);
        let v = self.regs.read(off & !1) >> (8 * (off & 1));
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate().take(2) {
            *b = (v >> (8 * i)) as u8;
        }
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        let off = (addr as u16).wrapping_sub(PM1A_EVT);
        // Byte writes of the high half are merged with the low half's current value.
        let (reg, v) = if off & 1 == 1 {
            let cur = self.regs.read(off - 1);
            (off - 1, (cur & 0xff) | (u16::from(data[0]) << 8))
        } else {
            let lo = u16::from(data[0]);
            let hi = data.get(1).map(|b| u16::from(*b) << 8);
            let cur = self.regs.read(off);
            (off, lo | hi.unwrap_or(cur & 0xff00))
        };
        if let Some(typ) = self.regs.write(reg, v) {
            if typ == S5_TYP {
                tracing::info!("ACPI: the guest entered S5 (soft off)");
                self.vm.stop(Outcome::PowerOff);
            } else {
                tracing::warn!("ACPI: sleep type {typ} is not supported (only S5); ignored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn tables_link_up_with_valid_checksums() {
        let base = TABLES_BASE;
        let t = build_tables(4, base, false);
        assert_eq!(&t[..8], b"RSD PTR ");
        assert_eq!(sum(&t[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&t[..36]), 0, "RSDP extended checksum");
        let at = |a: u64| {
            assert!(a >= base, "address {a:#x} below the tables");
            (a - base) as usize
        };
        let xsdt = at(u64_at(&t, 24));
        assert_eq!(&t[xsdt..xsdt + 4], b"XSDT");
        let xlen = u32_at(&t, xsdt + 4) as usize;
        assert_eq!(sum(&t[xsdt..xsdt + xlen]), 0);
        let entries: Vec<u64> = (0..(xlen - 36) / 8)
            .map(|i| u64_at(&t, xsdt + 36 + 8 * i))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|&e| &t[at(e)..at(e) + 4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
        for &e in &entries {
            let o = at(e);
            let len = u32_at(&t, o + 4) as usize;
            assert_eq!(sum(&t[o..o + len]), 0, "{:?}", &t[o..o + 4]);
        }
        // FADT → DSDT with \_S5 = Package { 5, 0, 0, 0 }; PM1 blocks where the device is.
        let fadt = at(entries[0]);
        assert_eq!(u32_at(&t, fadt + 56), u32::from(PM1A_EVT));
        assert_eq!(u32_at(&t, fadt + 64), u32::from(PM1A_CNT));
        assert_eq!(u32_at(&t, fadt + 76), u32::from(PM_TMR));
        let dsdt = at(u64_at(&t, fadt + 140));
        assert_eq!(&t[dsdt..dsdt + 4], b"DSDT");
        let dlen = u32_at(&t, dsdt + 4) as usize;
        assert_eq!(sum(&t[dsdt..dsdt + dlen]), 0);
        let body = &t[dsdt + 36..dsdt + dlen];
        assert_eq!(&body[..5], b"\x08_S5_");
        assert_eq!(body[5], 0x12, "PackageOp");
        assert_eq!(&body[7..], &[4, 0x0a, 5, 0, 0, 0]);
        let facs = at(u64_at(&t, fadt + 132));
        assert_eq!(&t[facs..facs + 4], b"FACS");
        assert_eq!(facs % 64, 0);
        // MADT: 4 local APICs, then the IOAPIC.
        let madt = at(entries[1]);
        let mut o = madt + 44;
        let mut lapics = 0;
        let mut ioapic = None;
        let mut isos = Vec::new();
        while o < madt + u32_at(&t, madt + 4) as usize {
            match t[o] {
                0 => lapics += 1,
                1 => ioapic = Some(u32_at(&t, o + 4)),
                2 => isos.push((t[o + 3], u32_at(&t, o + 4))),
                _ => {}
            }
            o += t[o + 1] as usize;
        }
        assert_eq!(lapics, 4);
        assert_eq!(ioapic, Some(0xfec0_0000));
        assert_eq!(isos, [(0, 2), (9, 9)]);
    }

    #[test]
    fn pm1_control_reports_sleep_requests() {
        let mut r = Pm1Regs::default();
        assert_eq!(r.read(4) & SCI_EN, SCI_EN, "always in ACPI mode");
        assert_eq!(r.write(4, 5 << 10), None, "SLP_TYP without SLP_EN");
        assert_eq!(r.write(4, (5 << 10) | SLP_EN), Some(5));
        assert_eq!(r.read(4) & SLP_EN, 0, "SLP_EN reads as zero");
        r.status = 0x8001;
        r.write(0, 0x0001);
        assert_eq!(r.read(0), 0x8000, "write one to clear");
    }
}
