use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

struct Dummy {
    cfg: ConfigSpace,
    log: Vec<(usize, u64, Vec<u8>)>,
}

impl PciDevice for Dummy {
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(bar as u8 * 0x10 + offset as u8);
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.log.push((bar, offset, data.to_vec()));
    }
}

#[derive(Default)]
struct Level(AtomicU64, std::sync::atomic::AtomicBool);
impl IrqLine for Level {
    fn set_level(&self, high: bool) {
        self.0.fetch_add(1, Ordering::Relaxed);
        self.1.store(high, Ordering::Relaxed);
    }
}

fn setup() -> (
    Arc<PciRoot>,
    Arc<Bus>,
    Arc<Bus>,
    Arc<Mutex<Dummy>>,
    [Arc<Level>; 4],
) {
    let pio = Arc::new(Bus::new("port"));
    let mmio = Arc::new(Bus::new("mmio"));
    let lv: [Arc<Level>; 4] = Default::default();
    let lines: [Arc<dyn IrqLine>; 4] = [lv[0].clone(), lv[1].clone(), lv[2].clone(), lv[3].clone()];
    let root = PciRoot::new(pio.clone(), mmio.clone(), lines);
    let mut cfg = ConfigSpace::new(0x1af4, 0x1042, (1, 0, 0), 1);
    cfg.add_bar(
        0,
        BarSpec {
            size: 0x40,
            kind: BarKind::Io,
            prefetchable: false,
        },
    );
    cfg.add_bar(
        2,
        BarSpec {
            size: 0x1000,
            kind: BarKind::Mem64,
            prefetchable: false,
        },
    );
    cfg.set_interrupt_pin(1);
    let d = Arc::new(Mutex::new(Dummy { cfg, log: vec![] }));
    pio.insert(
        0xcf8,
        8,
        "pci",
        Arc::new(Mutex::new(Conf1::new(root.clone()))),
    )
    .unwrap();
    (root, pio, mmio, d, lv)
}

fn cfg_rd(pio: &Bus, devfn: u8, reg: u32) -> u32 {
    pio.write(
        0xcf8,
        &(0x8000_0000u32 | u32::from(devfn) << 8 | reg).to_le_bytes(),
    );
    let mut b = [0u8; 4];
    pio.read(0xcfc, &mut b);
    u32::from_le_bytes(b)
}

fn cfg_wr(pio: &Bus, devfn: u8, reg: u32, v: u32) {
    pio.write(
        0xcf8,
        &(0x8000_0000u32 | u32::from(devfn) << 8 | reg).to_le_bytes(),
    );
    pio.write(0xcfc, &v.to_le_bytes());
}

#[test]
fn probing_finds_the_function_and_absent_ones_read_all_ones() {
    let (root, pio, _m, d, _) = setup();
    let at = root.add(None, "blk", d).unwrap();
    assert_eq!(at, DevFn::new(0, 0));
    assert_eq!(cfg_rd(&pio, 0, 0), 0x1042_1af4);
    assert_eq!(cfg_rd(&pio, 8, 0), 0xffff_ffff);
    // Byte read inside the data window (class code byte at 0x0b).
    pio.write(0xcf8, &0x8000_0008u32.to_le_bytes());
    let mut b = [0u8; 1];
    pio.read(0xcff, &mut b);
    assert_eq!(b[0], 1);
    // Enable bit clear: all-ones.
    pio.write(0xcf8, &0u32.to_le_bytes());
    let mut w = [0u8; 4];
    pio.read(0xcfc, &mut w);
    assert_eq!(w, [0xff; 4]);
    assert!(
        root.add(
            Some(DevFn::new(0, 0)),
            "again",
            Arc::new(Mutex::new(Dummy {
                cfg: ConfigSpace::new(1, 1, (0, 0, 0), 0),
                log: vec![]
            }))
        )
        .is_err()
    );
}

