//! Local APIC tests: identity, priorities, EOI, IPIs, x2APIC, base MSR,
//! software/global disable, ESR, LINT pins.

use super::*;
use crate::pc::chips::apic::bus;
use crate::pc::chips::apic::msg::Shorthand;

pub(super) const ID: u32 = 0x20;
pub(super) const VER: u32 = 0x30;
pub(super) const TPR: u32 = 0x80;
pub(super) const APR: u32 = 0x90;
pub(super) const PPR: u32 = 0xa0;
pub(super) const EOI: u32 = 0xb0;
pub(super) const LDR: u32 = 0xd0;
pub(super) const DFR: u32 = 0xe0;
pub(super) const SVR: u32 = 0xf0;
pub(super) const ISR0: u32 = 0x100;
pub(super) const TMR0: u32 = 0x180;
pub(super) const IRR0: u32 = 0x200;
pub(super) const ESR: u32 = 0x280;
pub(super) const ICR_LO: u32 = 0x300;
pub(super) const ICR_HI: u32 = 0x310;
pub(super) const LVT_T: u32 = 0x320;
pub(super) const LINT0: u32 = 0x350;
pub(super) const LINT1: u32 = 0x360;
pub(super) const LVT_ERR: u32 = 0x370;
pub(super) const TSC_HZ: u64 = 2_000_000_000;

/// A software-enabled xAPIC.
pub(super) fn lapic(id: u32) -> Lapic {
    let mut l = Lapic::new(id, id == 0, TSC_HZ);
    assert!(l.mmio_write(SVR, 0x1ff, 0).is_empty());
    l
}

/// A software-enabled x2APIC.
pub(super) fn x2(id: u32) -> Lapic {
    let mut l = lapic(id);
    l.set_base_msr(DEFAULT_BASE | BASE_EN | BASE_EXTD).unwrap();
    l
}

fn fixed(v: u8) -> Interrupt {
    Interrupt::fixed(v, 0)
}

fn level(v: u8) -> Interrupt {
    Interrupt {
        level_triggered: true,
        ..Interrupt::fixed(v, 0)
    }
}

/// The single `SendIpi` message in `acts`.
fn sent(acts: &[Action]) -> Interrupt {
    match acts {
        [Action::SendIpi(i)] => *i,
        other => panic!("expected one SendIpi, got {other:?}"),
    }
}

#[test]
fn power_on_state() {
    let mut bsp = Lapic::new(3, true, TSC_HZ);
    let ap = Lapic::new(4, false, TSC_HZ);
    assert_eq!(bsp.base_msr(), 0xfee0_0900);
    assert_eq!(ap.base_msr(), 0xfee0_0800);
    assert_eq!(bsp.base_addr(), 0xfee0_0000);
    assert!(bsp.enabled() && !bsp.is_x2apic() && !bsp.sw_enabled());
    assert_eq!(bsp.mmio_read(ID, 0), 3 << 24);
    assert_eq!(bsp.mmio_read(VER, 0), 0x0006_0014);
    assert_eq!(bsp.mmio_read(SVR, 0), 0xff);
    assert_eq!(bsp.mmio_read(DFR, 0), 0xffff_ffff);
    for off in [0x2f0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370] {
        assert_eq!(bsp.mmio_read(off, 0), 0x1_0000, "LVT {off:#x}");
    }
    assert_eq!(bsp.pending_vector(), None);
    assert!(!bsp.wants_extint());
    assert_eq!(bsp.next_timer_deadline(), None);
}

