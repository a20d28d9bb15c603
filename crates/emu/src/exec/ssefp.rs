//! SSE/SSE2 floating point: arithmetic, MIN/MAX, SQRT, compares, COMISS/UCOMISS and the
//! conversions, with MXCSR's rounding control, DAZ/FTZ, flags and #XM for unmasked
//! exceptions (the destination is then left unchanged). Arithmetic is exact IEEE-754 through
//! `rustc_apfloat`; NaN propagation follows the SDM (the first NaN operand, quieted; the
//! negative "QNaN indefinite" for invalid operations).
//!
//! RCPPS/RCPSS/RSQRTPS/RSQRTSS return the correctly rounded reciprocal (square root), which is
//! within the architectural error bound (1.5 * 2^-12) but not the bits of Intel's tables.

use iced_x86::{Instruction, Mnemonic, OpKind};
use palacios_x86::cr4;
use rustc_apfloat::ieee::{Double, Quad, Single};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

use super::Handler;
use super::sse::{mmx_ok, read_mem, rv, set_rv, src, sse_ok};
use crate::block::Insn;
use crate::cpu::fl;
use crate::fpu::mx;
use crate::machine::{Fault, Machine, R, XM, ud};

/// A binary32 or binary64 format, described by its bit layout.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct P {
    pub bits: u32,
    pub man: u32,
}
pub const S: P = P { bits: 32, man: 23 };
pub const D: P = P { bits: 64, man: 52 };

impl P {
    #[inline]
    pub fn mask(self) -> u64 {
        if self.bits == 64 {
            u64::MAX
        } else {
            (1 << self.bits) - 1
        }
    }
    fn sign(self, v: u64) -> u64 {
        v & (1 << (self.bits - 1))
    }
    fn exp(self, v: u64) -> u64 {
        (v >> self.man) & ((1 << (self.bits - 1 - self.man)) - 1)
    }
    fn exp_max(self) -> u64 {
        (1 << (self.bits - 1 - self.man)) - 1
    }
    fn frac(self, v: u64) -> u64 {
        v & ((1 << self.man) - 1)
    }
    pub fn is_nan(self, v: u64) -> bool {
        self.exp(v) == self.exp_max() && self.frac(v) != 0
    }
    pub fn is_snan(self, v: u64) -> bool {
        self.is_nan(v) && v & (1 << (self.man - 1)) == 0
    }
    pub fn quiet(self, v: u64) -> u64 {
        v | (1 << (self.man - 1))
    }
    pub fn is_denormal(self, v: u64) -> bool {
        self.exp(v) == 0 && self.frac(v) != 0
    }
    fn is_zero(self, v: u64) -> bool {
        v & (self.mask() >> 1) == 0
    }
    /// The "QNaN floating-point indefinite".
    pub fn indefinite(self) -> u64 {
        self.mask() & !((1 << (self.man - 1)) - 1)
    }
}

/// The exception flags of an IEEE status: IE, ZE, OE, UE, PE at the bit positions that
/// MXCSR and the x87 status word share (0, 2, 3, 4, 5).
pub fn exception_bits(s: Status) -> u16 {
    [
        (Status::INVALID_OP, 1 << 0),
        (Status::DIV_BY_ZERO, 1 << 2),
        (Status::OVERFLOW, 1 << 3),
        (Status::UNDERFLOW, 1 << 4),
        (Status::INEXACT, 1 << 5),
    ]
    .iter()
    .filter(|(f, _)| s.contains(*f))
    .fold(0, |a, (_, b)| a | b)
}

/// One instruction's MXCSR context: rounding, DAZ/FTZ, and the flags raised so far.
pub struct Env {
    pub rc: Round,
    daz: bool,
    ftz: bool,
    pub flags: u32,
}

pub fn round_of(rc: u32) -> Round {
    match rc & 3 {
        0 => Round::NearestTiesToEven,
        1 => Round::TowardNegative,
        2 => Round::TowardPositive,
        _ => Round::TowardZero,
    }
}

impl Env {
    pub fn new(mxcsr: u32) -> Env {
        Env {
            rc: round_of(mxcsr >> mx::RC_SHIFT),
            daz: mxcsr & mx::DAZ != 0,
            ftz: mxcsr & mx::FTZ != 0,
            flags: 0,
        }
    }

