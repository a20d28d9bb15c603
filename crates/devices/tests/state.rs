//! Checkpoint state of the device classes: every class either registers its state or says it
//! has none, every stateful device restores exactly what it saved (the same state, the same
//! answers to the guest, the same timers), and malformed state is refused without panicking.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use palacios_vmm::bus::set_current_cpu;
use palacios_vmm::config::DeviceConfig;
use palacios_vmm::host::DryRunHost;
use palacios_vmm::state::StateValue;
use palacios_vmm::{
    BuildCtx, ConfigError, DeviceClass, DeviceOption, MemoryMap, Registry, Vm, VmConfig, VmHandle,
};
use serde_json::json;

/// A device of every class, as `(class, <device>)`. A class missing here fails
/// [`every_class_saves_its_state_or_says_it_has_none`].
const DEVICES: &[(&str, &str)] = &[
    ("8259A", r#"<device class="8259A" id="pic"/>"#),
    ("8254_PIT", r#"<device class="8254_PIT" id="pit"/>"#),
    ("LAPIC", r#"<device class="LAPIC" id="lapic"/>"#),
    ("IOAPIC", r#"<device class="IOAPIC" id="ioapic"/>"#),
    (
        "NVRAM",
        r#"<device class="NVRAM" id="nvram"><start_time>1700000000</start_time></device>"#,
    ),
    ("KEYBOARD", r#"<device class="KEYBOARD" id="keyboard"/>"#),
    ("FW_CFG", r#"<device class="FW_CFG" id="fw_cfg"/>"#),
    ("PC_TESTDEV", r#"<device class="PC_TESTDEV" id="testdev"/>"#),
    ("MPTABLE", r#"<device class="MPTABLE" id="mptable"/>"#),
    ("PM_TIMER", r#"<device class="PM_TIMER" id="pm_timer"/>"#),
    ("ACPI", r#"<device class="ACPI" id="acpi"/>"#),
    ("SERIAL", r#"<device class="SERIAL" id="serial"/>"#),
    (
        "CHAR_STREAM",
        r#"<device class="CHAR_STREAM" id="com2"><name>null</name><frontend tag="serial"><com_port>2</com_port></frontend></device>"#,
    ),
    ("BOCHS_DEBUG", r#"<device class="BOCHS_DEBUG" id="bochs"/>"#),
    ("OS_DEBUG", r#"<device class="OS_DEBUG" id="os_debug"/>"#),
    (
        "GENERIC",
        r#"<device class="GENERIC" id="generic"><ports start="0x3c0" end="0x3df" mode="IGNORE"/></device>"#,
    ),
    (
        "DEBUG_EXIT",
        r#"<device class="DEBUG_EXIT" id="debug_exit"/>"#,
    ),
    ("PCI", r#"<device class="PCI" id="pci0"/>"#),
    (
        "i440FX",
        r#"<device class="i440FX" id="nb"><bus>pci0</bus></device>"#,
    ),
    (
        "PIIX3",
        r#"<device class="PIIX3" id="sb"><bus>pci0</bus></device>"#,
    ),
];

const CORES: u32 = 2;

fn xml<'a>(cores: u32, devices: impl Iterator<Item = &'a str>) -> String {
    let cores_xml = "<core/>".repeat(cores as usize);
    let devs: String = devices.collect();
    format!(
        r#"<vm class="PC"><memory>32</memory><cores count="{cores}">{cores_xml}</cores><devices>{devs}</devices></vm>"#
    )
}

/// Check that every class of `reg` has a device in `devices`, that validating them leaves no
/// device without state, and that each class registers state exactly when it is not declared
/// stateless. The error names the classes and devices at fault.
fn coverage(reg: &Registry, devices: &[(&str, &str)]) -> Result<Vec<(String, String)>, String> {
    let missing: Vec<&str> = reg
        .classes()
        .map(|c| c.name())
        .filter(|n| !devices.iter().any(|(c, _)| c == n))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "no device of class {} in the coverage config (add one to DEVICES)",
            missing.join(", ")
        ));
    }
    let cfg = VmConfig::parse(&xml(CORES, devices.iter().map(|d| d.1)), Path::new("."))
        .map_err(|e| e.to_string())?;
    let v = Vm::validate(&cfg, reg, Arc::new(DryRunHost)).map_err(|e| e.to_string())?;
    if !v.without_state.is_empty() {
        return Err(format!(
            "devices of stateful classes registered no state (register it with \
             BuildCtx::register_state, or declare the class stateless): {}",
            v.without_state.join(", ")
        ));
    }
    let mut wrong = Vec::new();
    for c in reg.classes() {
        let registered = v.stateful.iter().any(|(_, class)| class == c.name());
        match (c.stateless(), registered) {
            (false, false) => wrong.push(format!("class {} registered no state", c.name())),
            (true, true) => wrong.push(format!(
                "class {} is declared stateless but registered state",
                c.name()
            )),
            _ => {}
        }
    }
    if wrong.is_empty() {
        Ok(v.stateful)
    } else {
        Err(wrong.join("; "))
    }
}

#[test]
fn every_class_saves_its_state_or_says_it_has_none() {
    let reg = palacios_devices::registry();
    let stateful = coverage(&reg, DEVICES).unwrap_or_else(|e| panic!("{e}"));
    // The core's own parts (SymSpy/SymCall registrations) register state too.
    assert!(
        stateful
            .iter()
            .any(|(id, c)| id == "core:symbiotic" && c == "symbiotic"),
        "{stateful:?}"
    );
    let mut classes: Vec<&str> = stateful
        .iter()
        .filter(|(id, _)| !id.starts_with("core:"))
        .map(|(_, c)| c.as_str())
        .collect();
    classes.sort_unstable();
    assert_eq!(
        classes,
        [
            "8254_PIT",
            "8259A",
            "ACPI",
            "BOCHS_DEBUG",
            "FW_CFG",
            "IOAPIC",
            "KEYBOARD",
            "LAPIC",
            "NVRAM",
            "OS_DEBUG",
            "PC_TESTDEV",
            "PIIX3",
            "SERIAL",
            "i440FX",
        ]
    );
    let stateless: Vec<&str> = reg
        .classes()
        .filter(|c| c.stateless())
        .map(|c| c.name())
        .collect();
    assert_eq!(
        stateless,
        [
            "CHAR_STREAM",
            "DEBUG_EXIT",
            "GENERIC",
            "MPTABLE",
            "PCI",
            "PM_TIMER"
        ]
    );
}

/// A stateful class (it does not say otherwise) that forgets to register its state.
struct Forgetful;

impl DeviceClass for Forgetful {
    fn name(&self) -> &'static str {
        "FORGETFUL"
    }
    fn help(&self) -> &'static str {
        "registers nothing"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, _ctx: &mut BuildCtx, _dev: &DeviceConfig) -> Result<(), ConfigError> {
        Ok(())
    }
}

#[test]
fn a_class_that_forgets_its_state_is_named() {
    let mut reg = palacios_devices::registry();
    reg.register(Box::new(Forgetful));
    let e = coverage(&reg, DEVICES).unwrap_err();
    assert!(e.contains("class FORGETFUL"), "{e}");
    let mut devices = DEVICES.to_vec();
    devices.push(("FORGETFUL", r#"<device class="FORGETFUL" id="forgot"/>"#));
    let e = coverage(&reg, &devices).unwrap_err();
    assert!(e.contains("forgot (class FORGETFUL)"), "{e}");
}

// ----- round trip ---------------------------------------------------------------------------

/// Guest time when the devices are built, and when the state is saved.
const T_BUILD: u64 = 5_000_000_000;
/// Late enough that a PIT tick, an RTC periodic event and LAPIC timer expiries are due but
/// not delivered (the timer thread has not run them): the restore must keep them.
const T_SAVE: u64 = T_BUILD + 20_000_000;

/// The devices with state, on a 2-core VM, built at (frozen) guest time [`T_BUILD`].
fn build() -> BuildCtx {
    let devices = DEVICES
        .iter()
        .filter(|(c, _)| !["GENERIC", "DEBUG_EXIT", "MPTABLE", "CHAR_STREAM"].contains(c))
        .map(|d| d.1);
    let cfg = VmConfig::parse(&xml(CORES, devices), Path::new(".")).unwrap();
    let map = MemoryMap::pc(cfg.mem_mib << 20);
    let mem = map.create_memory().unwrap();
    let mut ctx = BuildCtx::new(
        Arc::new(DryRunHost),
        mem,
        map,
        VmHandle::new(cfg.cores),
        cfg.cores,
    );
    ctx.clock.freeze();
    ctx.clock.continue_from(T_BUILD);
    let reg = palacios_devices::registry();
    for d in &cfg.devices {
        reg.create(&mut ctx, d).unwrap();
    }
    ctx.finish().unwrap();
    ctx
}

fn out(ctx: &BuildCtx, port: u16, bytes: &[u8]) {
    assert!(ctx.pio.write(u64::from(port), bytes), "port {port:#x}");
}

fn outb(ctx: &BuildCtx, port: u16, v: u8) {
    out(ctx, port, &[v]);
}

fn inp(ctx: &BuildCtx, port: u16, len: usize) -> u64 {
    let mut b = vec![0u8; len];
    assert!(ctx.pio.read(u64::from(port), &mut b), "port {port:#x}");
    b.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x))
}

fn mmio_write(ctx: &BuildCtx, addr: u64, v: u32) {
    assert!(ctx.mmio.write(addr, &v.to_le_bytes()), "mmio {addr:#x}");
}

fn mmio_read(ctx: &BuildCtx, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(ctx.mmio.read(addr, &mut b), "mmio {addr:#x}");
    u32::from_le_bytes(b)
}

/// Program every stateful device into a state far from reset, through its ports and MMIO.
fn drive(ctx: &BuildCtx) {
    // PIC pair: vectors 0x30/0x38, IRQ 0, 1, 2, 6 unmasked on the master, 9-11 level-triggered.
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xb8),
        (0xa1, 0xf1),
        (0x4d1, 0x0e),
    ] {
        outb(ctx, port, v);
    }
    // PIT: channel 0 mode 2 with 11931, channel 2 gated on in mode 3; a latched count half read.
    outb(ctx, 0x43, 0x34);
    outb(ctx, 0x40, 0x9b);
    outb(ctx, 0x40, 0x2e);
    outb(ctx, 0x61, 0x01);
    outb(ctx, 0x43, 0xb6);
    outb(ctx, 0x42, 0x00);
    outb(ctx, 0x42, 0x10);
    ctx.clock.continue_from(T_BUILD + 777_777);
    outb(ctx, 0x43, 0x00);
    inp(ctx, 0x40, 1);
    // RTC: 64 Hz periodic interrupt enabled, a CMOS byte, the index left at register C with
    // NMI masked.
    for (port, v) in [
        (0x70, 0x0a),
        (0x71, 0x2a),
        (0x70, 0x0b),
        (0x71, 0x42),
        (0x70, 0x40),
        (0x71, 0x5a),
        (0x70, 0x8c),
    ] {
        outb(ctx, port, v);
    }
    // LAPICs: both software-enabled with a TPR; core 0's timer periodic at vector 0x31; core 0
    // sends core 1 a fixed IPI (vector 0x45) and an NMI.
    let lapic = 0xfee0_0000;
    set_current_cpu(1);
    mmio_write(ctx, lapic + 0xf0, 0x1ff);
    mmio_write(ctx, lapic + 0x80, 0x10);
    set_current_cpu(0);
    mmio_write(ctx, lapic + 0xf0, 0x1ff);
    mmio_write(ctx, lapic + 0x80, 0x20);
    mmio_write(ctx, lapic + 0x3e0, 0xb);
    mmio_write(ctx, lapic + 0x320, 0x2_0031);
    mmio_write(ctx, lapic + 0x380, 1_000_000);
    mmio_write(ctx, lapic + 0x310, 1 << 24);
    mmio_write(ctx, lapic + 0x300, 0x45);
    mmio_write(ctx, lapic + 0x300, 0x400);
    // IOAPIC: pin 10 level-triggered, vector 0x41, to APIC 0; IOREGSEL left elsewhere.
    let ioapic = 0xfec0_0000;
    mmio_write(ctx, ioapic, 0x10 + 2 * 10);
    mmio_write(ctx, ioapic + 0x10, 0x8041);
    mmio_write(ctx, ioapic, 0x11 + 2 * 10);
    mmio_write(ctx, ioapic + 0x10, 0);
    mmio_write(ctx, ioapic, 0x10 + 2 * 3);
    // pc-testdev: scratch, MMIO scratch, IRQ 6 (edge on the PIC) and IRQ 10 (level, both
    // controllers) high.
    out(ctx, 0xe0, &0xdead_beefu32.to_le_bytes());
    assert!(
        ctx.mmio
            .write(0xff00_0100, &0x0123_4567_89ab_cdefu64.to_le_bytes())
    );
    assert!(ctx.mmio.write(0xff00_ff00, &[1, 2, 3, 4]));
    outb(ctx, 0x2006, 1);
    outb(ctx, 0x200a, 1);
    // i8042: command byte 0x47, its read-back waiting in the output buffer, the keyboard's
    // LED command acknowledged behind it and waiting for its argument.
    outb(ctx, 0x64, 0x60);
    outb(ctx, 0x60, 0x47);
    outb(ctx, 0x64, 0x20);
    outb(ctx, 0x60, 0xed);
    // COM1: divisor 12, 8N1, RX interrupt on, scratch, two received bytes (through loopback);
    // COM2: scratch.
    for (port, v) in [
        (0x3fb, 0x83),
        (0x3f8, 0x0c),
        (0x3f9, 0x00),
        (0x3fb, 0x03),
        (0x3f9, 0x01),
        (0x3ff, 0xa5),
        (0x3fc, 0x1b),
        (0x3f8, b'h'),
        (0x3f8, b'i'),
        (0x3fc, 0x0b),
        (0x2ff, 0x77),
    ] {
        outb(ctx, port, v);
    }
    // fw_cfg: the signature, two bytes read.
    out(ctx, 0x510, &[0, 0]);
    inp(ctx, 0x511, 1);
    inp(ctx, 0x511, 1);
    // ACPI: PM1 enable bits, a sleep type without SLP_EN.
    out(ctx, 0x602, &[0x20, 0x01]);
    out(ctx, 0x604, &[0x00, 0x04]);
    // Debug ports: partial lines.
    outb(ctx, 0xe9, b'a');
    outb(ctx, 0xe9, b'b');
    outb(ctx, 0x402, b'x');
    outb(ctx, 0xc0c0, b'q');
    out(ctx, 0x99, &[1, 2, 3, 4]);
    ctx.clock.continue_from(T_SAVE);
}

fn save_all(ctx: &BuildCtx) -> BTreeMap<String, (u32, StateValue)> {
    ctx.device_states
        .iter()
        .map(|d| (d.id.clone(), (d.state.version(), d.state.save())))
        .collect()
}

fn restore_all(ctx: &BuildCtx, saved: &BTreeMap<String, (u32, StateValue)>) {
    for d in &ctx.device_states {
        let (version, v) = &saved[&d.id];
        d.state
            .restore(&d.id, *version, v)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// What the guest sees: a fixed sequence of accesses (reads, and writes that make later reads
/// depend on more state), with every value read.
fn probe(ctx: &BuildCtx) -> Vec<(&'static str, u64)> {
    let mut r = Vec::new();
    let lapic = 0xfee0_0000u64;
    // PIC: IRR, IMR, ELCR, then ISR.
    for (name, port) in [
        ("pic irr", 0x20),
        ("pic imr", 0x21),
        ("slave irr", 0xa0),
        ("slave imr", 0xa1),
        ("elcr0", 0x4d0),
        ("elcr1", 0x4d1),
    ] {
        r.push((name, inp(ctx, port, 1)));
    }
    // PIT: the latched high byte, then live counts, port 0x61.
    for (name, port) in [
        ("pit latched hi", 0x40),
        ("pit lo", 0x40),
        ("pit hi", 0x40),
        ("pit2 lo", 0x42),
        ("pit2 hi", 0x42),
        ("port61", 0x61),
    ] {
        r.push((name, inp(ctx, port, 1)));
    }
    outb(ctx, 0x43, 0xe2); // read-back status of channel 0
    r.push(("pit status", inp(ctx, 0x40, 1)));
    // RTC: register C (at the saved index), A, the CMOS byte, seconds.
    r.push(("rtc c", inp(ctx, 0x71, 1)));
    for (name, idx) in [
        ("rtc a", 0x0a),
        ("rtc b", 0x0b),
        ("cmos 0x40", 0x40),
        ("rtc sec", 0),
    ] {
        outb(ctx, 0x70, idx);
        r.push((name, inp(ctx, 0x71, 1)));
    }
    // LAPICs: TPR, IRR, ISR, timer.
    for cpu in 0..CORES {
        set_current_cpu(cpu);
        r.push(("tpr", u64::from(mmio_read(ctx, lapic + 0x80))));
        for w in 0..8 {
            r.push(("irr", u64::from(mmio_read(ctx, lapic + 0x200 + 0x10 * w))));
        }
        r.push(("lvt timer", u64::from(mmio_read(ctx, lapic + 0x320))));
        r.push(("timer count", u64::from(mmio_read(ctx, lapic + 0x390))));
    }
    set_current_cpu(0);
    // What the cores are offered.
    let ic = ctx
        .interrupt_controller
        .clone()
        .expect("interrupt controller");
    r.push(("nmi1", u64::from(ic.take_nmi(1))));
    r.push(("intr0", u64::from(ic.has_interrupt(0))));
    r.push(("inta0", ic.acknowledge(0).map_or(0x100, u64::from)));
    r.push(("intr1", u64::from(ic.has_interrupt(1))));
    r.push(("inta1", ic.acknowledge(1).map_or(0x100, u64::from)));
    // IOAPIC: IOREGSEL, pin 10 (remote IRR set by the delivery).
    r.push(("ioregsel", u64::from(mmio_read(ctx, 0xfec0_0000))));
    mmio_write(ctx, 0xfec0_0000, 0x10 + 2 * 10);
    r.push(("rte10", u64::from(mmio_read(ctx, 0xfec0_0010))));
    // i8042: status, output buffer, status, the queued ACK.
    for (name, port) in [
        ("kbd status", 0x64),
        ("kbd data", 0x60),
        ("kbd status", 0x64),
        ("kbd data", 0x60),
        ("port92", 0x92),
    ] {
        r.push((name, inp(ctx, port, 1)));
    }
    // COM1 and COM2.
    for (name, port) in [
        ("lsr", 0x3fd),
        ("rx", 0x3f8),
        ("rx", 0x3f8),
        ("lsr", 0x3fd),
        ("lcr", 0x3fb),
        ("ier", 0x3f9),
        ("iir", 0x3fa),
        ("mcr", 0x3fc),
        ("scr", 0x3ff),
        ("com2 scr", 0x2ff),
    ] {
        r.push((name, inp(ctx, port, 1)));
    }
    // fw_cfg: the rest of the signature.
    for _ in 0..3 {
        r.push(("fw_cfg", inp(ctx, 0x511, 1)));
    }
    // pc-testdev.
    r.push(("testdev scratch", inp(ctx, 0xe0, 4)));
    r.push(("testdev irq6", inp(ctx, 0x2006, 1)));
    r.push(("testdev irq10", inp(ctx, 0x200a, 1)));
    let mut b = [0u8; 8];
    ctx.mmio.read(0xff00_0100, &mut b);
    r.push(("testdev mmio", u64::from_le_bytes(b)));
    // ACPI PM1.
    for (name, port) in [("pm1 sts", 0x600), ("pm1 en", 0x602), ("pm1 cnt", 0x604)] {
        r.push((name, inp(ctx, port, 2)));
    }
    // IRQ 10 drops: the PIC sees it only if the line's level survived the restore.
    outb(ctx, 0x200a, 0);
    outb(ctx, 0x20, 0x0a);
    r.push(("pic irr after drop", inp(ctx, 0x20, 1)));
    outb(ctx, 0xa0, 0x0a);
    r.push(("slave irr after drop", inp(ctx, 0xa0, 1)));
    r
}

/// Run every timer due by `t` (the devices' own callbacks), returning the next deadline.
fn run_timers(ctx: &BuildCtx, t: u64) -> Option<u64> {
    ctx.clock.continue_from(t);
    ctx.timers.run_due(t)
}

fn value(p: &[(&'static str, u64)], name: &str) -> u64 {
    p.iter().find(|(n, _)| *n == name).unwrap().1
}

#[test]
fn every_device_restores_what_it_saved() {
    let a = build();
    drive(&a);
    let saved = save_all(&a);
    assert_eq!(
        saved.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "acpi", "bochs", "fw_cfg", "ioapic", "keyboard", "lapic", "nb", "nvram", "os_debug",
            "pic", "pit", "sb", "serial", "testdev"
        ]
    );
    // The saved state is JSON through and through.
    let text = serde_json::to_string(&saved).unwrap();
    let saved: BTreeMap<String, (u32, StateValue)> = serde_json::from_str(&text).unwrap();

    let b = build();
    b.clock.continue_from(T_SAVE);
    restore_all(&b, &saved);
    let again = save_all(&b);
    for (id, s) in &saved {
        assert_eq!(
            &again[id], s,
            "device {id}: restored state saves differently"
        );
    }
    assert_eq!(a.timers.armed(), b.timers.armed(), "armed timers");
    // What was due at the save but not yet delivered is delivered alike.
    assert_eq!(run_timers(&a, T_SAVE), run_timers(&b, T_SAVE), "timers due");
    let (sa, sb) = (save_all(&a), save_all(&b));
    for (id, s) in &sa {
        assert_eq!(&sb[id], s, "device {id} after the timers due at the save");
    }

    let fresh = build();
    fresh.clock.continue_from(T_SAVE);
    let (pa, pb, pf) = (probe(&a), probe(&b), probe(&fresh));
    assert_eq!(pa, pb, "what the guest sees after the restore");
    for (name, expect) in [
        ("scr", 0xa5),
        ("com2 scr", 0x77),
        ("fw_cfg", u64::from(b'M')),
        ("testdev scratch", 0xdead_beef),
        ("pm1 en", 0x0120),
        ("tpr", 0x20),
        ("inta0", 0x41),
        ("inta1", 0x45),
        ("nmi1", 1),
        ("pic imr", 0xb8),
    ] {
        assert_eq!(value(&pa, name), expect, "{name}");
    }
    assert_eq!(value(&pa, "slave irr") & 0x04, 0x04, "IRQ 10 requested");
    assert_eq!(
        value(&pa, "slave irr after drop") & 0x04,
        0,
        "IRQ 10 dropped"
    );
    assert_eq!(
        pa.iter()
            .filter(|(n, _)| *n == "rx")
            .map(|p| p.1)
            .collect::<Vec<_>>(),
        [u64::from(b'h'), u64::from(b'i')]
    );
    let differ: Vec<&str> = pa
        .iter()
        .zip(&pf)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0)
        .collect();
    assert!(differ.len() > 30, "a fresh VM differs in only {differ:?}");

    // The timers carry on alike: PIT ticks, the RTC's periodic flag, the LAPIC timer.
    for t in [
        T_SAVE + 1_000_000,
        T_SAVE + 20_000_000,
        T_SAVE + 1_500_000_000,
    ] {
        assert_eq!(
            run_timers(&a, t),
            run_timers(&b, t),
            "next deadline after {t}"
        );
        let (sa, sb) = (save_all(&a), save_all(&b));
        for (id, s) in &sa {
            assert_eq!(&sb[id], s, "device {id} after timers to {t}");
        }
    }
    assert_ne!(save_all(&a)["pic"], save_all(&fresh)["pic"]);
}

// ----- malformed state ----------------------------------------------------------------------

/// Restoring `v` into device `id` fails with a message containing `msg`, and changes nothing.
fn refused(ctx: &BuildCtx, id: &str, version: u32, v: &StateValue, msg: &str) {
    let d = ctx.device_states.iter().find(|d| d.id == id).unwrap();
    let before = d.state.save();
    let e = d.state.restore(id, version, v).unwrap_err().to_string();
    assert!(e.contains(msg), "{id}: '{e}' does not mention '{msg}'");
    assert_eq!(
        d.state.save(),
        before,
        "{id}: a refused restore changed the state"
    );
}

#[test]
fn malformed_state_is_refused() {
    let ctx = build();
    drive(&ctx);
    let saved = save_all(&ctx);
    // Wrong shapes and versions, for every device.
    for (id, (version, _)) in &saved {
        refused(&ctx, id, *version, &json!({"bogus": 1}), "malformed state");
        refused(&ctx, id, *version, &StateValue::Null, "malformed state");
        refused(&ctx, id, version + 1, &saved[id].1, "version");
    }
    let edit = |id: &str, f: &dyn Fn(&mut StateValue)| {
        let mut v = saved[id].1.clone();
        f(&mut v);
        v
    };
    // Values that cannot be.
    let one_lapic = edit("lapic", &|v| {
        v.as_array_mut().unwrap().pop();
    });
    refused(
        &ctx,
        "lapic",
        1,
        &one_lapic,
        "1 LAPICs saved, but the VM has 2 cores",
    );
    let swapped = edit("lapic", &|v| v.as_array_mut().unwrap().swap(0, 1));
    refused(&ctx, "lapic", 1, &swapped, "LAPIC 0: initial APIC ID 1");
    let bad_base = edit("lapic", &|v| v[1]["lapic"]["base"] = json!(0xfee0_0400u64));
    refused(&ctx, "lapic", 1, &bad_base, "IA32_APIC_BASE");
    let bits = edit("lapic", &|v| v[0]["lapic"]["phys_addr_bits"] = json!(64));
    refused(&ctx, "lapic", 1, &bits, "physical address bits");
    let bsp_asleep = edit("lapic", &|v| v[0]["started"] = json!(false));
    refused(&ctx, "lapic", 1, &bsp_asleep, "BSP");
    let pic = edit("pic", &|v| v["pic"]["master"]["lowest"] = json!(9));
    refused(&ctx, "pic", 1, &pic, "lowest priority 9");
    let pic = edit("pic", &|v| v["pic"]["slave"]["is_master"] = json!(true));
    refused(&ctx, "pic", 1, &pic, "is_master");
    let levels = edit("pic", &|v| v["irq_levels"] = json!(1u32 << 30));
    refused(&ctx, "pic", 1, &levels, "24 lines");
    let pit = edit("pit", &|v| v["pit"]["channels"][0]["mode"] = json!(7));
    refused(&ctx, "pit", 1, &pit, "does not match");
    let pit = edit("pit", &|v| v["pit"]["channels"][1]["n"] = json!(0));
    refused(&ctx, "pit", 1, &pit, "initial count 0");
    let pit = edit("pit", &|v| {
        v["pit"]["channels"].as_array_mut().unwrap().truncate(2)
    });
    refused(&ctx, "pit", 1, &pit, "malformed");
    let rtc = edit("nvram", &|v| v["index"] = json!(200));
    refused(&ctx, "nvram", 1, &rtc, "CMOS index");
    let rtc = edit("nvram", &|v| v["cmos"] = json!("00ff"));
    refused(&ctx, "nvram", 1, &rtc, "malformed");
    let rtc = edit("nvram", &|v| {
        v["clock"] = json!({"Running": {"origin_ns": "1".repeat(38)}})
    });
    refused(&ctx, "nvram", 1, &rtc, "out of range");
    let io = edit("ioapic", &|v| v["ioapic"]["redir"][3] = json!(1u64 << 40));
    refused(&ctx, "ioapic", 1, &io, "reserved bits");
    let io = edit("ioapic", &|v| v["ioapic"]["id"] = json!(16));
    refused(&ctx, "ioapic", 1, &io, "4 bits");
    let kbd = edit("keyboard", &|v| v["pending"] = json!({"WriteRam": 40}));
    refused(&ctx, "keyboard", 1, &kbd, "RAM byte 40");
    let kbd = edit("keyboard", &|v| v["kbd_q"] = json!(vec![0; 17]));
    refused(&ctx, "keyboard", 1, &kbd, "17 bytes");
    let com = edit("serial", &|v| v[0]["rx_fifo"] = json!("00".repeat(65)));
    refused(&ctx, "serial", 1, &com, "FIFO holds 64");
    let com = edit("serial", &|v| {
        v.as_array_mut().unwrap().pop();
    });
    refused(&ctx, "serial", 1, &com, "3 UARTs saved");
    let td = edit("testdev", &|v| v["mem"]["len"] = json!(16));
    refused(&ctx, "testdev", 1, &td, "malformed");
    let td = edit("testdev", &|v| v["mem"] = json!({"len": 100, "chunks": []}));
    refused(&ctx, "testdev", 1, &td, "100 bytes of MMIO scratch");
    let acpi = edit("acpi", &|v| v["control"] = json!(0x2000));
    refused(&ctx, "acpi", 1, &acpi, "SLP_EN");
    let bochs = edit("bochs", &|v| v["console"]["buf"] = json!("61".repeat(300)));
    refused(&ctx, "bochs", 1, &bochs, "partial line of 300 bytes");
    // The devices still work.
    let p = probe(&ctx);
    assert_eq!(value(&p, "scr"), 0xa5);
}

// ----- in-kernel irqchip --------------------------------------------------------------------

/// An in-kernel irqchip that keeps its (empty) state itself.
struct KernelChip;

impl palacios_vmm::backend::KernelIrqchip for KernelChip {
    fn set_irq(&self, _gsi: u32, _level: bool) {}
    fn save(&self) -> Result<StateValue, palacios_vmm::backend::BackendError> {
        Ok(StateValue::Null)
    }
    fn restore(&self, _state: &StateValue) -> Result<(), palacios_vmm::backend::BackendError> {
        Ok(())
    }
}

#[test]
fn devices_in_the_kernel_irqchip_leave_their_state_to_the_backend() {
    let devices = ["8259A", "8254_PIT", "LAPIC", "IOAPIC", "NVRAM"];
    let xml = xml(
        CORES,
        DEVICES
            .iter()
            .filter(|(c, _)| devices.contains(c))
            .map(|d| d.1),
    );
    let cfg = VmConfig::parse(&xml, Path::new(".")).unwrap();
    let map = MemoryMap::pc(cfg.mem_mib << 20);
    let mem = map.create_memory().unwrap();
    let mut ctx = BuildCtx::new(Arc::new(DryRunHost), mem, map, VmHandle::new(CORES), CORES);
    ctx.kernel_irqchip = Some(Arc::new(KernelChip));
    let reg = palacios_devices::registry();
    for d in &cfg.devices {
        reg.create(&mut ctx, d).unwrap();
    }
    ctx.finish().unwrap();
    assert!(ctx.without_state.is_empty(), "{:?}", ctx.without_state);
    let ids: Vec<&str> = ctx.device_states.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["nvram"], "only the RTC is emulated here");
}