#[test]
fn tpr_ppr_priority_masking() {
    let mut l = lapic(0);
    l.mmio_write(TPR, 0x40, 0);
    assert!(l.accept(&fixed(0x45)).is_empty());
    assert_eq!(l.pending_vector(), None, "class 4 is not above TPR class 4");
    assert_eq!(l.mmio_read(PPR, 0), 0x40);
    l.mmio_write(TPR, 0x3f, 0);
    assert_eq!(l.pending_vector(), Some(0x45));
    l.acknowledge(0x45);
    assert!(l.isr_bit(0x45) && !l.irr_bit(0x45));
    assert_eq!(l.mmio_read(PPR, 0), 0x40, "ISR class wins over lower TPR");
    l.accept(&fixed(0x4f));
    assert_eq!(l.pending_vector(), None, "same class as in-service vector");
    l.accept(&fixed(0x61));
    assert_eq!(l.pending_vector(), Some(0x61));
    l.mmio_write(TPR, 0x72, 0);
    assert_eq!(l.mmio_read(PPR, 0), 0x72);
    assert_eq!(l.pending_vector(), None);
    // TPR register keeps only 8 bits.
    l.mmio_write(TPR, 0xffff_ff10, 0);
    assert_eq!(l.mmio_read(TPR, 0), 0x10);
    assert_eq!(l.mmio_read(IRR0 + 0x20, 0), 1 << 0x0f);
    assert_eq!(l.mmio_read(IRR0 + 0x30, 0), 1 << 0x01);
    assert_eq!(l.mmio_read(ISR0 + 0x20, 0), 1 << 0x05);
    // APR: highest of TPR, ISR and IRR classes.
    assert_eq!(l.mmio_read(APR, 0), 0x60);
}

#[test]
fn eoi_clears_highest_isr_and_broadcasts_level_vectors() {
    let mut l = lapic(0);
    l.accept(&level(0x50));
    assert!(l.tmr_bit(0x50));
    assert_eq!(l.mmio_read(TMR0 + 0x20, 0), 1 << 0x10);
    l.acknowledge(0x50);
    l.accept(&fixed(0x60));
    assert_eq!(l.pending_vector(), Some(0x60));
    l.acknowledge(0x60);
    assert!(l.isr_bit(0x50) && l.isr_bit(0x60));
    assert!(
        l.mmio_write(EOI, 0, 0).is_empty(),
        "edge vector 0x60: no broadcast"
    );
    assert!(!l.isr_bit(0x60) && l.isr_bit(0x50));
    assert_eq!(l.mmio_write(EOI, 0, 0), vec![Action::Eoi { vector: 0x50 }]);
    assert!(!l.isr_bit(0x50));
    assert!(
        l.mmio_write(EOI, 0, 0).is_empty(),
        "EOI with empty ISR is ignored"
    );
    // An edge accept of the same vector clears its TMR bit.
    l.accept(&fixed(0x50));
    assert!(!l.tmr_bit(0x50));
    // Acknowledging a vector that is not pending does nothing.
    l.acknowledge(0x99);
    assert!(!l.isr_bit(0x99));
}

#[test]
fn icr_fixed_ipi_and_shorthands() {
    let mut l = lapic(1);
    l.mmio_write(ICR_HI, 0x0200_0000, 0);
    let i = sent(&l.mmio_write(ICR_LO, 0x0000_4031, 0));
    assert_eq!(
        i,
        Interrupt {
            vector: 0x31,
            mode: DeliveryMode::Fixed,
            dest: 2,
            logical: false,
            level_triggered: false,
            assert: true,
            shorthand: Shorthand::None,
            source: 1,
        }
    );
    assert_eq!(
        l.mmio_read(ICR_LO, 0) & (1 << 12),
        0,
        "delivery status idle"
    );
    assert_eq!(l.mmio_read(ICR_LO, 0), 0x4031);
    assert_eq!(l.mmio_read(ICR_HI, 0), 0x0200_0000);
    // Self: delivered locally, nothing on the bus.
    assert!(l.mmio_write(ICR_LO, 0x0004_0055, 0).is_empty());
    assert!(l.irr_bit(0x55));
    let all = sent(&l.mmio_write(ICR_LO, 0x0008_0042, 0));
    assert_eq!(all.shorthand, Shorthand::AllIncludingSelf);
    let others = sent(&l.mmio_write(ICR_LO, 0x000c_0042, 0));
    assert_eq!(others.shorthand, Shorthand::AllExcludingSelf);
    // Logical destination mode and lowest priority.
    let lp = sent(&l.mmio_write(ICR_LO, 0x0000_0943, 0));
    assert!(lp.logical);
    assert_eq!(lp.mode, DeliveryMode::LowestPriority);
    // Reserved delivery mode 011 sends nothing.
    assert!(l.mmio_write(ICR_LO, 0x0000_0343, 0).is_empty());
}