    /// An input operand: denormals become zero under DAZ, or raise DE.
    fn input(&mut self, p: P, v: u64) -> u64 {
        if p.is_denormal(v) {
            if self.daz {
                return p.sign(v);
            }
            self.flags |= mx::DE;
        }
        v
    }

    fn status(&mut self, s: Status) {
        self.flags |= u32::from(exception_bits(s));
    }

    /// A computed result: invalid gives the indefinite NaN; FTZ flushes tiny results when
    /// underflow is masked (`mxcsr`).
    fn output(&mut self, p: P, r: StatusAnd<u64>, mxcsr: u32) -> u64 {
        self.status(r.status);
        if r.status.contains(Status::INVALID_OP) {
            return p.indefinite();
        }
        if self.ftz
            && mxcsr & (mx::UE << mx::MASK_SHIFT) != 0
            && (p.is_denormal(r.value) || r.status.contains(Status::UNDERFLOW))
        {
            self.flags |= mx::UE | mx::PE;
            return p.sign(r.value);
        }
        r.value
    }
}

fn ap<F: Float>(op: u8, a: u64, b: u64, rc: Round) -> StatusAnd<u64> {
    let (x, y) = (F::from_bits(u128::from(a)), F::from_bits(u128::from(b)));
    let r = match op {
        ADD => x.add_r(y, rc),
        SUB => x.sub_r(y, rc),
        MUL => x.mul_r(y, rc),
        _ => x.div_r(y, rc),
    };
    r.map(|v| v.to_bits() as u64)
}

pub const ADD: u8 = 0;
pub const SUB: u8 = 1;
pub const MUL: u8 = 2;
pub const DIV: u8 = 3;
pub const MIN: u8 = 4;
pub const MAX: u8 = 5;
pub const SQRT: u8 = 6;
pub const RCP: u8 = 7;
pub const RSQRT: u8 = 8;

/// Correctly rounded square root in rounding mode `rc` (host sqrt, corrected by the sign of
/// the exact residual).
fn sqrt(p: P, v: u64, rc: Round) -> StatusAnd<u64> {
    if p == D {
        if (v >> 52) & 0x7ff == 0 {
            // A denormal: scale by 2^108 so the residual below stays representable, then
            // scale the (normal) root back by 2^-54, which is exact.
            let scaled = sqrt(p, (f64::from_bits(v) * 2f64.powi(108)).to_bits(), rc);
            return StatusAnd {
                status: scaled.status,
                value: (f64::from_bits(scaled.value) * 2f64.powi(-54)).to_bits(),
            };
        }
        let x = f64::from_bits(v);
        let mut r = x.sqrt();
        let res = (-r).mul_add(r, x); // x - r*r, exact sign
        let status = if res == 0.0 {
            Status::OK
        } else {
            Status::INEXACT
        };
        match rc {
            Round::TowardNegative | Round::TowardZero if res < 0.0 => r = r.next_down(),
            Round::TowardPositive if res > 0.0 => r = r.next_up(),
            _ => {}
        }
        StatusAnd {
            status,
            value: r.to_bits(),
        }
    } else {
        let x = f32::from_bits(v as u32);
        let mut r = (f64::from(x)).sqrt() as f32;
        let sq = f64::from(r) * f64::from(r); // exact: 48 significant bits
        let xd = f64::from(x);
        let status = if sq == xd {
            Status::OK
        } else {
            Status::INEXACT
        };
        match rc {
            Round::TowardNegative | Round::TowardZero if sq > xd => r = r.next_down(),
            Round::TowardPositive if sq < xd => r = r.next_up(),
            _ => {}
        }
        StatusAnd {
            status,
            value: u64::from(r.to_bits()),
        }
    }
}

