//! The x87 FPU: register stack, loads and stores in every memory format, arithmetic,
//! compares, FXCH/FCMOV, constants, and the exception model (flags in FSW, masked responses,
//! unmasked exceptions pending until the next waiting instruction raises #MF).
//!
//! Arithmetic is exact 80-bit IEEE through `rustc_apfloat` with FCW's rounding control.
//! Where this model is approximate (documented in the note as well):
//! - precision control (FCW.PC = single/double) rounds the 64-bit result's significand again,
//!   so a double rounding can differ from hardware by one unit in the last place;
//! - FSQRT is two Newton steps in extended precision (may differ by one ulp);
//! - FSIN, FCOS, FSINCOS, FPTAN, FPATAN, F2XM1, FYL2X, FYL2XP1 are computed in double precision;
//! - C1 reports stack overflow and rounding up for arithmetic and FST/FSTP to m32/m64;
//! - FSCALE scales exactly but does not report overflow, underflow or precision;
//! - FBLD/FBSTP (packed BCD) raise #UD as unimplemented.

use iced_x86::{Instruction, MemorySize, Mnemonic, OpKind, Register};
use palacios_x86::cr0;
use rustc_apfloat::ieee::X87DoubleExtended as X;
use rustc_apfloat::{Float, Round, Status};

use super::Handler;
use super::sse::{nm, x87_pending};
use super::x87num::{from_f64, fsqrt, narrow, precision, to_f64, widen};
use crate::block::Insn;
use crate::cpu::fl;
use crate::fpu::sw;
use crate::machine::{Machine, R};

/// The "real indefinite" QNaN.
pub const INDEF: u128 = 0xffff_c000_0000_0000_0000;
const M80: u128 = (1 << 80) - 1;

/// x87 instructions: #NM with CR0.EM or CR0.TS; waiting ones first deliver a pending #MF.
fn avail(m: &Machine, wait: bool) -> R<()> {
    if m.cpu.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(nm());
    }
    if wait {
        x87_pending(m)?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    Zero,
    Denormal,
    Normal,
    Inf,
    QNan,
    SNan,
    /// Unnormals, pseudo-infinities and pseudo-NaNs: invalid operands.
    Unsupported,
}

pub fn class(v: u128) -> Class {
    let exp = (v >> 64) as u16 & 0x7fff;
    let mant = v as u64;
    let j = mant >> 63;
    match exp {
        0 if mant == 0 => Class::Zero,
        0 => Class::Denormal,
        0x7fff if j == 0 => Class::Unsupported,
        0x7fff if mant << 1 == 0 => Class::Inf,
        0x7fff if mant & (1 << 62) != 0 => Class::QNan,
        0x7fff => Class::SNan,
        _ if j == 0 => Class::Unsupported,
        _ => Class::Normal,
    }
}

pub(super) fn sign80(v: u128) -> bool {
    (v >> 79) & 1 != 0
}

fn quiet80(v: u128) -> u128 {
    v | (1 << 62)
}

pub(super) fn round_of(fcw: u16) -> Round {
    super::ssefp::round_of(u32::from(fcw >> 10))
}

/// Exception flags collected by one instruction.
#[derive(Default)]
pub(super) struct Ex {
    pub(super) flags: u16,
    pub(super) c1: bool,
}

impl Ex {
    pub(super) fn status(&mut self, s: Status) {
        self.flags |= super::ssefp::exception_bits(s);
    }
}

impl Machine {
    fn fpu_st(&self, i: usize) -> Option<u128> {
        let p = self.cpu.fpu.phys(i);
        (self.cpu.fpu.tag & (1 << p) != 0).then(|| self.cpu.fpu.r[p])
    }

    fn fpu_set_st(&mut self, i: usize, v: u128) {
        let p = self.cpu.fpu.phys(i);
        self.cpu.fpu.r[p] = v & M80;
        self.cpu.fpu.tag |= 1 << p;
    }

    fn fpu_pop(&mut self) {
        let p = self.cpu.fpu.phys(0);
        self.cpu.fpu.tag &= !(1 << p);
        let t = self.cpu.fpu.top();
        self.cpu.fpu.set_top(t + 1);
    }

