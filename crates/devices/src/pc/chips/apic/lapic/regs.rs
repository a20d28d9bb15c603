//! Register access: the xAPIC MMIO page and the x2APIC MSRs.
//!
//! Both interfaces decode to a [`Reg`] (xAPIC offset / 16 equals x2APIC
//! MSR − 0x800) and share [`Lapic::read_reg`] / [`Lapic::write_reg`];
//! mode-specific rules (what is reserved, read-only, #GP) are applied in
//! the front ends.

use super::timer::TimerMode;
use super::*;

/// A decoded APIC register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Id,
    Version,
    Tpr,
    Apr,
    Ppr,
    Eoi,
    Rrd,
    Ldr,
    Dfr,
    Svr,
    Isr(usize),
    Tmr(usize),
    Irr(usize),
    Esr,
    IcrLo,
    IcrHi,
    Lvt(usize),
    InitCount,
    CurCount,
    Dcr,
    SelfIpi,
}

impl Reg {
    /// Decodes a register index (xAPIC offset >> 4, or x2APIC MSR − 0x800).
    fn decode(index: u32) -> Option<Self> {
        Some(match index {
            0x02 => Self::Id,
            0x03 => Self::Version,
            0x08 => Self::Tpr,
            0x09 => Self::Apr,
            0x0a => Self::Ppr,
            0x0b => Self::Eoi,
            0x0c => Self::Rrd,
            0x0d => Self::Ldr,
            0x0e => Self::Dfr,
            0x0f => Self::Svr,
            0x10..=0x17 => Self::Isr((index - 0x10) as usize),
            0x18..=0x1f => Self::Tmr((index - 0x18) as usize),
            0x20..=0x27 => Self::Irr((index - 0x20) as usize),
            0x28 => Self::Esr,
            0x2f => Self::Lvt(LVT_CMCI),
            0x30 => Self::IcrLo,
            0x31 => Self::IcrHi,
            0x32 => Self::Lvt(LVT_TIMER),
            0x33 => Self::Lvt(LVT_THERMAL),
            0x34 => Self::Lvt(LVT_PERF),
            0x35 => Self::Lvt(LVT_LINT0),
            0x36 => Self::Lvt(LVT_LINT1),
            0x37 => Self::Lvt(LVT_ERROR),
            0x38 => Self::InitCount,
            0x39 => Self::CurCount,
            0x3e => Self::Dcr,
            0x3f => Self::SelfIpi,
            _ => return None,
        })
    }

    /// Whether the register exists in xAPIC mode.
    fn in_xapic(self) -> bool {
        self != Self::SelfIpi
    }

    /// Whether the register exists in x2APIC mode.
    fn in_x2apic(self) -> bool {
        !matches!(self, Self::Apr | Self::Rrd | Self::Dfr | Self::IcrHi)
    }

    /// Whether the register can be read (EOI and SELF IPI are write-only).
    fn readable(self) -> bool {
        !matches!(self, Self::Eoi | Self::SelfIpi)
    }

    /// Whether the register can be written in x2APIC mode.
    fn x2apic_writable(self) -> bool {
        matches!(
            self,
            Self::Tpr
                | Self::Eoi
                | Self::Svr
                | Self::Esr
                | Self::IcrLo
                | Self::Lvt(_)
                | Self::InitCount
                | Self::Dcr
                | Self::SelfIpi
        )
    }
}

/// Writable bits of the SVR: vector, APIC software enable, focus-processor
/// checking. Bit 12 (EOI-broadcast suppression) is not supported.
pub(super) const SVR_WRITABLE: u32 = 0x3ff;
/// Writable bits of ICR low: vector, delivery mode, destination mode,
/// level, trigger mode, shorthand.
const ICR_LO_WRITABLE: u32 = 0x000c_cfff;

impl Lapic {
    /// Reads a register value (32 bits; the x2APIC ICR is assembled by
    /// the MSR front end).
    fn read_reg(&self, reg: Reg, now: Ns) -> u32 {
        match reg {
            Reg::Id => {
                if self.is_x2apic() {
                    self.initial_id
                } else {
                    (self.xapic_id as u32) << 24
                }
            }
            Reg::Version => VERSION,
            Reg::Tpr => self.tpr as u32,
            Reg::Apr => self.arbitration_priority() as u32,
            Reg::Ppr => self.ppr() as u32,
            Reg::Eoi | Reg::Rrd | Reg::SelfIpi => 0,
            Reg::Ldr => self.ldr(),
            Reg::Dfr => self.dfr | 0x0fff_ffff,
            Reg::Svr => self.svr,
            Reg::Isr(i) => self.isr.word(i),
            Reg::Tmr(i) => self.tmr.word(i),
            Reg::Irr(i) => self.irr.word(i),
            Reg::Esr => self.esr,
            Reg::IcrLo => self.icr_lo,
            Reg::IcrHi => self.icr_hi,
            Reg::Lvt(i) => self.lvt[i],
            Reg::InitCount => self.timer.initial,
            Reg::CurCount => self.timer.current(now, self.timer_mode()),
            Reg::Dcr => self.timer.dcr,
        }
    }