/// One element of an arithmetic instruction: `a` is the destination's element, `b` the
/// source's.
pub fn arith(env: &mut Env, p: P, op: u8, a: u64, b: u64, mxcsr: u32) -> u64 {
    let (a0, b0) = (a, b);
    match op {
        SQRT => {
            if p.is_nan(b) {
                if p.is_snan(b) {
                    env.flags |= mx::IE;
                }
                return p.quiet(b);
            }
            // Invalid (a negative operand) takes priority over the denormal flag.
            if p.sign(b) != 0 && !p.is_zero(b) && !(env.daz && p.is_denormal(b)) {
                env.flags |= mx::IE;
                return p.indefinite();
            }
            let b = env.input(p, b);
            if p.is_zero(b) || p.exp(b) == p.exp_max() {
                return b; // ±0 and +infinity are their own exact roots
            }
            let r = sqrt(p, b, env.rc);
            return env.output(p, r, mxcsr);
        }
        RCP | RSQRT => {
            // No exceptions; denormal inputs count as zero.
            if p.is_nan(b) {
                return p.quiet(b);
            }
            let b = if p.is_denormal(b) { p.sign(b) } else { b };
            let x = f64::from(f32::from_bits(b as u32));
            let r = if op == RCP {
                1.0 / x
            } else if x < 0.0 {
                return p.indefinite();
            } else {
                1.0 / x.sqrt()
            };
            return u64::from((r as f32).to_bits());
        }
        MIN | MAX => {
            if p.is_nan(a) || p.is_nan(b) {
                env.flags |= mx::IE;
                // The source, flushed to zero under DAZ.
                return if env.daz && p.is_denormal(b0) {
                    p.sign(b0)
                } else {
                    b0
                };
            }
            let (x, y) = (env.input(p, a), env.input(p, b));
            if p.is_zero(x) && p.is_zero(y) {
                // The source (flushed to zero under DAZ).
                return y;
            }
            let (fx, fy) = if p == D {
                (f64::from_bits(x), f64::from_bits(y))
            } else {
                (
                    f64::from(f32::from_bits(x as u32)),
                    f64::from(f32::from_bits(y as u32)),
                )
            };
            let take_a = if op == MIN { fx < fy } else { fx > fy };
            // DAZ: a flushed input is returned as zero.
            return if take_a { x } else { y };
        }
        _ => {}
    }
    if p.is_nan(a) || p.is_nan(b) {
        if p.is_snan(a) || p.is_snan(b) {
            env.flags |= mx::IE;
        }
        return if p.is_nan(a) {
            p.quiet(a0)
        } else {
            p.quiet(b0)
        };
    }
    // Divide-by-zero takes priority over the denormal flag (SDM vol. 1, 11.5.2).
    let zero_divide = op == DIV
        && (p.is_zero(b) || (env.daz && p.is_denormal(b)))
        && !p.is_zero(a)
        && !(env.daz && p.is_denormal(a))
        && p.exp(a) != p.exp_max();
    let before = env.flags;
    let (x, y) = (env.input(p, a), env.input(p, b));
    if zero_divide {
        env.flags = before | (env.flags & !mx::DE);
    }
    let mut r = if p == D {
        ap::<Double>(op, x, y, env.rc)
    } else {
        ap::<Single>(op, x, y, env.rc)
    };
    if at_largest(p, &r) {
        // Rounding toward zero turned an overflow into the largest finite value without
        // reporting it: overflow is when the exact result reaches 2^(emax+1). Single
        // operations are exact enough in double precision, double ones in quad precision.
        let wide = if p == D {
            quad_abs_ge_pow2(op, x, y, 1024)
        } else {
            let f = |v: u64| f64::from(f32::from_bits(v as u32));
            let w = match op {
                ADD => f(x) + f(y),
                SUB => f(x) - f(y),
                MUL => f(x) * f(y),
                _ => f(x) / f(y),
            };
            w.abs() >= 2f64.powi(128)
        };
        if wide {
            r.status |= Status::OVERFLOW;
        }
    }
    env.output(p, r, mxcsr)
}

/// Whether `r` is ±(largest finite) from an inexact operation (a possible hidden overflow).
pub fn at_largest(p: P, r: &StatusAnd<u64>) -> bool {
    let largest = ((p.exp_max() - 1) << p.man) | ((1 << p.man) - 1);
    r.status.contains(Status::INEXACT)
        && !r.status.contains(Status::OVERFLOW)
        && r.value & (p.mask() >> 1) == largest
}