#[test]
fn icr_nmi_init_sipi() {
    let mut src = lapic(0);
    let mut dst = lapic(5);
    src.mmio_write(ICR_HI, 5 << 24, 0);
    let nmi = sent(&src.mmio_write(ICR_LO, 0x0000_4400, 0));
    assert_eq!(nmi.mode, DeliveryMode::Nmi);
    assert_eq!(dst.accept(&nmi), vec![Action::Nmi]);
    let init = sent(&src.mmio_write(ICR_LO, 0x0000_c500, 0));
    assert_eq!(
        (init.mode, init.level_triggered, init.assert),
        (DeliveryMode::Init, false, true)
    );
    assert_eq!(dst.accept(&init), vec![Action::Init]);
    let deassert = sent(&src.mmio_write(ICR_LO, 0x0000_8500, 0));
    assert_eq!((deassert.level_triggered, deassert.assert), (true, false));
    assert!(
        dst.accept(&deassert).is_empty(),
        "INIT level de-assert is ignored"
    );
    let sipi = sent(&src.mmio_write(ICR_LO, 0x0000_4609, 0));
    assert_eq!(sipi.mode, DeliveryMode::StartUp);
    assert_eq!(dst.accept(&sipi), vec![Action::StartUp { vector: 9 }]);
    let smi = sent(&src.mmio_write(ICR_LO, 0x0000_0200, 0));
    assert_eq!(dst.accept(&smi), vec![Action::Smi]);
    // Shorthands with non-fixed modes.
    assert_eq!(src.mmio_write(ICR_LO, 0x0004_4400, 0), vec![Action::Nmi]);
    let all_init = sent(&src.mmio_write(ICR_LO, 0x000c_4500, 0));
    assert_eq!(
        (all_init.mode, all_init.shorthand),
        (DeliveryMode::Init, Shorthand::AllExcludingSelf)
    );
    let all_sipi = sent(&src.mmio_write(ICR_LO, 0x000c_4610, 0));
    assert_eq!(
        (all_sipi.vector, all_sipi.shorthand),
        (0x10, Shorthand::AllExcludingSelf)
    );
    // NMI/INIT/SIPI are honoured while software disabled.
    dst.mmio_write(SVR, 0xff, 0);
    assert_eq!(dst.accept(&sipi), vec![Action::StartUp { vector: 9 }]);
    // ExtINT messages become an action too.
    let ext = Interrupt {
        mode: DeliveryMode::ExtInt,
        ..fixed(0)
    };
    assert_eq!(dst.accept(&ext), vec![Action::ExtInt]);
}

#[test]
fn shorthands_through_the_bus() {
    let mut apics: Vec<Lapic> = (0..3).map(lapic).collect();
    let others = sent(&apics[0].mmio_write(ICR_LO, 0x000c_0070, 0));
    assert!(bus::deliver(&mut apics, &others).is_empty());
    assert_eq!(
        apics.iter().map(|a| a.irr_bit(0x70)).collect::<Vec<_>>(),
        [false, true, true]
    );
    let all = sent(&apics[1].mmio_write(ICR_LO, 0x0008_4400, 0));
    assert_eq!(
        bus::deliver(&mut apics, &all),
        vec![(0, Action::Nmi), (1, Action::Nmi), (2, Action::Nmi)]
    );
    apics[2].mmio_write(ICR_HI, 0xff00_0000, 0);
    let bcast = sent(&apics[2].mmio_write(ICR_LO, 0x0000_4500, 0));
    assert_eq!(
        bus::deliver(&mut apics, &bcast).len(),
        3,
        "physical 0xff is a broadcast"
    );
}

#[test]
fn logical_flat_and_cluster_destinations() {
    let mut l = lapic(0);
    l.mmio_write(LDR, 0x0400_0000, 0);
    assert_eq!(l.mmio_read(LDR, 0), 0x0400_0000);
    assert!(l.accepts_destination(0x06, true));
    assert!(!l.accepts_destination(0x03, true));
    assert!(
        l.accepts_destination(0x00, false),
        "physical still uses the ID"
    );
    // Cluster model: cluster 3, member bit 2.
    l.mmio_write(DFR, 0x0000_0000, 0);
    assert_eq!(l.mmio_read(DFR, 0), 0x0fff_ffff);
    l.mmio_write(LDR, 0x3400_0000, 0);
    assert!(l.accepts_destination(0x3c, true));
    assert!(!l.accepts_destination(0x2c, true));
    assert!(!l.accepts_destination(0x33, true));
    assert!(
        l.accepts_destination(0xf4, true),
        "cluster 0xF is a broadcast"
    );
    l.mmio_write(DFR, 0xffff_ffff, 0);
    assert!(l.accepts_destination(0x30, true), "flat again: bitmap 0x34");
    assert!(!l.accepts_destination(0x03, true));
    // x2APIC logical.
    let x = x2(0x45);
    assert!(x.accepts_destination(0x0004_0020, true));
    assert!(!x.accepts_destination(0x0004_0010, true));
    assert!(x.accepts_destination(0x45, false));
    assert!(x.accepts_destination(0xffff_ffff, false));
}