    /// Push `v`: a full stack is a stack overflow (IE|SF, C1=1; masked: indefinite pushed).
    fn fpu_push(&mut self, ex: &mut Ex, v: u128) {
        let t = (self.cpu.fpu.top() + 7) & 7;
        if self.cpu.fpu.tag & (1 << t) != 0 {
            ex.flags |= sw::IE | sw::SF;
            ex.c1 = true;
            if self.cpu.fpu.fcw & sw::IE == 0 {
                return;
            }
            self.cpu.fpu.set_top(t);
            self.fpu_set_st(0, INDEF);
            return;
        }
        self.cpu.fpu.set_top(t);
        self.fpu_set_st(0, v);
    }

    /// Record flags; returns whether the result may be stored (no unmasked IE, ZE or DE).
    fn fpu_finish(&mut self, ex: &Ex) -> bool {
        let f = &mut self.cpu.fpu;
        f.fsw |= ex.flags;
        f.fsw = (f.fsw & !sw::C1) | if ex.c1 { sw::C1 } else { 0 };
        let unmasked = ex.flags & !f.fcw & sw::EXC;
        if unmasked != 0 {
            f.fsw |= sw::ES | sw::B;
        }
        unmasked & (sw::IE | sw::ZE | sw::DE) == 0
    }

    /// Read ST(i); an empty register is a stack underflow (masked: the indefinite).
    fn fpu_read(&self, ex: &mut Ex, i: usize) -> u128 {
        match self.fpu_st(i) {
            Some(v) => v,
            None => {
                ex.flags |= sw::IE | sw::SF;
                INDEF
            }
        }
    }
}

/// Load a memory operand of the x87 formats as an 80-bit value.
fn load_mem(m: &mut Machine, x: &Insn, ex: &mut Ex) -> R<u128> {
    let off = m.ea(x);
    let seg = m.mseg(x);
    let ms = x.i.memory_size();
    Ok(match ms {
        MemorySize::Float80 => {
            let mut b = [0u8; 16];
            m.read_buf(seg, off, &mut b[..10], 1)?;
            u128::from_le_bytes(b)
        }
        MemorySize::Float32 | MemorySize::Float64 => {
            let (v, p) = if ms == MemorySize::Float32 {
                (m.read(seg, off, 4)?, super::ssefp::S)
            } else {
                (m.read(seg, off, 8)?, super::ssefp::D)
            };
            widen(ex, p, v)
        }
        _ => {
            let size = ms.size() as u64;
            let v = m.read(seg, off, size)?;
            let i = ((v << (64 - size * 8)) as i64) >> (64 - size * 8);
            X::from_i128(i128::from(i)).value.to_bits()
        }
    })
}

/// NaN propagation of a two-operand operation (SDM table 4-7, x87 column).
fn nan_result(ex: &mut Ex, a: u128, b: u128) -> Option<u128> {
    let (ca, cb) = (class(a), class(b));
    if ca == Class::Unsupported || cb == Class::Unsupported {
        ex.flags |= sw::IE;
        return Some(INDEF);
    }
    let na = matches!(ca, Class::QNan | Class::SNan);
    let nb = matches!(cb, Class::QNan | Class::SNan);
    if !na && !nb {
        return None;
    }
    if ca == Class::SNan || cb == Class::SNan {
        ex.flags |= sw::IE;
    }
    Some(quiet80(match (na, nb) {
        (true, true) => {
            if (a as u64) << 1 >= (b as u64) << 1 {
                a
            } else {
                b
            }
        }
        (true, false) => a,
        _ => b,
    }))
}

const ADD: u8 = 0;
const SUB: u8 = 1;
const SUBR: u8 = 2;
const MUL: u8 = 3;
const DIV: u8 = 4;
const DIVR: u8 = 5;