#[test]
fn bar_programming_moves_the_mapping() {
    let (root, pio, mmio, d, _) = setup();
    root.add(None, "blk", d.clone()).unwrap();
    // Size the memory BAR like firmware.
    cfg_wr(&pio, 0, 0x18, 0xffff_ffff);
    assert_eq!(cfg_rd(&pio, 0, 0x18), 0xffff_f004);
    cfg_wr(&pio, 0, 0x18, 0xe000_0000);
    cfg_wr(&pio, 0, 0x1c, 0);
    cfg_wr(&pio, 0, 0x10, 0xc000);
    // Not decoding yet.
    assert!(!mmio.read(0xe000_0000, &mut [0u8; 4]));
    cfg_wr(&pio, 0, 4, 3);
    let mut b = [0u8; 1];
    assert!(mmio.read(0xe000_0010, &mut b));
    assert_eq!(b[0], 0x30, "BAR 2 sees offset 0x10");
    assert!(pio.read(0xc004, &mut b));
    assert_eq!(b[0], 0x04);
    // Move the memory BAR; the old place goes away.
    cfg_wr(&pio, 0, 0x18, 0xe010_0000);
    assert!(!mmio.read(0xe000_0010, &mut b));
    assert!(mmio.write(0xe010_0008, &[7]));
    assert_eq!(d.lock().unwrap().log, vec![(2, 8, vec![7])]);
    // Memory decode off: unmapped; I/O stays.
    cfg_wr(&pio, 0, 4, 1);
    assert!(!mmio.read(0xe010_0008, &mut b));
    assert!(pio.read(0xc004, &mut b));
}

#[test]
fn a_bar_programmed_over_another_device_decodes_nothing() {
    let (root, pio, mmio, d, _) = setup();
    root.add(None, "blk", d).unwrap();
    // The conf1 ports themselves as an I/O BAR: refused, the VMM lives, config still works.
    cfg_wr(&pio, 0, 0x10, 0xcc0);
    let _ = mmio;
    cfg_wr(&pio, 0, 4, 1);
    assert_eq!(root.bad_bar_maps.load(Ordering::Relaxed), 1);
    assert_eq!(cfg_rd(&pio, 0, 0), 0x1042_1af4);
    // Moved to a free place, it maps.
    cfg_wr(&pio, 0, 0x10, 0xd000);
    let mut b = [0u8; 1];
    assert!(pio.read(0xd001, &mut b));
}

#[test]
fn intx_lines_are_shared_per_pirq() {
    let (root, _pio, _m, d, lv) = setup();
    let at = root.add(Some(DevFn::new(1, 0)), "a", d).unwrap();
    let a = root.intx_line(at, 1); // slot 1 INTA -> PIRQB
    let b = root.intx_line(DevFn::new(5, 0), 1); // slot 5 INTA -> PIRQB too
    a.set_level(true);
    b.set_level(true);
    a.set_level(false);
    assert!(lv[1].1.load(Ordering::Relaxed), "still asserted by b");
    b.set_level(false);
    assert!(!lv[1].1.load(Ordering::Relaxed));
    assert_eq!(lv[1].0.load(Ordering::Relaxed), 2, "one raise, one lower");
}

#[test]
fn firmware_style_assignment() {
    let (root, _pio, mmio, d, _) = setup();
    root.add(None, "blk", d.clone()).unwrap();
    root.assign_resources().unwrap();
    let c = d.lock().unwrap().cfg.clone();
    let bars = c.active_bars();
    assert_eq!(bars.len(), 2);
    assert!(mmio.read(bars[1].addr, &mut [0u8; 4]));
    assert_eq!(c.command() & 7, 7);
}

#[test]
fn pirq_routes_reach_the_isa_line_the_piix3_names() {
    let (root, _pio, _m, _d, lv) = setup();
    let isa: Vec<Arc<Level>> = (0..16).map(|_| Arc::new(Level::default())).collect();
    root.set_isa_lines(isa.iter().map(|l| l.clone() as Arc<dyn IrqLine>).collect());
    let line = root.intx_line(DevFn::new(3, 0), 1); // slot 3 INTA -> PIRQD
    root.set_pirq_route(3, 11);
    line.set_level(true);
    assert!(lv[3].1.load(Ordering::Relaxed), "the IOAPIC pin follows");
    assert!(isa[11].1.load(Ordering::Relaxed), "ISA IRQ 11 follows");
    // Rerouted while asserted: the old IRQ drops, the new one rises.
    root.set_pirq_route(3, 10);
    assert!(!isa[11].1.load(Ordering::Relaxed));
    assert!(isa[10].1.load(Ordering::Relaxed));
    // Disabled, and an IRQ the PIIX3 cannot route to.
    root.set_pirq_route(3, 0x80 | 10);
    assert!(!isa[10].1.load(Ordering::Relaxed));
    root.set_pirq_route(3, 2);
    assert!(!isa[2].1.load(Ordering::Relaxed));
    line.set_level(false);
    assert!(!lv[3].1.load(Ordering::Relaxed));
}
