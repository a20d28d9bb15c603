//! The local APIC of one virtual core.
//!
//! Model summary (see the individual items for details):
//!
//! * Version register `0x0006_0014`: version `0x14` (integrated xAPIC),
//!   max LVT entry 6 (seven LVTs: timer, CMCI, LINT0, LINT1, error,
//!   thermal, performance counters), bit 24 clear — EOI-broadcast
//!   suppression is **not** supported (the companion [`crate::pc::chips::apic::Ioapic`] is
//!   version 0x11 and has no directed-EOI register), so SVR bit 12 is
//!   reserved and reads 0.
//! * Timer input clock [`BUS_HZ`] = 1 GHz: one count lasts `divisor` ns.
//! * IPIs are delivered instantly; the ICR delivery-status bit reads 0.
//! * MMIO decodes only while the APIC is globally enabled and in xAPIC
//!   mode ([`Lapic::mmio_active`]). Otherwise the access is not claimed by
//!   the APIC: reads return `0xffff_ffff` (an unclaimed bus) and writes are
//!   dropped; a VMM should normally route such accesses to memory instead.
//! * x2APIC is always available (CPUID.1:ECX.x2APIC is assumed set).

mod regs;
mod timer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_timer;

pub use timer::BUS_HZ;
use timer::{Timer, TimerMode};

use crate::pc::chips::apic::Ns;
use crate::pc::chips::apic::msg::{self, DeliveryMode, Interrupt, LapicIdent};
use serde::{Deserialize, Serialize};

/// Default xAPIC MMIO base.
pub const DEFAULT_BASE: u64 = 0xfee0_0000;
/// IA32_APIC_BASE bit 8: this is the bootstrap processor (read-only).
pub const BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE bit 10: x2APIC mode enable.
pub const BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE bit 11: APIC global enable.
pub const BASE_EN: u64 = 1 << 11;
/// Version register value: version 0x14, max LVT entry 6, no EOI-broadcast
/// suppression.
pub const VERSION: u32 = 0x0006_0014;
/// Default number of physical address bits; base MSR bits at and above it
/// are reserved.
pub const DEFAULT_PHYS_ADDR_BITS: u32 = 46;

/// MSR number of IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// MSR number of IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First x2APIC MSR (`0x800 + offset / 16`).
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last x2APIC MSR.
pub const MSR_X2APIC_LAST: u32 = 0x8ff;

/// LVT mask bit.
pub(crate) const LVT_MASKED: u32 = 1 << 16;
/// LVT remote-IRR bit (LINT0/LINT1, read-only).
pub(crate) const LVT_REMOTE_IRR: u32 = 1 << 14;
/// LVT trigger mode bit (LINT0/LINT1): level.
pub(crate) const LVT_LEVEL: u32 = 1 << 15;
/// LVT input polarity bit (LINT0/LINT1): active low.
pub(crate) const LVT_ACTIVE_LOW: u32 = 1 << 13;

/// Index of each LVT entry in [`Lapic::lvt`].
pub(crate) const LVT_TIMER: usize = 0;
pub(crate) const LVT_CMCI: usize = 1;
pub(crate) const LVT_LINT0: usize = 2;
pub(crate) const LVT_LINT1: usize = 3;
pub(crate) const LVT_ERROR: usize = 4;
pub(crate) const LVT_THERMAL: usize = 5;
pub(crate) const LVT_PERF: usize = 6;
pub(crate) const LVT_COUNT: usize = 7;

/// Writable bits of each LVT entry (indexed like [`Lapic::lvt`]).
pub(crate) const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00ff, // timer: vector, mask, mode (bits 17-18)
    0x0001_07ff, // CMCI: vector, delivery mode, mask
    0x0001_a7ff, // LINT0: vector, mode, polarity, trigger, mask
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error: vector, mask
    0x0001_07ff, // thermal
    0x0001_07ff, // performance counters
];