/// |x OP y| >= 2^k for doubles x, y, computed in IEEE quad precision.
fn quad_abs_ge_pow2(op: u8, x: u64, y: u64, k: i32) -> bool {
    let mut lost = false;
    let mut q = |v: u64| -> Quad {
        Double::from_bits(u128::from(v))
            .convert_r(Round::NearestTiesToEven, &mut lost)
            .value
    };
    let (a, b) = (q(x), q(y));
    let rc = Round::NearestTiesToEven;
    let r = match op {
        ADD => a.add_r(b, rc),
        SUB => a.sub_r(b, rc),
        MUL => a.mul_r(b, rc),
        _ => a.div_r(b, rc),
    }
    .value
    .abs();
    let pow = Quad::from_bits(((16383 + k) as u128) << 112);
    r >= pow
}

/// Apply the flags of an instruction: unmasked ones raise #XM (or #UD without
/// CR4.OSXMMEXCPT) and the caller must not write its result.
pub fn commit(m: &mut Machine, env: &Env) -> R<()> {
    let unmasked = env.flags & !(m.cpu.fpu.mxcsr >> mx::MASK_SHIFT) & 0x3f;
    m.cpu.fpu.mxcsr |= env.flags;
    if unmasked != 0 {
        return Err(if m.cpu.cr4 & cr4::OSXMMEXCPT != 0 {
            Fault::Exc(XM, None)
        } else {
            ud()
        });
    }
    Ok(())
}

#[inline]
fn elem(v: u128, k: u32, p: P) -> u64 {
    (v >> (k * p.bits)) as u64 & p.mask()
}

#[inline]
fn put(v: u128, k: u32, p: P, e: u64) -> u128 {
    let sh = k * p.bits;
    (v & !(u128::from(p.mask()) << sh)) | (u128::from(e & p.mask()) << sh)
}

/// ADD/SUB/MUL/DIV/MIN/MAX/SQRT/RCP/RSQRT in PS/SS/PD/SD forms.
fn farith<const OP: u8, const DBL: bool, const PACKED: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    sse_ok(m)?;
    let p = if DBL { D } else { S };
    let b = src(m, x, 1, true)?;
    let d = x.i.op0_register();
    let a = rv(m, d);
    let mxcsr = m.cpu.fpu.mxcsr;
    let mut env = Env::new(mxcsr);
    let n = if PACKED { 128 / p.bits } else { 1 };
    let mut r = a;
    for k in 0..n {
        let e = arith(&mut env, p, OP, elem(a, k, p), elem(b, k, p), mxcsr);
        r = put(r, k, p, e);
    }
    commit(m, &env)?;
    set_rv(m, d, r);
    Ok(())
}

/// Compare two elements: (unordered, less, equal) after DAZ, raising IE for SNaNs, or for any
/// NaN when `signaling`.
fn compare(env: &mut Env, p: P, a: u64, b: u64, signaling: bool) -> (bool, bool, bool) {
    if p.is_nan(a) || p.is_nan(b) {
        if signaling || p.is_snan(a) || p.is_snan(b) {
            env.flags |= mx::IE;
        }
        return (true, false, false);
    }
    let (x, y) = (env.input(p, a), env.input(p, b));
    let (fx, fy) = if p == D {
        (f64::from_bits(x), f64::from_bits(y))
    } else {
        (
            f64::from(f32::from_bits(x as u32)),
            f64::from(f32::from_bits(y as u32)),
        )
    };
    (false, fx < fy, fx == fy)
}

/// CMPPS/CMPSS/CMPPD/CMPSD with predicates 0-7.
fn fcmp<const DBL: bool, const PACKED: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    sse_ok(m)?;
    let p = if DBL { D } else { S };
    let b = src(m, x, 1, true)?;
    let d = x.i.op0_register();
    let a = rv(m, d);
    let pred = x.i.immediate(2) & 7;
    let mut env = Env::new(m.cpu.fpu.mxcsr);
    let n = if PACKED { 128 / p.bits } else { 1 };
    let mut r = a;
    for k in 0..n {
        let signaling = matches!(pred, 1 | 2 | 5 | 6);
        let (un, lt, eq) = compare(&mut env, p, elem(a, k, p), elem(b, k, p), signaling);
        let t = match pred {
            0 => eq,
            1 => lt,
            2 => lt || eq,
            3 => un,
            4 => !eq,
            5 => !lt,
            6 => !(lt || eq),
            _ => !un,
        };
        r = put(r, k, p, if t { u64::MAX } else { 0 });
    }
    commit(m, &env)?;
    set_rv(m, d, r);
    Ok(())
}