/// a OP b in extended precision.
fn arith(ex: &mut Ex, fcw: u16, op: u8, a: u128, b: u128) -> u128 {
    if let Some(n) = nan_result(ex, a, b) {
        return n;
    }
    if class(a) == Class::Denormal || class(b) == Class::Denormal {
        ex.flags |= sw::DE;
    }
    let (x, y) = (X::from_bits(a), X::from_bits(b));
    let rc = round_of(fcw);
    let r = match op {
        ADD => x.add_r(y, rc),
        SUB => x.sub_r(y, rc),
        SUBR => y.sub_r(x, rc),
        MUL => x.mul_r(y, rc),
        DIV => x.div_r(y, rc),
        _ => y.div_r(x, rc),
    };
    ex.status(r.status);
    if r.status.contains(Status::INVALID_OP) {
        return INDEF;
    }
    if r.status.contains(Status::INEXACT) {
        // C1: the result was rounded up (away from zero).
        let z = match op {
            ADD => x.add_r(y, Round::TowardZero),
            SUB => x.sub_r(y, Round::TowardZero),
            SUBR => y.sub_r(x, Round::TowardZero),
            MUL => x.mul_r(y, Round::TowardZero),
            DIV => x.div_r(y, Round::TowardZero),
            _ => y.div_r(x, Round::TowardZero),
        };
        ex.c1 = z.value.to_bits() != r.value.to_bits();
    }
    precision(fcw, ex, r.value.to_bits())
}

/// FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR (and the P and FI forms).
fn farith<const OP: u8, const POP: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let mut ex = Ex::default();
    let fcw = m.cpu.fpu.fcw;
    let (dst, a, b) = if x.i.op0_kind() == OpKind::Memory {
        let b = load_mem(m, x, &mut ex)?;
        (0, m.fpu_read(&mut ex, 0), b)
    } else {
        let d = (x.i.op0_register() as usize) - (Register::ST0 as usize);
        let s = if x.i.op_count() > 1 {
            (x.i.op1_register() as usize) - (Register::ST0 as usize)
        } else {
            0
        };
        (d, m.fpu_read(&mut ex, d), m.fpu_read(&mut ex, s))
    };
    let r = if ex.flags & sw::SF != 0 {
        INDEF
    } else {
        arith(&mut ex, fcw, OP, a, b)
    };
    if m.fpu_finish(&ex) {
        m.fpu_set_st(dst, r);
        if POP {
            m.fpu_pop();
        }
    }
    record(m, x);
    Ok(())
}

/// Remember the last instruction's opcode and pointers (FOP, FIP/FCS, FDP/FDS).
fn record(m: &mut Machine, x: &Insn) {
    let f = &mut m.cpu.fpu;
    f.fip = x.next.wrapping_sub(x.i.len() as u64);
    f.fcs = m.cpu.seg[crate::cpu::CS].selector;
    if x.i.op_count() > 0 && x.i.op0_kind() == OpKind::Memory
        || x.i.op_count() > 1 && x.i.op1_kind() == OpKind::Memory
    {
        let off = m.ea(x);
        m.cpu.fpu.fdp = off;
        m.cpu.fpu.fds = m.cpu.seg[m.mseg(x)].selector;
    }
}

fn fld(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let mut ex = Ex::default();
    let v = if x.i.op0_kind() == OpKind::Memory {
        load_mem(m, x, &mut ex)?
    } else {
        let s = (x.i.op0_register() as usize) - (Register::ST0 as usize);
        m.fpu_read(&mut ex, s)
    };
    let store = {
        let unmasked = ex.flags & !m.cpu.fpu.fcw & sw::EXC;
        unmasked & (sw::IE | sw::DE) == 0
    };
    if store {
        m.fpu_push(&mut ex, v);
    }
    m.fpu_finish(&ex);
    record(m, x);
    Ok(())
}