#[test]
fn x2apic_enable_ids_read_only() {
    let mut l = lapic(0x1_0003);
    assert_eq!(l.id(), 0x03, "xAPIC ID is 8 bits");
    assert_eq!(
        l.msr_read(0x802, 0),
        Err(Fault),
        "x2APIC MSRs #GP in xAPIC mode"
    );
    l.mmio_write(ID, 0x0700_0000, 0);
    assert_eq!(l.id(), 7);
    l.set_base_msr(0xfee0_0000 | BASE_EN | BASE_EXTD).unwrap();
    assert!(l.is_x2apic() && !l.mmio_active());
    assert_eq!(l.id(), 0x1_0003, "x2APIC ID is the initial ID");
    assert_eq!(l.msr_read(0x802, 0), Ok(0x1_0003));
    assert_eq!(l.msr_read(0x80d, 0), Ok(0x1000_0008));
    assert_eq!(l.msr_read(0x803, 0), Ok(0x0006_0014));
    assert_eq!(
        l.msr_read(0x80f, 0),
        Ok(0x1ff),
        "software enable survives the switch"
    );
    assert_eq!(l.msr_write(0x802, 5, 0, 0), Err(Fault));
    assert_eq!(l.msr_write(0x80d, 5, 0, 0), Err(Fault));
    assert_eq!(l.msr_write(0x803, 0, 0, 0), Err(Fault));
    assert_eq!(l.msr_read(0x80e, 0), Err(Fault), "no DFR in x2APIC");
    assert_eq!(l.msr_read(0x809, 0), Err(Fault), "no APR in x2APIC");
    assert_eq!(l.msr_read(0x80b, 0), Err(Fault), "EOI is write-only");
    assert_eq!(l.msr_read(0x1b, 0), Ok(0xfee0_0c00));
    assert_eq!(l.msr_read(0x900, 0), Err(Fault));
    // The MMIO page no longer decodes.
    assert_eq!(l.mmio_read(ID, 0), 0xffff_ffff);
    assert!(l.mmio_write(SVR, 0, 0).is_empty());
    assert!(l.sw_enabled());
    // TPR works through the MSR; upper half set #GPs.
    l.msr_write(0x808, 0x20, 0, 0).unwrap();
    assert_eq!(l.msr_read(0x808, 0), Ok(0x20));
    assert_eq!(l.msr_write(0x808, 1 << 32, 0, 0), Err(Fault));
}

#[test]
fn x2apic_icr_eoi_esr_and_self_ipi() {
    let mut l = x2(0x11);
    let i = sent(&l.msr_write(0x830, (0x1234 << 32) | 0x4841, 0, 0).unwrap());
    assert_eq!(
        (i.dest, i.logical, i.vector, i.source),
        (0x1234, true, 0x41, 0x11)
    );
    assert_eq!(l.msr_read(0x830, 0), Ok((0x1234 << 32) | 0x4841));
    assert_eq!(l.msr_read(0x831, 0), Err(Fault));
    assert_eq!(l.msr_write(0x831, 0, 0, 0), Err(Fault));
    // Self IPI.
    assert_eq!(l.msr_write(0x83f, 0x77, 0, 0), Ok(Vec::new()));
    assert_eq!(l.pending_vector(), Some(0x77));
    assert_eq!(l.msr_write(0x83f, 0x177, 0, 0), Err(Fault));
    assert_eq!(l.msr_read(0x83f, 0), Err(Fault));
    // EOI and ESR accept only zero.
    l.acknowledge(0x77);
    assert_eq!(l.msr_write(0x80b, 1, 0, 0), Err(Fault));
    assert!(l.isr_bit(0x77));
    assert_eq!(l.msr_write(0x80b, 0, 0, 0), Ok(Vec::new()));
    assert!(!l.isr_bit(0x77));
    assert_eq!(l.msr_write(0x828, 1, 0, 0), Err(Fault));
    // Self IPI with an illegal vector: send error, nothing delivered.
    l.msr_write(0x83f, 0x05, 0, 0).unwrap();
    l.msr_write(0x828, 0, 0, 0).unwrap();
    assert_eq!(l.msr_read(0x828, 0), Ok(ESR_SEND_ILLEGAL_VECTOR as u64));
    // Read-only ISR / IRR / PPR / current count.
    for msr in [0x80a, 0x810, 0x818, 0x820, 0x839] {
        assert_eq!(l.msr_write(msr, 0, 0, 0), Err(Fault), "msr {msr:#x}");
    }
}