/// COMISS/COMISD (`SIG`: any NaN is invalid) and UCOMISS/UCOMISD: ZF, PF, CF.
fn comis<const DBL: bool, const SIG: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    sse_ok(m)?;
    let p = if DBL { D } else { S };
    let b = src(m, x, 1, false)?;
    let a = rv(m, x.i.op0_register());
    let mut env = Env::new(m.cpu.fpu.mxcsr);
    let (un, lt, eq) = compare(&mut env, p, elem(a, 0, p), elem(b, 0, p), SIG);
    commit(m, &env)?;
    let f = if un {
        fl::ZF | fl::PF | fl::CF
    } else if lt {
        fl::CF
    } else if eq {
        fl::ZF
    } else {
        0
    };
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | f;
    Ok(())
}

// ---- conversions ----------------------------------------------------------------------------

/// Float to a signed integer of `width` bits (rounding `rc`): NaN and out-of-range values
/// give the "integer indefinite" and IE.
fn to_int(env: &mut Env, p: P, v: u64, width: usize, rc: Round) -> u64 {
    let v = if p.is_denormal(v) && env.daz {
        p.sign(v)
    } else {
        v
    };
    let mut exact = true;
    let r = if p == D {
        Double::from_bits(u128::from(v)).to_i128_r(width, rc, &mut exact)
    } else {
        Single::from_bits(u128::from(v)).to_i128_r(width, rc, &mut exact)
    };
    let indefinite = 1u64 << (width - 1);
    if r.status.contains(Status::INVALID_OP) {
        env.flags |= mx::IE;
        return indefinite;
    }
    if r.status.contains(Status::INEXACT) {
        env.flags |= mx::PE;
    }
    r.value as u64 & if width == 64 { u64::MAX } else { 0xffff_ffff }
}

/// A signed integer of `width` bits to a float.
fn from_int(env: &mut Env, p: P, v: u64, width: u32) -> u64 {
    let i = i128::from(((v << (64 - width)) as i64) >> (64 - width));
    let r = if p == D {
        Double::from_i128_r(i, env.rc).map(|f| f.to_bits() as u64)
    } else {
        Single::from_i128_r(i, env.rc).map(|f| f.to_bits() as u64)
    };
    env.status(r.status);
    r.value
}

/// Between precisions: NaNs keep their sign and top payload bits and become quiet.
fn convert(env: &mut Env, from: P, to: P, v: u64, mxcsr: u32) -> u64 {
    if from.is_nan(v) {
        if from.is_snan(v) {
            env.flags |= mx::IE;
        }
        let sign = from.sign(v) >> (from.bits - 1) << (to.bits - 1);
        let frac = if to.man > from.man {
            from.frac(v) << (to.man - from.man)
        } else {
            from.frac(v) >> (from.man - to.man)
        };
        return to.quiet(sign | (to.exp_max() << to.man) | frac);
    }
    let v = env.input(from, v);
    let mut lost = false;
    let mut r = if from == S {
        Single::from_bits(u128::from(v))
            .convert_r(env.rc, &mut lost)
            .map(|f: Double| f.to_bits() as u64)
    } else {
        Double::from_bits(u128::from(v))
            .convert_r(env.rc, &mut lost)
            .map(|f: Single| f.to_bits() as u64)
    };
    // Narrowing toward zero: overflow when the (exact) source reaches 2^128.
    if to == S && at_largest(S, &r) && f64::from_bits(v).abs() >= 2f64.powi(128) {
        r.status |= Status::OVERFLOW;
    }
    env.output(to, r, mxcsr)
}