fn fconst<const K: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    // 80-bit values of 1, log2(10), log2(e), pi, log10(2), ln(2), 0 (round to nearest).
    let v: u128 = match K {
        0 => 0x3fff_8000_0000_0000_0000,
        1 => 0x4000_d49a_784b_cd1b_8afe,
        2 => 0x3fff_b8aa_3b29_5c17_f0bc,
        3 => 0x4000_c90f_daa2_2168_c235,
        4 => 0x3ffd_9a20_9a84_fbcf_f799,
        5 => 0x3ffe_b172_17f7_d1cf_79ac,
        _ => 0,
    };
    // The internal constants have more bits than fit; the loaded value follows FCW.RC. All
    // but log2(10) round up to nearest.
    let v = match (K, round_of(m.cpu.fpu.fcw)) {
        (2..=5, Round::TowardNegative | Round::TowardZero) => v - 1,
        (1, Round::TowardPositive) => v + 1,
        _ => v,
    };
    let mut ex = Ex::default();
    m.fpu_push(&mut ex, v);
    m.fpu_finish(&ex);
    record(m, x);
    Ok(())
}

/// FST/FSTP to a register or m32/m64/m80; FIST/FISTP/FISTTP to m16/m32/m64.
fn fst<const POP: bool, const INT: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let mut ex = Ex::default();
    let v = m.fpu_read(&mut ex, 0);
    let fcw = m.cpu.fpu.fcw;
    if x.i.op0_kind() == OpKind::Register {
        let d = (x.i.op0_register() as usize) - (Register::ST0 as usize);
        if m.fpu_finish(&ex) {
            m.fpu_set_st(d, v);
            if POP {
                m.fpu_pop();
            }
        }
        record(m, x);
        return Ok(());
    }
    let ms = x.i.memory_size();
    let size = ms.size() as u64;
    let (bytes, n): ([u8; 16], usize) = if INT > 0 {
        let width = size as usize * 8;
        let rc = if INT == 2 {
            Round::TowardZero
        } else {
            round_of(fcw)
        };
        let i = if matches!(class(v), Class::Unsupported | Class::QNan | Class::SNan) {
            ex.flags |= sw::IE;
            1i128 << (width - 1)
        } else {
            if class(v) == Class::Denormal {
                ex.flags |= sw::DE;
            }
            let mut exact = true;
            let r = X::from_bits(v).to_i128_r(width, rc, &mut exact);
            if r.status.contains(Status::INVALID_OP) {
                ex.flags |= sw::IE;
                1i128 << (width - 1)
            } else {
                ex.status(r.status);
                r.value
            }
        };
        ((i as u128).to_le_bytes(), size as usize)
    } else {
        match ms {
            MemorySize::Float80 => (v.to_le_bytes(), 10),
            MemorySize::Float32 => (
                u128::from(narrow(&mut ex, fcw, super::ssefp::S, v)).to_le_bytes(),
                4,
            ),
            _ => (
                u128::from(narrow(&mut ex, fcw, super::ssefp::D, v)).to_le_bytes(),
                8,
            ),
        }
    };
    let unmasked = ex.flags & !fcw & sw::EXC;
    if unmasked & (sw::IE | sw::DE | sw::OE | sw::UE) == 0 {
        let off = m.ea(x);
        let seg = m.mseg(x);
        m.write_buf(seg, off, &bytes[..n], 1)?;
    }
    if m.fpu_finish(&ex) && POP {
        m.fpu_pop();
    }
    record(m, x);
    Ok(())
}

fn fxch(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let i = if x.i.op_count() > 1 {
        (x.i.op1_register() as usize) - (Register::ST0 as usize)
    } else {
        1
    };
    let mut ex = Ex::default();
    let a = m.fpu_read(&mut ex, 0);
    let b = m.fpu_read(&mut ex, i);
    if m.fpu_finish(&ex) {
        m.fpu_set_st(0, b);
        m.fpu_set_st(i, a);
    }
    Ok(())
}