    /// Writes a register (32-bit value; ICR handled by the front ends).
    /// Read-only registers ignore the write.
    fn write_reg(&mut self, reg: Reg, v: u32, now: Ns) -> Vec<Action> {
        let before = self.next_timer_deadline();
        let mut acts = match reg {
            Reg::Id => {
                if !self.is_x2apic() {
                    self.xapic_id = (v >> 24) as u8;
                }
                Vec::new()
            }
            Reg::Tpr => {
                self.tpr = v as u8;
                Vec::new()
            }
            Reg::Eoi => self.eoi(),
            Reg::Ldr => {
                if !self.is_x2apic() {
                    self.ldr = v & 0xff00_0000;
                }
                Vec::new()
            }
            Reg::Dfr => {
                self.dfr = v | 0x0fff_ffff;
                Vec::new()
            }
            Reg::Svr => {
                self.svr = v & SVR_WRITABLE;
                if !self.sw_enabled() {
                    for lvt in &mut self.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
                Vec::new()
            }
            Reg::Esr => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
                Vec::new()
            }
            Reg::IcrLo => {
                self.icr_lo = v & ICR_LO_WRITABLE;
                let dest = self.icr_hi >> 24;
                self.send_ipi(self.icr_lo, dest)
            }
            Reg::IcrHi => {
                self.icr_hi = v & 0xff00_0000;
                Vec::new()
            }
            Reg::Lvt(i) => self.write_lvt(i, v),
            Reg::InitCount => {
                self.timer.write_initial(now, v, self.timer_mode());
                Vec::new()
            }
            Reg::Dcr => {
                self.timer.write_dcr(now, v, self.timer_mode());
                Vec::new()
            }
            Reg::SelfIpi => {
                // Fixed, edge, self-only shorthand: delivered locally.
                self.send_ipi((v & 0xff) | (1 << 18), 0)
            }
            Reg::Version
            | Reg::Apr
            | Reg::Ppr
            | Reg::Rrd
            | Reg::Isr(_)
            | Reg::Tmr(_)
            | Reg::Irr(_)
            | Reg::CurCount => Vec::new(),
        };
        if self.next_timer_deadline() != before {
            acts.push(Action::TimerChanged);
        }
        acts
    }

    /// Writes LVT entry `i`, keeping read-only bits and forcing the mask
    /// while software disabled.
    fn write_lvt(&mut self, i: usize, v: u32) -> Vec<Action> {
        let old = self.lvt[i];
        let ro = old & LVT_REMOTE_IRR;
        let mut new = (v & LVT_WRITABLE[i]) | ro;
        if !self.sw_enabled() {
            new |= LVT_MASKED;
        }
        // Switching a LINT entry to edge trigger drops a stale remote IRR.
        if new & LVT_LEVEL == 0 {
            new &= !LVT_REMOTE_IRR;
        }
        self.lvt[i] = new;
        match i {
            LVT_TIMER => {
                self.timer
                    .mode_changed(TimerMode::from_lvt(old), TimerMode::from_lvt(new));
                Vec::new()
            }
            LVT_LINT0 | LVT_LINT1 => {
                let pin = i - LVT_LINT0;
                self.lint_asserted[pin] = self.lint_raw[pin] != (new & LVT_ACTIVE_LOW != 0);
                self.lint_evaluate(pin, false)
            }
            _ => Vec::new(),
        }
    }

    // ----- MMIO --------------------------------------------------------------

    /// Decodes an MMIO offset to a register; `Err(())` marks a reserved
    /// register slot, `Ok(None)` an access outside a register (bytes 4-15
    /// of a slot, or beyond the page).
    fn mmio_decode(offset: u32) -> Result<Option<Reg>, ()> {
        if offset >= 0x1000 || offset & 0xf != 0 {
            return Ok(None);
        }
        match Reg::decode(offset >> 4) {
            Some(r) if r.in_xapic() => Ok(Some(r)),
            _ => Err(()),
        }
    }

    /// 32-bit read of the xAPIC page at `offset` (0..0x1000; registers at
    /// 16-byte boundaries).
    ///
    /// * Not decoding ([`Lapic::mmio_active`] false: globally disabled or
    ///   x2APIC mode): the APIC does not claim the access; `0xffff_ffff`.
    /// * Bytes 4-15 of a register slot and offsets past the page read 0.
    /// * Reserved register slots read 0 and set ESR "illegal register
    ///   address". Write-only registers (EOI) read 0.
    pub fn mmio_read(&mut self, offset: u32, now: Ns) -> u32 {
        if !self.mmio_active() {
            return 0xffff_ffff;
        }
        match Self::mmio_decode(offset) {
            Ok(Some(reg)) => self.read_reg(reg, now),
            Ok(None) => 0,
            Err(()) => {
                self.raise_error(ESR_ILLEGAL_REGISTER);
                0
            }
        }
    }