#[test]
fn illegal_mode_transitions_fault() {
    let mut l = x2(1);
    let before = l.base_msr();
    assert_eq!(
        l.set_base_msr(0xfee0_0000 | BASE_EN),
        Err(Fault),
        "x2APIC -> xAPIC"
    );
    assert_eq!(
        l.set_base_msr(0xfee0_0000 | BASE_EXTD),
        Err(Fault),
        "EN=0 EXTD=1"
    );
    assert_eq!(l.base_msr(), before);
    l.set_base_msr(0xfee0_0000).unwrap();
    assert!(!l.enabled());
    assert_eq!(
        l.set_base_msr(0xfee0_0000 | BASE_EN | BASE_EXTD),
        Err(Fault),
        "disabled -> x2APIC"
    );
    l.set_base_msr(0xfee0_0000 | BASE_EN).unwrap();
    assert!(l.enabled() && !l.is_x2apic());
    for bad in [1u64, 1 << 9, 1 << 46, 1 << 63] {
        assert_eq!(
            l.set_base_msr(0xfee0_0000 | BASE_EN | bad),
            Err(Fault),
            "bit {bad:#x}"
        );
    }
    // The MSR front end reports the same #GP.
    assert_eq!(l.msr_write(0x1b, 0xfee0_0001 | BASE_EN, 0, 0), Err(Fault));
    // MAXPHYADDR is configurable.
    l.set_phys_addr_bits(52);
    assert!(l.set_base_msr((1 << 46) | BASE_EN).is_ok());
}

#[test]
fn base_relocation_keeps_bsp_flag() {
    let mut l = lapic(0);
    l.set_base_msr(0xfed0_0000 | BASE_EN).unwrap();
    assert_eq!(l.base_addr(), 0xfed0_0000);
    assert_eq!(l.base_msr(), 0xfed0_0900, "BSP flag is read-only");
    assert_eq!(l.mmio_read(SVR, 0), 0x1ff, "relocation keeps state");
    let mut ap = lapic(1);
    ap.set_base_msr(0xfee0_0000 | BASE_EN | BASE_BSP).unwrap();
    assert_eq!(ap.base_msr(), 0xfee0_0800);
}

#[test]
fn global_disable_resets_and_passes_pins_through() {
    let mut l = lapic(2);
    l.mmio_write(ID, 0x0900_0000, 0);
    l.mmio_write(TPR, 0x30, 0);
    l.mmio_write(LVT_T, 0x2_0040, 0);
    l.mmio_write(0x380, 1000, 0);
    l.accept(&fixed(0x80));
    assert!(l.next_timer_deadline().is_some());
    assert_eq!(
        l.msr_write(0x1b, 0xfee0_0000, 0, 0),
        Ok(vec![Action::TimerChanged])
    );
    assert!(!l.enabled() && !l.mmio_active());
    assert_eq!(l.next_timer_deadline(), None);
    assert_eq!(l.mmio_read(TPR, 0), 0xffff_ffff);
    assert!(l.wants_extint());
    assert_eq!(l.lint0(true), vec![Action::ExtInt]);
    assert!(l.lint0(false).is_empty());
    assert_eq!(l.lint1(true), vec![Action::Nmi]);
    assert!(l.lint1(true).is_empty(), "NMI pin is edge-sensitive");
    assert!(
        l.accept(&Interrupt {
            mode: DeliveryMode::Nmi,
            ..fixed(0)
        })
        .is_empty()
    );
    assert_eq!(l.pending_vector(), None);
    assert!(l.timer_tick(u64::MAX).is_empty());
    l.set_base_msr(0xfee0_0000 | BASE_EN).unwrap();
    assert_eq!(l.mmio_read(ID, 0), 2 << 24, "ID back to the initial ID");
    assert_eq!(l.mmio_read(TPR, 0), 0);
    assert_eq!(l.mmio_read(SVR, 0), 0xff);
    assert_eq!(l.mmio_read(LVT_T, 0), 0x1_0000);
    assert!(!l.irr_bit(0x80));
}