/// FCHS, FABS, FSQRT, FRNDINT, FSIN, FCOS, F2XM1 and the other one-operand operations on ST0.
fn funary<const K: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let mut ex = Ex::default();
    let fcw = m.cpu.fpu.fcw;
    let v = m.fpu_read(&mut ex, 0);
    let c = class(v);
    let r = if ex.flags & sw::SF != 0 {
        INDEF
    } else {
        match K {
            0 => v ^ (1 << 79),
            1 => v & !(1 << 79),
            _ if matches!(c, Class::QNan | Class::SNan | Class::Unsupported) => {
                if c != Class::QNan {
                    ex.flags |= sw::IE;
                }
                if c == Class::Unsupported {
                    INDEF
                } else {
                    quiet80(v)
                }
            }
            2 => fsqrt(&mut ex, fcw, v),
            3 => {
                if c == Class::Denormal {
                    ex.flags |= sw::DE;
                }
                let r = X::from_bits(v).round_to_integral(round_of(fcw));
                ex.status(r.status & Status::INEXACT);
                if r.status.contains(Status::INEXACT) {
                    let z = X::from_bits(v).round_to_integral(Round::TowardZero);
                    ex.c1 = z.value.to_bits() != r.value.to_bits();
                }
                r.value.to_bits()
            }
            _ => {
                // Transcendentals through f64 (see the module documentation).
                let f = to_f64(v);
                let out = match K {
                    4 | 5 if f.abs() >= 9.223_372_036_854_775_808e18 => {
                        // Out of range: ST0 unchanged, C2 set.
                        m.fpu_finish(&ex);
                        return finish_c2(m, x, true);
                    }
                    4 => f.sin(),
                    5 => f.cos(),
                    _ => f.exp2() - 1.0, // F2XM1
                };
                if c == Class::Inf {
                    ex.flags |= sw::IE;
                    INDEF
                } else {
                    ex.flags |= sw::PE;
                    from_f64(out)
                }
            }
        }
    };
    if m.fpu_finish(&ex) {
        m.fpu_set_st(0, r);
    }
    finish_c2(m, x, false)
}

/// Set C2 (argument out of range) and record the instruction.
fn finish_c2(m: &mut Machine, x: &Insn, c2: bool) -> R<()> {
    let f = &mut m.cpu.fpu;
    f.fsw = (f.fsw & !sw::C2) | if c2 { sw::C2 } else { 0 };
    record(m, x);
    Ok(())
}

/// Compare ST0 with ST(i) or memory: FCOM/FCOMP/FCOMPP/FUCOM*/FICOM* set C3 C2 C0;
/// FCOMI/FUCOMI* set ZF PF CF. `U`: unordered compare (only SNaNs are invalid).
fn fcom<const U: bool, const POPS: u8, const EFL: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let mut ex = Ex::default();
    let a = m.fpu_read(&mut ex, 0);
    let b = if x.i.mnemonic() == Mnemonic::Ftst {
        0
    } else if x.i.op_count() == 0 {
        m.fpu_read(&mut ex, 1)
    } else if x.i.op0_kind() == OpKind::Memory {
        load_mem(m, x, &mut ex)?
    } else {
        let last = x.i.op_register(x.i.op_count() - 1);
        m.fpu_read(&mut ex, (last as usize) - (Register::ST0 as usize))
    };
    let (ca, cb) = (class(a), class(b));
    let nan = |c| matches!(c, Class::QNan | Class::SNan | Class::Unsupported);
    let (c3, c2, c0) = if ex.flags & sw::SF != 0 || nan(ca) || nan(cb) {
        if !U
            || matches!(ca, Class::SNan | Class::Unsupported)
            || matches!(cb, Class::SNan | Class::Unsupported)
        {
            ex.flags |= sw::IE;
        }
        (true, true, true)
    } else {
        if ca == Class::Denormal || cb == Class::Denormal {
            ex.flags |= sw::DE;
        }
        match X::from_bits(a).partial_cmp(&X::from_bits(b)) {
            Some(std::cmp::Ordering::Less) => (false, false, true),
            Some(std::cmp::Ordering::Equal) => (true, false, false),
            _ => (false, false, false),
        }
    };
    if m.fpu_finish(&ex) {
        if EFL {
            let f = (if c3 { fl::ZF } else { 0 })
                | (if c2 { fl::PF } else { 0 })
                | (if c0 { fl::CF } else { 0 });
            m.cpu.flags = (m.cpu.flags & !fl::ARITH) | f;
        } else {
            let s = &mut m.cpu.fpu.fsw;
            *s &= !(sw::C3 | sw::C2 | sw::C0);
            *s |= (if c3 { sw::C3 } else { 0 })
                | (if c2 { sw::C2 } else { 0 })
                | (if c0 { sw::C0 } else { 0 });
        }
        for _ in 0..POPS {
            m.fpu_pop();
        }
    }
    record(m, x);
    Ok(())
}