/// ESR: send illegal vector.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR: receive illegal vector.
pub const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR: illegal register address.
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// Something the VMM must do as a result of an APIC operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put this message on the APIC bus (route it with
    /// [`crate::pc::chips::apic::bus::deliver`] or equivalent). Self-only IPIs are delivered
    /// locally and never appear here.
    SendIpi(Interrupt),
    /// An EOI was written for a vector whose TMR bit was set: broadcast it
    /// to the I/O APICs ([`crate::pc::chips::apic::Ioapic::eoi`]).
    Eoi {
        /// The vector that was retired.
        vector: u8,
    },
    /// Raise an NMI on this core.
    Nmi,
    /// Raise an SMI on this core.
    Smi,
    /// INIT this core (the VMM resets the core and calls
    /// [`Lapic::init_reset`]).
    Init,
    /// Start-up IPI: if the core is waiting for SIPI, start it at
    /// `vector << 12`.
    StartUp {
        /// Start page.
        vector: u8,
    },
    /// The core should take an external interrupt: run an INTA cycle on
    /// the 8259 to get the vector.
    ExtInt,
    /// [`Lapic::next_timer_deadline`] changed; re-query it.
    TimerChanged,
}

/// The access raises #GP(0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Fault;

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("general protection fault")
    }
}

impl std::error::Error for Fault {}

/// Local interrupt sources the VMM can raise through their LVT entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LvtSource {
    /// Corrected machine-check error interrupt (LVT CMCI).
    Cmci,
    /// Thermal sensor interrupt (LVT thermal).
    Thermal,
    /// Performance-counter overflow (LVT perf). Delivery sets the entry's
    /// mask bit, as on P6 and later processors.
    Perf,
}

/// One 256-bit interrupt register (IRR, ISR or TMR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Bits256([u32; 8]);

impl Bits256 {
    pub(crate) fn get(&self, v: u8) -> bool {
        self.0[(v >> 5) as usize] & (1 << (v & 31)) != 0
    }
    pub(crate) fn set(&mut self, v: u8, on: bool) {
        let w = &mut self.0[(v >> 5) as usize];
        if on {
            *w |= 1 << (v & 31);
        } else {
            *w &= !(1 << (v & 31));
        }
    }
    /// Highest set vector.
    pub(crate) fn highest(&self) -> Option<u8> {
        (0..8usize).rev().find_map(|i| {
            let w = self.0[i];
            (w != 0).then(|| (i as u32 * 32 + 31 - w.leading_zeros()) as u8)
        })
    }
    pub(crate) fn word(&self, i: usize) -> u32 {
        self.0[i & 7]
    }
}

/// A local APIC. Its serde form is the checkpoint state (guest-time stamps included; the TSC
/// rate is the VM's, not saved); check a deserialized value with [`Lapic::check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lapic {
    /// IA32_APIC_BASE (address, EXTD, EN, BSP).
    base: u64,
    phys_addr_bits: u32,
    /// Hardware-assigned (initial) APIC ID; the x2APIC ID.
    initial_id: u32,
    /// xAPIC ID register value (bits 24-31), software-writable.
    xapic_id: u8,
    /// The guest TSC rate: the VM's clock's, set again on restore ([`Lapic::set_tsc_hz`]).
    #[serde(skip)]
    tsc_hz: u64,
    tpr: u8,
    /// xAPIC LDR (bits 24-31).
    ldr: u32,
    /// xAPIC DFR model (bits 28-31).
    dfr: u32,
    svr: u32,
    pub(crate) irr: Bits256,
    pub(crate) isr: Bits256,
    pub(crate) tmr: Bits256,
    /// Errors latched by the last ESR write (what the guest reads).
    esr: u32,
    /// Errors accumulated since the last ESR write.
    esr_pending: u32,
    icr_lo: u32,
    icr_hi: u32,
    pub(crate) lvt: [u32; LVT_COUNT],
    timer: Timer,
    /// Current (polarity-adjusted) level of LINT0/LINT1.
    lint_asserted: [bool; 2],
    /// Raw pin level of LINT0/LINT1 as last reported.
    lint_raw: [bool; 2],
}