/// Which conversion a handler does.
mod cv {
    pub const SI2SS: u8 = 0;
    pub const SI2SD: u8 = 1;
    pub const SS2SI: u8 = 2;
    pub const SD2SI: u8 = 3;
    pub const TSS2SI: u8 = 4;
    pub const TSD2SI: u8 = 5;
    pub const SS2SD: u8 = 6;
    pub const SD2SS: u8 = 7;
    pub const PS2PD: u8 = 8;
    pub const PD2PS: u8 = 9;
    pub const DQ2PS: u8 = 10;
    pub const PS2DQ: u8 = 11;
    pub const TPS2DQ: u8 = 12;
    pub const DQ2PD: u8 = 13;
    pub const PD2DQ: u8 = 14;
    pub const TPD2DQ: u8 = 15;
    pub const PI2PS: u8 = 16;
    pub const PS2PI: u8 = 17;
    pub const TPS2PI: u8 = 18;
    pub const PI2PD: u8 = 19;
    pub const PD2PI: u8 = 20;
    pub const TPD2PI: u8 = 21;
}

fn cvt<const C: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    use cv::*;
    sse_ok(m)?;
    if matches!(C, PI2PS | PS2PI | TPS2PI | PI2PD | PD2PI | TPD2PI) {
        // Only the forms with an MMX register operand switch the x87 unit to MMX.
        let mm = (0..2).any(|n| x.i.op_kind(n) == OpKind::Register && x.i.op_register(n).is_mm());
        if mm {
            mmx_ok(m)?;
        }
    }
    let mxcsr = m.cpu.fpu.mxcsr;
    let mut env = Env::new(mxcsr);
    let d = x.i.op0_register();
    let a = rv(m, d);
    // Source: its register width or memory size.
    let b = if x.i.op1_kind() == OpKind::Memory {
        let size = super::sse::msize(x);
        read_mem(m, x, size, true)?
    } else {
        rv(m, x.i.op1_register())
    };
    let trunc = Round::TowardZero;
    let rc = env.rc;
    let r: u128 = match C {
        SI2SS | SI2SD => {
            let width = if x.i.op1_kind() == OpKind::Memory {
                super::sse::msize(x) as u32 * 8
            } else {
                x.i.op1_register().size() as u32 * 8
            };
            let p = if C == SI2SS { S } else { D };
            put(a, 0, p, from_int(&mut env, p, b as u64, width))
        }
        SS2SI | SD2SI | TSS2SI | TSD2SI => {
            let p = if C == SS2SI || C == TSS2SI { S } else { D };
            let width = d.size() * 8;
            let round = if C >= TSS2SI { trunc } else { rc };
            u128::from(to_int(&mut env, p, elem(b, 0, p), width, round))
        }
        SS2SD => put(a, 0, D, convert(&mut env, S, D, elem(b, 0, S), mxcsr)),
        SD2SS => put(a, 0, S, convert(&mut env, D, S, elem(b, 0, D), mxcsr)),
        PS2PD | PI2PD | DQ2PD => {
            let mut r = 0;
            for k in 0..2 {
                let e = if C == PS2PD {
                    convert(&mut env, S, D, elem(b, k, S), mxcsr)
                } else {
                    from_int(&mut env, D, elem(b, k, S), 32)
                };
                r = put(r, k, D, e);
            }
            r
        }
        PD2PS => (0..2).fold(0, |r, k| {
            put(r, k, S, convert(&mut env, D, S, elem(b, k, D), mxcsr))
        }),
        DQ2PS => (0..4).fold(0, |r, k| {
            put(r, k, S, from_int(&mut env, S, elem(b, k, S), 32))
        }),
        PI2PS => {
            let lo = (0..2).fold(0, |r, k| {
                put(r, k, S, from_int(&mut env, S, elem(b, k, S), 32))
            });
            (a & !u128::from(u64::MAX)) | lo
        }
        PS2DQ | TPS2DQ => {
            let round = if C == TPS2DQ { trunc } else { rc };
            (0..4).fold(0, |r, k| {
                put(r, k, S, to_int(&mut env, S, elem(b, k, S), 32, round))
            })
        }
        PS2PI | TPS2PI => {
            let round = if C == TPS2PI { trunc } else { rc };
            (0..2).fold(0, |r, k| {
                put(r, k, S, to_int(&mut env, S, elem(b, k, S), 32, round))
            })
        }
        _ => {
            // PD2DQ, TPD2DQ, PD2PI, TPD2PI: two doubles to two dwords (upper half zero).
            let round = if C == TPD2DQ || C == TPD2PI {
                trunc
            } else {
                rc
            };
            (0..2).fold(0, |r, k| {
                put(r, k, S, to_int(&mut env, D, elem(b, k, D), 32, round))
            })
        }
    };
    commit(m, &env)?;
    if d.is_xmm() || d.is_mm() {
        set_rv(m, d, r);
    } else {
        let n = super::gpr_number(d).unwrap_or(0) as usize;
        m.set_gpr(n, d.size() as u64, r as u64);
    }
    Ok(())
}