fn fxam(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let p = m.cpu.fpu.phys(0);
    let v = m.cpu.fpu.r[p];
    let (c3, c2, c0) = if m.cpu.fpu.tag & (1 << p) == 0 {
        (true, false, true)
    } else {
        match class(v) {
            Class::Unsupported => (false, false, false),
            Class::QNan | Class::SNan => (false, false, true),
            Class::Normal => (false, true, false),
            Class::Inf => (false, true, true),
            Class::Zero => (true, false, false),
            Class::Denormal => (true, true, false),
        }
    };
    let s = &mut m.cpu.fpu.fsw;
    *s &= !(sw::C3 | sw::C2 | sw::C1 | sw::C0);
    *s |= (if c3 { sw::C3 } else { 0 })
        | (if c2 { sw::C2 } else { 0 })
        | (if sign80(v) { sw::C1 } else { 0 })
        | (if c0 { sw::C0 } else { 0 });
    record(m, x);
    Ok(())
}

/// FCMOVcc ST0, ST(i).
fn fcmov<const CC: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let f = m.cpu.flags;
    let t = match CC {
        0 => f & fl::CF != 0,
        1 => f & fl::ZF != 0,
        2 => f & (fl::CF | fl::ZF) != 0,
        _ => f & fl::PF != 0,
    };
    let neg = matches!(
        x.i.mnemonic(),
        Mnemonic::Fcmovnb | Mnemonic::Fcmovne | Mnemonic::Fcmovnbe | Mnemonic::Fcmovnu
    );
    let i = (x.i.op1_register() as usize) - (Register::ST0 as usize);
    let mut ex = Ex::default();
    let v = m.fpu_read(&mut ex, i);
    m.fpu_read(&mut ex, 0);
    if m.fpu_finish(&ex) && t != neg {
        m.fpu_set_st(0, v);
    }
    Ok(())
}

/// FPREM (`ONE`: FPREM1): partial remainder, quotient bits in C0 C3 C1, C2 while incomplete.
fn fprem<const ONE: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let mut ex = Ex::default();
    let a = m.fpu_read(&mut ex, 0);
    let b = m.fpu_read(&mut ex, 1);
    let mut c = (false, false, false, false); // C0 C1 C2 C3
    let r = if ex.flags & sw::SF != 0 {
        INDEF
    } else if let Some(n) = nan_result(&mut ex, a, b) {
        n
    } else if class(a) == Class::Inf || class(b) == Class::Zero {
        ex.flags |= sw::IE;
        INDEF
    } else if class(b) == Class::Inf || class(a) == Class::Zero {
        a
    } else {
        let (xa, xb) = (X::from_bits(a), X::from_bits(b));
        let ea = ((a >> 64) & 0x7fff) as i32;
        let eb = ((b >> 64) & 0x7fff) as i32;
        if ea - eb >= 64 {
            // Partial: reduce by b scaled to within 32..63 bits of a's exponent.
            let scaled = xb.scalbn(ea - eb - 32);
            c.2 = true;
            xa.c_fmod(scaled).value.to_bits()
        } else {
            let r = if ONE { xa.ieee_rem(xb) } else { xa.c_fmod(xb) };
            let rv = r.value;
            // The quotient's low bits from the significands: a/b = (ma / mb) * 2^(ea-eb).
            let (ma, mb) = (u128::from(a as u64), u128::from(b as u64));
            let d = ea.max(1) - eb.max(1);
            let qi = if d < -1 {
                0
            } else {
                let (num, den) = (ma << (d + 1), mb << 1);
                let (q, rem) = (num / den, num % den);
                let up = ONE && (2 * rem > den || (2 * rem == den && q & 1 == 1));
                (q + u128::from(up)) as u64
            };
            c.0 = qi & 4 != 0;
            c.3 = qi & 2 != 0;
            c.1 = qi & 1 != 0;
            rv.to_bits()
        }
    };
    if m.fpu_finish(&ex) {
        m.fpu_set_st(0, r);
        let s = &mut m.cpu.fpu.fsw;
        *s &= !(sw::C0 | sw::C1 | sw::C2 | sw::C3);
        *s |= (if c.0 { sw::C0 } else { 0 })
            | (if c.1 { sw::C1 } else { 0 })
            | (if c.2 { sw::C2 } else { 0 })
            | (if c.3 { sw::C3 } else { 0 });
    }
    record(m, x);
    Ok(())
}