#[test]
fn software_disable_masks_lvts_and_holds_irr() {
    let mut l = lapic(0);
    l.mmio_write(LINT0, 0x700, 0);
    assert!(l.wants_extint());
    l.accept(&fixed(0x90));
    assert_eq!(l.pending_vector(), Some(0x90));
    l.mmio_write(SVR, 0x0ff, 0);
    assert!(!l.sw_enabled());
    assert_eq!(
        l.mmio_read(LINT0, 0),
        0x1_0700,
        "mask set on software disable"
    );
    assert!(!l.wants_extint());
    l.mmio_write(LINT0, 0x700, 0);
    assert_eq!(l.mmio_read(LINT0, 0), 0x1_0700, "mask cannot be cleared");
    assert_eq!(l.pending_vector(), None);
    assert!(l.irr_bit(0x90), "pending IRR is held");
    l.accept(&fixed(0xa0));
    assert!(
        !l.irr_bit(0xa0),
        "fixed interrupts are dropped while disabled"
    );
    // IPIs can still be sent.
    assert_eq!(sent(&l.mmio_write(ICR_LO, 0x0000_0031, 0)).vector, 0x31);
    l.mmio_write(SVR, 0x1ff, 0);
    assert_eq!(l.pending_vector(), Some(0x90));
    assert_eq!(
        l.mmio_read(LINT0, 0),
        0x1_0700,
        "still masked after re-enable"
    );
    // SVR bit 12 (EOI-broadcast suppression) is not supported.
    l.mmio_write(SVR, 0x11ff, 0);
    assert_eq!(l.mmio_read(SVR, 0), 0x1ff);
}