/// The handler of an SSE/SSE2 floating-point instruction.
pub fn handler(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    use cv::*;
    let h: Handler = match i.mnemonic() {
        Addps => farith::<ADD, false, true>,
        Addss => farith::<ADD, false, false>,
        Addpd => farith::<ADD, true, true>,
        Addsd => farith::<ADD, true, false>,
        Subps => farith::<SUB, false, true>,
        Subss => farith::<SUB, false, false>,
        Subpd => farith::<SUB, true, true>,
        Subsd => farith::<SUB, true, false>,
        Mulps => farith::<MUL, false, true>,
        Mulss => farith::<MUL, false, false>,
        Mulpd => farith::<MUL, true, true>,
        Mulsd => farith::<MUL, true, false>,
        Divps => farith::<DIV, false, true>,
        Divss => farith::<DIV, false, false>,
        Divpd => farith::<DIV, true, true>,
        Divsd => farith::<DIV, true, false>,
        Minps => farith::<MIN, false, true>,
        Minss => farith::<MIN, false, false>,
        Minpd => farith::<MIN, true, true>,
        Minsd => farith::<MIN, true, false>,
        Maxps => farith::<MAX, false, true>,
        Maxss => farith::<MAX, false, false>,
        Maxpd => farith::<MAX, true, true>,
        Maxsd => farith::<MAX, true, false>,
        Sqrtps => farith::<SQRT, false, true>,
        Sqrtss => farith::<SQRT, false, false>,
        Sqrtpd => farith::<SQRT, true, true>,
        Sqrtsd => farith::<SQRT, true, false>,
        Rcpps => farith::<RCP, false, true>,
        Rcpss => farith::<RCP, false, false>,
        Rsqrtps => farith::<RSQRT, false, true>,
        Rsqrtss => farith::<RSQRT, false, false>,
        Cmpps => fcmp::<false, true>,
        Cmpss => fcmp::<false, false>,
        Cmppd => fcmp::<true, true>,
        Cmpsd if i.code() == iced_x86::Code::Cmpsd_xmm_xmmm64_imm8 => fcmp::<true, false>,
        Comiss => comis::<false, true>,
        Comisd => comis::<true, true>,
        Ucomiss => comis::<false, false>,
        Ucomisd => comis::<true, false>,
        Cvtsi2ss => cvt::<SI2SS>,
        Cvtsi2sd => cvt::<SI2SD>,
        Cvtss2si => cvt::<SS2SI>,
        Cvtsd2si => cvt::<SD2SI>,
        Cvttss2si => cvt::<TSS2SI>,
        Cvttsd2si => cvt::<TSD2SI>,
        Cvtss2sd => cvt::<SS2SD>,
        Cvtsd2ss => cvt::<SD2SS>,
        Cvtps2pd => cvt::<PS2PD>,
        Cvtpd2ps => cvt::<PD2PS>,
        Cvtdq2ps => cvt::<DQ2PS>,
        Cvtps2dq => cvt::<PS2DQ>,
        Cvttps2dq => cvt::<TPS2DQ>,
        Cvtdq2pd => cvt::<DQ2PD>,
        Cvtpd2dq => cvt::<PD2DQ>,
        Cvttpd2dq => cvt::<TPD2DQ>,
        Cvtpi2ps => cvt::<PI2PS>,
        Cvtps2pi => cvt::<PS2PI>,
        Cvttps2pi => cvt::<TPS2PI>,
        Cvtpi2pd => cvt::<PI2PD>,
        Cvtpd2pi => cvt::<PD2PI>,
        Cvttpd2pi => cvt::<TPD2PI>,
        _ => return None,
    };
    Some(h)
}