/// FSCALE, FXTRACT, FPATAN, FYL2X, FYL2XP1, FPTAN, FSINCOS: operations on ST0 and ST1.
fn fpair<const K: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let mut ex = Ex::default();
    let a = m.fpu_read(&mut ex, 0);
    let b = if K <= 4 { m.fpu_read(&mut ex, 1) } else { 0 };
    if ex.flags & sw::SF != 0 {
        m.fpu_finish(&ex);
        return Ok(());
    }
    if K == 1 {
        // FXTRACT: ST0 = exponent, then push the significand (with the sign).
        let (exp, sig) = match class(a) {
            Class::Zero => {
                ex.flags |= sw::ZE;
                (0xffff_8000_0000_0000_0000u128, a) // -infinity, the zero
            }
            Class::Inf => (0x7fff_8000_0000_0000_0000u128, a),
            Class::QNan | Class::SNan | Class::Unsupported => {
                if class(a) != Class::QNan {
                    ex.flags |= sw::IE;
                }
                let n = if class(a) == Class::Unsupported {
                    INDEF
                } else {
                    quiet80(a)
                };
                (n, n)
            }
            c => {
                if c == Class::Denormal {
                    ex.flags |= sw::DE;
                }
                let mut e = 0;
                let sig = X::from_bits(a).frexp(&mut e).scalbn(1);
                (
                    X::from_i128(i128::from(e - 1)).value.to_bits(),
                    sig.to_bits(),
                )
            }
        };
        if m.fpu_finish(&ex) {
            m.fpu_set_st(0, exp);
            m.fpu_push(&mut ex, sig);
            m.fpu_finish(&ex);
        }
        return finish_c2(m, x, false);
    }
    if let Some(n) = nan_result(&mut ex, a, if K <= 4 { b } else { a }) {
        if m.fpu_finish(&ex) {
            m.fpu_set_st(0, n);
        }
        return Ok(());
    }
    match K {
        0 => {
            // FSCALE: ST0 * 2^trunc(ST1).
            let n = to_f64(b).trunc().clamp(-65536.0, 65536.0) as i32;
            let r = X::from_bits(a).scalbn(n).to_bits();
            if m.fpu_finish(&ex) {
                m.fpu_set_st(0, r);
            }
        }
        2..=4 => {
            // FPATAN: ST1 = atan2(ST1, ST0); FYL2X: ST1 * log2(ST0); FYL2XP1: ST1 * log2(ST0 + 1).
            let (fa, fb) = (to_f64(a), to_f64(b));
            let r = match K {
                2 => fb.atan2(fa),
                3 => fb * fa.log2(),
                _ => fb * fa.ln_1p() / std::f64::consts::LN_2,
            };
            ex.flags |= sw::PE;
            if m.fpu_finish(&ex) {
                m.fpu_set_st(1, from_f64(r));
                m.fpu_pop();
            }
        }
        _ => {
            // FPTAN (push 1.0) and FSINCOS (ST0 = sin, push cos).
            let f = to_f64(a);
            if f.abs() >= 9.223_372_036_854_775_808e18 {
                m.fpu_finish(&ex);
                return finish_c2(m, x, true);
            }
            let (lo, hi) = if K == 5 {
                (f.tan(), 1.0)
            } else {
                (f.sin(), f.cos())
            };
            ex.flags |= sw::PE;
            m.fpu_set_st(0, from_f64(lo));
            m.fpu_push(&mut ex, from_f64(hi));
            m.fpu_finish(&ex);
        }
    }
    finish_c2(m, x, false)
}