#[test]
fn esr_illegal_vectors_and_error_lvt() {
    let mut l = lapic(0);
    assert!(
        l.mmio_write(ICR_LO, 0x0000_0005, 0).is_empty(),
        "illegal vector not sent"
    );
    assert_eq!(
        l.mmio_read(ESR, 0),
        0,
        "errors show only after an ESR write"
    );
    l.mmio_write(ESR, 0, 0);
    assert_eq!(l.mmio_read(ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
    l.accept(&fixed(0x0e));
    assert!(!l.irr_bit(0x0e));
    l.mmio_write(ESR, 0xffff_ffff, 0);
    assert_eq!(l.mmio_read(ESR, 0), ESR_RECV_ILLEGAL_VECTOR);
    l.mmio_write(ESR, 0, 0);
    assert_eq!(l.mmio_read(ESR, 0), 0);
    // Error LVT unmasked: an error requests its vector.
    l.mmio_write(LVT_ERR, 0xee, 0);
    l.accept(&fixed(0x01));
    assert_eq!(l.pending_vector(), Some(0xee));
    // Reserved register slot: illegal register address.
    assert_eq!(l.mmio_read(0x40, 0), 0);
    l.mmio_write(ESR, 0, 0);
    assert_eq!(
        l.mmio_read(ESR, 0),
        ESR_RECV_ILLEGAL_VECTOR | ESR_ILLEGAL_REGISTER
    );
    // An illegal error vector does not recurse.
    l.mmio_write(LVT_ERR, 0x03, 0);
    l.accept(&fixed(0x02));
    l.mmio_write(ESR, 0, 0);
    assert_eq!(l.mmio_read(ESR, 0), ESR_RECV_ILLEGAL_VECTOR);
    // Local LVT with an illegal vector.
    l.mmio_write(LVT_ERR, 0x1_0000, 0);
    l.mmio_write(LINT1, 0x0002, 0);
    l.lint1(true);
    l.mmio_write(ESR, 0, 0);
    assert_eq!(l.mmio_read(ESR, 0), ESR_RECV_ILLEGAL_VECTOR);
}

#[test]
fn lint_pins_virtual_wire_and_nmi() {
    let mut l = lapic(0);
    assert!(l.lint0(true).is_empty(), "masked");
    l.lint0(false);
    l.mmio_write(LINT0, 0x700, 0);
    l.mmio_write(LINT1, 0x400, 0);
    assert!(l.wants_extint());
    assert_eq!(l.lint0(true), vec![Action::ExtInt]);
    assert_eq!(
        l.lint0(true),
        vec![Action::ExtInt],
        "ExtINT is level-sensitive"
    );
    assert!(l.lint0(false).is_empty());
    assert_eq!(l.lint1(true), vec![Action::Nmi]);
    assert!(l.lint1(true).is_empty());
    assert!(l.lint1(false).is_empty());
    // Active-low polarity: the falling edge asserts.
    l.mmio_write(LINT1, 0x2400, 0);
    assert_eq!(l.lint1(true), Vec::new());
    assert_eq!(l.lint1(false), vec![Action::Nmi]);
    // Fixed edge on LINT1.
    l.mmio_write(LINT1, 0x0033, 0);
    l.lint1(true);
    assert!(l.irr_bit(0x33) && !l.tmr_bit(0x33));
    // Unmasking ExtINT while INTR is high reports it at once.
    l.mmio_write(LINT0, 0x1_0700, 0);
    assert!(l.lint0(true).is_empty());
    assert_eq!(l.mmio_write(LINT0, 0x700, 0), vec![Action::ExtInt]);
}

#[test]
fn lint0_level_fixed_uses_remote_irr() {
    let mut l = lapic(0);
    l.mmio_write(LINT0, 0x8042, 0);
    l.lint0(true);
    assert!(l.irr_bit(0x42) && l.tmr_bit(0x42));
    assert_eq!(l.mmio_read(LINT0, 0), 0xc042, "remote IRR set");
    l.acknowledge(0x42);
    l.lint0(true);
    assert!(!l.irr_bit(0x42), "no redelivery while remote IRR set");
    // EOI: broadcast, remote IRR cleared, pin still high -> delivered again.
    assert_eq!(l.mmio_write(EOI, 0, 0), vec![Action::Eoi { vector: 0x42 }]);
    assert!(l.irr_bit(0x42));
    l.acknowledge(0x42);
    l.lint0(false);
    l.mmio_write(EOI, 0, 0);
    assert_eq!(l.mmio_read(LINT0, 0), 0x8042);
    assert!(!l.irr_bit(0x42));
    // Writes cannot set remote IRR.
    l.mmio_write(LINT0, 0xffff_ffff, 0);
    assert_eq!(l.mmio_read(LINT0, 0), 0x1_a7ff);
}

#[test]
fn mmio_decoding_edges() {
    let mut l = lapic(0);
    assert_eq!(l.mmio_read(0x24, 0), 0, "bytes 4-15 of a slot");
    assert_eq!(l.mmio_read(0x1000, 0), 0);
    assert_eq!(l.mmio_read(u32::MAX, 0), 0);
    assert!(
        l.mmio_write(0x3f0, 0x40, 0).is_empty(),
        "SELF IPI is x2APIC only"
    );
    assert!(!l.irr_bit(0x40));
    l.mmio_write(VER, 0, 0);
    assert_eq!(l.mmio_read(VER, 0), VERSION);
    assert_eq!(l.mmio_read(EOI, 0), 0);
    assert_eq!(l.mmio_read(0xc0, 0), 0, "RRD");
    // Every offset, every access: no panic.
    for off in (0..0x1010).step_by(4) {
        let _ = l.mmio_read(off, 5);
        let _ = l.mmio_write(off, 0xdead_beef, 5);
    }
    for msr in 0x7f0..0x910 {
        let _ = l.msr_read(msr, 7);
        let _ = l.msr_write(msr, u64::MAX, 7, 7);
    }
    let mut x = x2(1);
    for msr in (0x7f0..0x910).chain([0x1b, 0x6e0]) {
        for v in [0, 0xff, 0xffff_ffff, u64::MAX] {
            let _ = x.msr_read(msr, 9);
            let _ = x.msr_write(msr, v, 9, 9);
        }
    }
}

#[test]
fn init_reset_keeps_id_and_mode() {
    let mut l = x2(9);
    l.msr_write(0x808, 0x50, 0, 0).unwrap();
    l.msr_write(0x83f, 0x60, 0, 0).unwrap();
    l.init_reset();
    assert!(l.is_x2apic());
    assert_eq!(l.id(), 9);
    assert_eq!(l.msr_read(0x808, 0), Ok(0));
    assert_eq!(l.msr_read(0x80f, 0), Ok(0xff));
    assert!(!l.irr_bit(0x60));
    let mut x = lapic(3);
    x.mmio_write(ID, 0x0400_0000, 0);
    x.init_reset();
    assert_eq!(x.id(), 4, "INIT keeps a software-written xAPIC ID");
}

#[test]
fn local_interrupt_sources() {
    let mut l = lapic(0);
    assert!(l.local_interrupt(LvtSource::Perf).is_empty());
    l.mmio_write(0x340, 0x400, 0); // perf -> NMI
    assert_eq!(l.local_interrupt(LvtSource::Perf), vec![Action::Nmi]);
    assert_eq!(
        l.mmio_read(0x340, 0),
        0x1_0400,
        "PMI delivery sets the mask"
    );
    l.mmio_write(0x330, 0x0091, 0);
    assert!(l.local_interrupt(LvtSource::Thermal).is_empty());
    assert!(l.irr_bit(0x91));
    l.mmio_write(0x2f0, 0x0200, 0);
    assert_eq!(l.local_interrupt(LvtSource::Cmci), vec![Action::Smi]);
}

/// Pseudo-random register traffic (xorshift, fixed seed): any value, any
/// order, any time must not panic (debug builds check arithmetic overflow).
#[test]
fn random_traffic_never_panics() {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut apics = vec![lapic(0), Lapic::new(1, false, 0), x2(2)];
    let mut io = crate::pc::chips::apic::Ioapic::new(1);
    for _ in 0..20_000 {
        let r = rnd();
        let i = (r % 3) as usize;
        let now = match (r >> 2) % 4 {
            0 => rnd() % 10_000,
            1 => rnd(),
            2 => u64::MAX - rnd() % 1000,
            _ => 0,
        };
        let v = rnd();
        let acts = match (r >> 8) % 12 {
            0 => apics[i].mmio_write(((v >> 32) as u32 % 0x410) & !3, v as u32, now),
            1 => {
                let _ = apics[i].mmio_read((v as u32) % 0x1100, now);
                Vec::new()
            }
            2 => {
                let msr = [0x1b, 0x6e0, 0x800 + (v >> 40) as u32 % 0x100][(v % 3) as usize];
                apics[i]
                    .msr_write(msr, rnd(), now, rnd())
                    .unwrap_or_default()
            }
            3 => {
                let _ = apics[i].msr_read(0x800 + (v as u32) % 0x100, now);
                Vec::new()
            }
            4 => apics[i].timer_tick(now),
            5 => apics[i].lint0(v & 1 != 0),
            6 => apics[i].lint1(v & 1 != 0),
            7 => {
                if let Some(p) = apics[i].pending_vector() {
                    apics[i].acknowledge(p);
                }
                apics[i].mmio_write(EOI, 0, now)
            }
            8 => {
                let _ = apics[i].set_base_msr(v & 0xffff_ffff_ffff_fd00);
                Vec::new()
            }
            9 => {
                let ints = io.set_irq((v % 26) as u32, v & 0x100 != 0);
                ints.iter()
                    .flat_map(|m| bus::deliver(&mut apics, m))
                    .map(|(_, a)| a)
                    .collect()
            }
            10 => {
                let ints = io.mmio_write((v >> 32) % 0x20, v as u32);
                ints.iter()
                    .flat_map(|m| bus::deliver(&mut apics, m))
                    .map(|(_, a)| a)
                    .collect()
            }
            _ => apics[i].local_interrupt(LvtSource::Perf),
        };
        for a in acts {
            match a {
                Action::SendIpi(m) => {
                    let _ = bus::deliver(&mut apics, &m);
                }
                Action::Eoi { vector } => {
                    for m in io.eoi(vector) {
                        let _ = bus::deliver(&mut apics, &m);
                    }
                }
                _ => {}
            }
        }
        for a in &apics {
            if let Some(p) = a.pending_vector() {
                assert!(p >= 16 && p >> 4 > a.ppr() >> 4);
            }
            let _ = a.next_timer_deadline();
        }
    }
}