impl Lapic {
    /// A local APIC in its power-on state: base `0xFEE00000`, globally
    /// enabled, BSP flag per `bsp`, xAPIC mode, SVR `0xFF` (software
    /// disabled), all LVTs masked, DFR flat. `tsc_hz` is the guest TSC rate
    /// used by the TSC-deadline timer (0 is treated as 1).
    pub fn new(apic_id: u32, bsp: bool, tsc_hz: u64) -> Self {
        let mut l = Self {
            base: DEFAULT_BASE | BASE_EN | if bsp { BASE_BSP } else { 0 },
            phys_addr_bits: DEFAULT_PHYS_ADDR_BITS,
            initial_id: apic_id,
            xapic_id: apic_id as u8,
            tsc_hz: tsc_hz.max(1),
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            irr: Bits256::default(),
            isr: Bits256::default(),
            tmr: Bits256::default(),
            esr: 0,
            esr_pending: 0,
            icr_lo: 0,
            icr_hi: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            timer: Timer::default(),
            lint_asserted: [false; 2],
            lint_raw: [false; 2],
        };
        l.reset_registers();
        l
    }

    /// Sets MAXPHYADDR (clamped to 36..=52) for the reserved-bit check of
    /// IA32_APIC_BASE.
    pub fn set_phys_addr_bits(&mut self, bits: u32) {
        self.phys_addr_bits = bits.clamp(36, 52);
    }

    /// Sets the guest TSC rate (0 is treated as 1), e.g. after a restore.
    pub fn set_tsc_hz(&mut self, tsc_hz: u64) {
        self.tsc_hz = tsc_hz.max(1);
    }

    /// Refuses a state this APIC cannot be in (a restored checkpoint): the APIC of core
    /// `index` (the BSP if `bsp`) has initial APIC ID `index`.
    pub fn check(&self, index: u32, bsp: bool) -> Result<(), String> {
        if self.initial_id != index {
            return Err(format!(
                "LAPIC {index}: initial APIC ID {} (must be the core's number)",
                self.initial_id
            ));
        }
        if (self.base & BASE_BSP != 0) != bsp {
            return Err(format!("LAPIC {index}: the BSP flag must be {bsp}"));
        }
        if !(36..=52).contains(&self.phys_addr_bits) {
            return Err(format!(
                "LAPIC {index}: {} physical address bits (36-52)",
                self.phys_addr_bits
            ));
        }
        let addr_mask = ((1u64 << self.phys_addr_bits) - 1) & !0xfff;
        if self.base & !(addr_mask | BASE_EN | BASE_EXTD | BASE_BSP) != 0
            || self.base & (BASE_EN | BASE_EXTD) == BASE_EXTD
        {
            return Err(format!(
                "LAPIC {index}: IA32_APIC_BASE {:#x} is not valid",
                self.base
            ));
        }
        if self.svr & !regs::SVR_WRITABLE != 0 {
            return Err(format!(
                "LAPIC {index}: SVR {:#x} sets reserved bits",
                self.svr
            ));
        }
        for (i, (&v, &w)) in self.lvt.iter().zip(LVT_WRITABLE.iter()).enumerate() {
            if v & !(w | LVT_REMOTE_IRR) != 0 {
                return Err(format!(
                    "LAPIC {index}: LVT entry {i} {v:#x} sets reserved bits"
                ));
            }
        }
        self.timer
            .check()
            .map_err(|e| format!("LAPIC {index}: {e}"))
    }