    /// 32-bit write to the xAPIC page at `offset`. Dropped when the page
    /// does not decode; writes to read-only registers and to bytes 4-15 of
    /// a slot are ignored; reserved slots set ESR "illegal register
    /// address". Writing ICR low sends the IPI.
    pub fn mmio_write(&mut self, offset: u32, v: u32, now: Ns) -> Vec<Action> {
        if !self.mmio_active() {
            return Vec::new();
        }
        match Self::mmio_decode(offset) {
            Ok(Some(reg)) => self.write_reg(reg, v, now),
            Ok(None) => Vec::new(),
            Err(()) => {
                self.raise_error(ESR_ILLEGAL_REGISTER);
                Vec::new()
            }
        }
    }

    // ----- MSRs --------------------------------------------------------------

    /// Decodes an x2APIC MSR; #GP unless x2APIC mode is on and the MSR is
    /// an x2APIC register.
    fn msr_decode(&self, msr: u32) -> Result<Reg, Fault> {
        if !self.is_x2apic() || !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return Err(Fault);
        }
        match Reg::decode(msr - MSR_X2APIC_FIRST) {
            Some(r) if r.in_x2apic() => Ok(r),
            _ => Err(Fault),
        }
    }

    /// RDMSR of IA32_APIC_BASE (0x1b), IA32_TSC_DEADLINE (0x6e0) or an
    /// x2APIC register (0x800-0x8ff).
    ///
    /// x2APIC registers #GP outside x2APIC mode, when reserved (including
    /// the xAPIC-only DFR, APR, RRD and ICR-high slots) and when write-only
    /// (EOI, SELF IPI). The ICR (0x830) reads as one 64-bit value with the
    /// destination in bits 32-63. Any other MSR number #GPs.
    pub fn msr_read(&mut self, msr: u32, now: Ns) -> Result<u64, Fault> {
        match msr {
            MSR_APIC_BASE => Ok(self.base_msr()),
            MSR_TSC_DEADLINE => Ok(self.timer.read_tsc_deadline(self.timer_mode())),
            _ => {
                let reg = self.msr_decode(msr)?;
                if !reg.readable() {
                    return Err(Fault);
                }
                if reg == Reg::IcrLo {
                    return Ok(((self.icr_hi as u64) << 32) | self.icr_lo as u64);
                }
                Ok(self.read_reg(reg, now) as u64)
            }
        }
    }

    /// WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register.
    ///
    /// x2APIC rules: #GP outside x2APIC mode, for reserved MSRs, for
    /// read-only registers (ID, version, LDR, PPR, ISR/TMR/IRR, current
    /// count), for a non-zero upper half on any register but the ICR, for
    /// a non-zero value written to EOI or ESR, and for bits 8-31 set in
    /// SELF IPI. Reserved bits inside other registers are ignored. Writing
    /// the ICR (0x830, destination in bits 32-63) sends the IPI.
    ///
    /// IA32_TSC_DEADLINE arms the TSC-deadline timer (only in that timer
    /// mode; otherwise ignored) for `deadline` TSC ticks, converted with
    /// `tsc_now` and the TSC rate; a deadline at or before `tsc_now` fires
    /// at once, 0 disarms.
    pub fn msr_write(
        &mut self,
        msr: u32,
        v: u64,
        now: Ns,
        tsc_now: u64,
    ) -> Result<Vec<Action>, Fault> {
        match msr {
            MSR_APIC_BASE => {
                let before = self.next_timer_deadline();
                self.set_base_msr(v)?;
                let changed = self.next_timer_deadline() != before;
                Ok(if changed {
                    vec![Action::TimerChanged]
                } else {
                    Vec::new()
                })
            }
            MSR_TSC_DEADLINE => Ok(self.write_tsc_deadline(v, now, tsc_now)),
            _ => {
                let reg = self.msr_decode(msr)?;
                if !reg.x2apic_writable() {
                    return Err(Fault);
                }
                if reg == Reg::IcrLo {
                    self.icr_lo = v as u32 & ICR_LO_WRITABLE;
                    self.icr_hi = (v >> 32) as u32;
                    return Ok(self.send_ipi(self.icr_lo, self.icr_hi));
                }
                if v >> 32 != 0 {
                    return Err(Fault);
                }
                let v = v as u32;
                match reg {
                    Reg::Eoi | Reg::Esr if v != 0 => return Err(Fault),
                    Reg::SelfIpi if v & !0xff != 0 => return Err(Fault),
                    _ => {}
                }
                Ok(self.write_reg(reg, v, now))
            }
        }
    }

    fn write_tsc_deadline(&mut self, v: u64, now: Ns, tsc_now: u64) -> Vec<Action> {
        if !self.enabled() {
            return Vec::new();
        }
        let before = self.next_timer_deadline();
        let mode = self.timer_mode();
        let mut acts = Vec::new();
        if self
            .timer
            .write_tsc_deadline(v, now, tsc_now, self.tsc_hz, mode)
        {
            acts = self.deliver_lvt(LVT_TIMER);
        }
        if self.next_timer_deadline() != before {
            acts.push(Action::TimerChanged);
        }
        acts
    }
}