/// FFREE/FFREEP, FINCSTP, FDECSTP, FNOP.
fn fstack<const K: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, true)?;
    let f = &mut m.cpu.fpu;
    match K {
        0 | 1 => {
            let i = (x.i.op0_register() as usize) - (Register::ST0 as usize);
            let p = f.phys(i);
            f.tag &= !(1 << p);
            if K == 1 {
                let t = f.top();
                f.set_top(t + 1);
            }
        }
        2 => {
            let t = f.top();
            f.set_top(t + 1);
            f.fsw &= !sw::C1;
        }
        3 => {
            let t = f.top();
            f.set_top(t + 7);
            f.fsw &= !sw::C1;
        }
        _ => {}
    }
    Ok(())
}

/// The handler of an x87 arithmetic, data or compare instruction.
pub fn handler(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    let h: Handler = match i.mnemonic() {
        Fadd | Fiadd => farith::<ADD, false>,
        Faddp => farith::<ADD, true>,
        Fsub | Fisub => farith::<SUB, false>,
        Fsubp => farith::<SUB, true>,
        Fsubr | Fisubr => farith::<SUBR, false>,
        Fsubrp => farith::<SUBR, true>,
        Fmul | Fimul => farith::<MUL, false>,
        Fmulp => farith::<MUL, true>,
        Fdiv | Fidiv => farith::<DIV, false>,
        Fdivp => farith::<DIV, true>,
        Fdivr | Fidivr => farith::<DIVR, false>,
        Fdivrp => farith::<DIVR, true>,
        Fld | Fild => fld,
        Fld1 => fconst::<0>,
        Fldl2t => fconst::<1>,
        Fldl2e => fconst::<2>,
        Fldpi => fconst::<3>,
        Fldlg2 => fconst::<4>,
        Fldln2 => fconst::<5>,
        Fldz => fconst::<6>,
        Fst => fst::<false, 0>,
        Fstp => fst::<true, 0>,
        Fist => fst::<false, 1>,
        Fistp => fst::<true, 1>,
        Fisttp => fst::<true, 2>,
        Fxch => fxch,
        Fchs => funary::<0>,
        Fabs => funary::<1>,
        Fsqrt => funary::<2>,
        Frndint => funary::<3>,
        Fsin => funary::<4>,
        Fcos => funary::<5>,
        F2xm1 => funary::<6>,
        Fscale => fpair::<0>,
        Fxtract => fpair::<1>,
        Fpatan => fpair::<2>,
        Fyl2x => fpair::<3>,
        Fyl2xp1 => fpair::<4>,
        Fptan => fpair::<5>,
        Fsincos => fpair::<6>,
        Fcom | Ficom | Ftst => fcom::<false, 0, false>,
        Fcomp | Ficomp => fcom::<false, 1, false>,
        Fcompp => fcom::<false, 2, false>,
        Fucom => fcom::<true, 0, false>,
        Fucomp => fcom::<true, 1, false>,
        Fucompp => fcom::<true, 2, false>,
        Fcomi => fcom::<false, 0, true>,
        Fcomip => fcom::<false, 1, true>,
        Fucomi => fcom::<true, 0, true>,
        Fucomip => fcom::<true, 1, true>,
        Fxam => fxam,
        Fcmovb | Fcmovnb => fcmov::<0>,
        Fcmove | Fcmovne => fcmov::<1>,
        Fcmovbe | Fcmovnbe => fcmov::<2>,
        Fcmovu | Fcmovnu => fcmov::<3>,
        Fprem => fprem::<false>,
        Fprem1 => fprem::<true>,
        Ffree => fstack::<0>,
        Ffreep => fstack::<1>,
        Fincstp => fstack::<2>,
        Fdecstp => fstack::<3>,
        Fnop => fstack::<4>,
        _ => return None,
    };
    Some(h)
}