    /// Resets every register except the APIC ID and IA32_APIC_BASE.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.irr = Bits256::default();
        self.isr = Bits256::default();
        self.tmr = Bits256::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_lo = 0;
        self.icr_hi = 0;
        self.lvt = [LVT_MASKED; LVT_COUNT];
        self.timer.reset();
    }

    /// INIT reset (the core received INIT): every register returns to its
    /// power-on value except the APIC ID and IA32_APIC_BASE (so the mode,
    /// xAPIC or x2APIC, is kept). The timer stops: re-query
    /// [`Lapic::next_timer_deadline`].
    pub fn init_reset(&mut self) {
        self.reset_registers();
    }

    // ----- identity and modes -------------------------------------------

    /// The APIC ID: the xAPIC ID register (8 bits) in xAPIC mode, the
    /// 32-bit x2APIC ID in x2APIC mode.
    pub fn id(&self) -> u32 {
        if self.is_x2apic() {
            self.initial_id
        } else {
            self.xapic_id as u32
        }
    }

    /// Whether x2APIC mode is on (EN and EXTD set).
    pub fn is_x2apic(&self) -> bool {
        self.base & (BASE_EN | BASE_EXTD) == BASE_EN | BASE_EXTD
    }

    /// Whether the APIC is globally enabled (IA32_APIC_BASE bit 11).
    pub fn enabled(&self) -> bool {
        self.base & BASE_EN != 0
    }

    /// Whether the APIC is software-enabled (SVR bit 8).
    pub fn sw_enabled(&self) -> bool {
        self.svr & (1 << 8) != 0
    }

    /// Whether the xAPIC MMIO page decodes (globally enabled, xAPIC mode).
    pub fn mmio_active(&self) -> bool {
        self.enabled() && !self.is_x2apic()
    }

    /// Spurious-interrupt vector (SVR bits 0-7).
    pub fn spurious_vector(&self) -> u8 {
        self.svr as u8
    }

    /// Logical destination register as the guest reads it.
    pub fn ldr(&self) -> u32 {
        if self.is_x2apic() {
            msg::x2apic_ldr(self.initial_id)
        } else {
            self.ldr
        }
    }

    /// Addressing state for destination matching.
    pub fn ident(&self) -> LapicIdent {
        LapicIdent {
            id: self.id(),
            x2apic: self.is_x2apic(),
            ldr: self.ldr(),
            dfr: self.dfr,
        }
    }

    /// Whether `dest` in destination mode `logical` addresses this APIC.
    pub fn accepts_destination(&self, dest: u32, logical: bool) -> bool {
        msg::dest_matches(&self.ident(), dest, logical)
    }

    /// Whether this APIC is a destination of `intr` (enabled and matching,
    /// shorthands included; no lowest-priority arbitration).
    pub fn is_destination(&self, intr: &Interrupt) -> bool {
        self.enabled() && msg::matches(&self.ident(), intr)
    }

    // ----- IA32_APIC_BASE -----------------------------------------------

    /// IA32_APIC_BASE.
    pub fn base_msr(&self) -> u64 {
        self.base
    }

    /// Writes IA32_APIC_BASE.
    ///
    /// * Bits 0-7, 9 and bits at or above MAXPHYADDR are reserved: #GP.
    /// * Bit 8 (BSP) is read-only; the written value is ignored.
    /// * Legal mode transitions: disabled ↔ xAPIC, xAPIC → x2APIC,
    ///   x2APIC → disabled. EN=0 with EXTD=1, disabled → x2APIC and
    ///   x2APIC → xAPIC raise #GP and change nothing.
    /// * Clearing EN resets every register (except the ID) and stops the
    ///   timer; re-enabling starts from that state with the xAPIC ID equal
    ///   to the initial APIC ID.
    pub fn set_base_msr(&mut self, v: u64) -> Result<(), Fault> {
        let addr_mask = ((1u64 << self.phys_addr_bits) - 1) & !0xfff;
        let allowed = addr_mask | BASE_EN | BASE_EXTD | BASE_BSP;
        if v & !allowed != 0 {
            return Err(Fault);
        }
        let new_en = v & BASE_EN != 0;
        let new_x2 = v & BASE_EXTD != 0;
        let (old_en, old_x2) = (self.enabled(), self.is_x2apic());
        match (new_en, new_x2) {
            (false, true) => return Err(Fault),
            (true, true) if !old_en => return Err(Fault),
            (true, false) if old_x2 => return Err(Fault),
            _ => {}
        }
        self.base = (v & (addr_mask | BASE_EN | BASE_EXTD)) | (self.base & BASE_BSP);
        if old_en && !new_en {
            self.reset_registers();
            self.xapic_id = self.initial_id as u8;
        }
        Ok(())
    }

    /// Guest-physical base of the xAPIC MMIO page.
    pub fn base_addr(&self) -> u64 {
        self.base & ((1u64 << self.phys_addr_bits) - 1) & !0xfff
    }

    // ----- priorities -----------------------------------------------------

    /// Task-priority register.
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// Sets the TPR (e.g. from a CR8 write).
    pub fn set_tpr(&mut self, v: u8) {
        self.tpr = v;
    }

    /// Processor-priority register: TPR if its class is at least the class
    /// of the highest in-service vector, else that class (low nibble 0).
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Arbitration priority (for lowest-priority delivery): TPR if its
    /// class is at least the highest requested class and above the highest
    /// in-service class, else the highest of the three classes.
    pub fn arbitration_priority(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        let irrv = self.irr.highest().unwrap_or(0);
        let t = self.tpr >> 4;
        if t >= irrv >> 4 && t > isrv >> 4 {
            self.tpr
        } else {
            (self.tpr & 0xf0).max(isrv & 0xf0).max(irrv & 0xf0)
        }
    }

    /// The vector the core should take next: the highest IRR vector whose
    /// priority class is above the PPR class. `None` while the APIC is
    /// globally or software disabled (pending IRR bits are held).
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.enabled() || !self.sw_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The core accepted `vector` (INTA): IRR → ISR. Ignored if the vector
    /// is not pending in the IRR.
    pub fn acknowledge(&mut self, vector: u8) {
        if self.irr.get(vector) {
            self.irr.set(vector, false);
            self.isr.set(vector, true);
        }
    }

    /// Whether `vector` is set in the IRR / ISR / TMR.
    pub fn irr_bit(&self, vector: u8) -> bool {
        self.irr.get(vector)
    }
    /// Whether `vector` is in service.
    pub fn isr_bit(&self, vector: u8) -> bool {
        self.isr.get(vector)
    }
    /// Whether `vector` was accepted as level-triggered.
    pub fn tmr_bit(&self, vector: u8) -> bool {
        self.tmr.get(vector)
    }

    /// End of interrupt: retires the highest in-service vector. Reports
    /// [`Action::Eoi`] when its TMR bit is set, and re-evaluates a
    /// level-triggered fixed LINT0/LINT1 entry using that vector.
    pub(crate) fn eoi(&mut self) -> Vec<Action> {
        let Some(v) = self.isr.highest() else {
            return Vec::new();
        };
        self.isr.set(v, false);
        let mut acts = Vec::new();
        if self.tmr.get(v) {
            acts.push(Action::Eoi { vector: v });
            for pin in 0..2 {
                let idx = LVT_LINT0 + pin;
                let lvt = self.lvt[idx];
                if lvt & LVT_REMOTE_IRR != 0 && lvt as u8 == v {
                    self.lvt[idx] &= !LVT_REMOTE_IRR;
                    acts.extend(self.lint_evaluate(pin, false));
                }
            }
        }
        acts
    }

    // ----- errors ---------------------------------------------------------

    /// Records an error and, if the error LVT is unmasked, requests its
    /// interrupt. An illegal error vector only adds "receive illegal
    /// vector" (no recursion).
    pub(crate) fn raise_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 {
            let v = lvt as u8;
            if v < 16 {
                self.esr_pending |= ESR_RECV_ILLEGAL_VECTOR;
            } else {
                self.irr.set(v, true);
                self.tmr.set(v, false);
            }
        }
    }

    /// Sets `vector` in the IRR for a locally generated or received fixed
    /// interrupt; vectors 0-15 are illegal and raise an error instead.
    fn set_irr(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.raise_error(ESR_RECV_ILLEGAL_VECTOR);
        } else {
            self.irr.set(vector, true);
            self.tmr.set(vector, level);
        }
    }

    // ----- bus messages ---------------------------------------------------

    /// A bus message addressed to this APIC (the caller has done
    /// destination matching and arbitration).
    ///
    /// * Globally disabled: the APIC is off the bus; nothing happens.
    /// * Fixed / lowest priority: sets the IRR bit (TMR set for
    ///   level-triggered, cleared for edge). Dropped while software
    ///   disabled. Vectors 0-15 set "receive illegal vector" in the ESR.
    ///   Level-triggered de-assert messages carry no interrupt.
    /// * NMI, SMI, INIT, start-up, ExtINT become [`Action`]s (they are
    ///   honoured even while software disabled). INIT level de-assert is
    ///   ignored, as on Pentium 4 and later.
    pub fn accept(&mut self, intr: &Interrupt) -> Vec<Action> {
        if !self.enabled() {
            return Vec::new();
        }
        let deassert = intr.level_triggered && !intr.assert;
        match intr.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if !deassert && self.sw_enabled() {
                    self.set_irr(intr.vector, intr.level_triggered);
                }
                Vec::new()
            }
            DeliveryMode::Smi => vec![Action::Smi],
            DeliveryMode::Nmi => vec![Action::Nmi],
            DeliveryMode::Init if deassert => Vec::new(),
            DeliveryMode::Init => vec![Action::Init],
            DeliveryMode::StartUp => vec![Action::StartUp {
                vector: intr.vector,
            }],
            DeliveryMode::ExtInt => vec![Action::ExtInt],
        }
    }

    /// Sends an IPI described by an ICR value (`lo` = bits 0-31, `dest` =
    /// destination already extracted for the current mode).
    ///
    /// Reserved delivery mode `011` sends nothing. Fixed/lowest-priority
    /// with a vector below 16 sets "send illegal vector" and sends nothing.
    /// The trigger-mode and level bits only matter for INIT (level
    /// trigger with level 0 = INIT level de-assert); every other IPI is
    /// edge-triggered, as on Pentium 4 and later. A self-only shorthand is
    /// delivered locally.
    pub(crate) fn send_ipi(&mut self, lo: u32, dest: u32) -> Vec<Action> {
        let Some(mode) = DeliveryMode::from_bits(lo >> 8) else {
            return Vec::new();
        };
        let vector = lo as u8;
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.raise_error(ESR_SEND_ILLEGAL_VECTOR);
            return Vec::new();
        }
        let deassert = mode == DeliveryMode::Init && lo & (1 << 15) != 0 && lo & (1 << 14) == 0;
        let intr = Interrupt {
            vector,
            mode,
            dest,
            logical: lo & (1 << 11) != 0,
            level_triggered: deassert,
            assert: !deassert,
            shorthand: msg::Shorthand::from_bits(lo >> 18),
            source: self.id(),
        };
        if intr.shorthand == msg::Shorthand::SelfOnly {
            self.accept(&intr)
        } else {
            vec![Action::SendIpi(intr)]
        }
    }

    // ----- local interrupts -------------------------------------------------

    /// Delivers an edge-triggered local interrupt through LVT entry `idx`.
    fn deliver_lvt(&mut self, idx: usize) -> Vec<Action> {
        let lvt = self.lvt[idx];
        if lvt & LVT_MASKED != 0 {
            return Vec::new();
        }
        // Timer and error entries have no delivery-mode field: always fixed.
        let mode = if idx == LVT_TIMER || idx == LVT_ERROR {
            0
        } else {
            (lvt >> 8) & 7
        };
        match mode {
            0 => {
                self.set_irr(lvt as u8, false);
                Vec::new()
            }
            2 => vec![Action::Smi],
            4 => vec![Action::Nmi],
            5 => vec![Action::Init],
            7 => vec![Action::ExtInt],
            _ => Vec::new(),
        }
    }

    /// Raises a CMCI, thermal or performance-counter interrupt through its
    /// LVT entry. Nothing happens if the entry is masked.
    pub fn local_interrupt(&mut self, src: LvtSource) -> Vec<Action> {
        if !self.enabled() {
            return Vec::new();
        }
        let idx = match src {
            LvtSource::Cmci => LVT_CMCI,
            LvtSource::Thermal => LVT_THERMAL,
            LvtSource::Perf => LVT_PERF,
        };
        let acts = self.deliver_lvt(idx);
        if src == LvtSource::Perf {
            self.lvt[LVT_PERF] |= LVT_MASKED;
        }
        acts
    }

    /// Drives the LINT0 pin (the 8259's INTR in virtual-wire mode). `level`
    /// is the electrical level; the LVT polarity bit inverts it.
    ///
    /// * Globally disabled APIC: LINT0 is the core's INTR — a high level
    ///   yields [`Action::ExtInt`].
    /// * ExtINT: [`Action::ExtInt`] while asserted (level-sensitive).
    /// * Fixed, edge: IRR on the rising edge. Fixed, level: IRR + TMR while
    ///   asserted and remote IRR clear; sets remote IRR, cleared by the EOI.
    /// * NMI / SMI / INIT: the action on the rising edge.
    /// * Masked: nothing (the level is still tracked).
    pub fn lint0(&mut self, level: bool) -> Vec<Action> {
        self.lint(0, level)
    }

    /// Drives the LINT1 pin (usually programmed as NMI). Same rules as
    /// [`Lapic::lint0`] except that LINT1 is always edge-sensitive, and a
    /// globally disabled APIC turns a rising edge into [`Action::Nmi`].
    pub fn lint1(&mut self, level: bool) -> Vec<Action> {
        self.lint(1, level)
    }

    fn lint(&mut self, pin: usize, level: bool) -> Vec<Action> {
        let rising_raw = level && !self.lint_raw[pin];
        self.lint_raw[pin] = level;
        let asserted = level != (self.lvt[LVT_LINT0 + pin] & LVT_ACTIVE_LOW != 0);
        let rising = asserted && !self.lint_asserted[pin];
        self.lint_asserted[pin] = asserted;
        if !self.enabled() {
            return match pin {
                0 if level => vec![Action::ExtInt],
                1 if rising_raw => vec![Action::Nmi],
                _ => Vec::new(),
            };
        }
        self.lint_evaluate(pin, rising)
    }

    /// Applies the LINT `pin` LVT entry to the tracked level; `rising` says
    /// whether the level just went from deasserted to asserted.
    fn lint_evaluate(&mut self, pin: usize, rising: bool) -> Vec<Action> {
        let idx = LVT_LINT0 + pin;
        let lvt = self.lvt[idx];
        let asserted = self.lint_asserted[pin];
        if lvt & LVT_MASKED != 0 || !self.enabled() {
            return Vec::new();
        }
        match (lvt >> 8) & 7 {
            0 if pin == 0 && lvt & LVT_LEVEL != 0 => {
                if asserted && lvt & LVT_REMOTE_IRR == 0 {
                    let v = lvt as u8;
                    self.set_irr(v, true);
                    if v >= 16 {
                        self.lvt[idx] |= LVT_REMOTE_IRR;
                    }
                }
                Vec::new()
            }
            7 if asserted => vec![Action::ExtInt],
            7 => Vec::new(),
            _ if rising => self.deliver_lvt(idx),
            _ => Vec::new(),
        }
    }

    /// Whether the core should accept interrupts from the 8259 (INTR): the
    /// APIC is globally disabled, or LVT LINT0 is unmasked in ExtINT mode.
    pub fn wants_extint(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        !self.enabled() || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == 7)
    }

    // ----- timer -----------------------------------------------------------

    fn timer_mode(&self) -> TimerMode {
        TimerMode::from_lvt(self.lvt[LVT_TIMER])
    }

    /// Guest time of the next timer expiry, if armed. The VMM calls
    /// [`Lapic::timer_tick`] at or after it.
    pub fn next_timer_deadline(&self) -> Option<Ns> {
        if !self.enabled() {
            return None;
        }
        self.timer.deadline(self.timer_mode())
    }

    /// Processes a timer expiry due at or before `now`: one-shot stops,
    /// periodic re-arms (missed periods coalesce into one interrupt),
    /// TSC-deadline disarms and clears IA32_TSC_DEADLINE. The LVT timer
    /// vector is set in the IRR unless the entry is masked. Returns
    /// [`Action::TimerChanged`] when the deadline changed.
    pub fn timer_tick(&mut self, now: Ns) -> Vec<Action> {
        if !self.enabled() {
            return Vec::new();
        }
        let before = self.next_timer_deadline();
        let mut acts = Vec::new();
        if self.timer.tick(now, self.timer_mode()) {
            acts = self.deliver_lvt(LVT_TIMER);
        }
        if self.next_timer_deadline() != before {
            acts.push(Action::TimerChanged);
        }
        acts
    }

    /// The guest TSC rate used by the TSC-deadline timer.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }
}
