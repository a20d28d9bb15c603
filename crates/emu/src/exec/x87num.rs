//! x87 numeric helpers: conversions between the 80-bit format and single/double, precision
//! control, and FSQRT.

use rustc_apfloat::ieee::{Double, Single, X87DoubleExtended as X};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

use super::x87::{Class, Ex, INDEF, class, round_of, sign80};
use crate::fpu::sw;

/// Single/double to extended: exact; SNaNs are quieted with IE, denormals raise DE.
pub(super) fn widen(ex: &mut Ex, p: super::ssefp::P, v: u64) -> u128 {
    if p.is_nan(v) {
        if p.is_snan(v) {
            ex.flags |= sw::IE;
        }
        let sign = u128::from(v >> (p.bits - 1) & 1) << 79;
        let frac = u128::from(v & ((1 << p.man) - 1)) << (63 - p.man);
        return sign | (0x7fffu128 << 64) | (1 << 63) | (1 << 62) | frac;
    }
    if p.is_denormal(v) {
        ex.flags |= sw::DE;
    }
    let mut lost = false;
    if p.bits == 32 {
        Single::from_bits(u128::from(v))
            .convert_r(Round::NearestTiesToEven, &mut lost)
            .map(|f: X| f.to_bits())
            .value
    } else {
        Double::from_bits(u128::from(v))
            .convert_r(Round::NearestTiesToEven, &mut lost)
            .map(|f: X| f.to_bits())
            .value
    }
}

/// Extended to single/double with FCW's rounding.
pub(super) fn narrow(ex: &mut Ex, fcw: u16, p: super::ssefp::P, v: u128) -> u64 {
    match class(v) {
        Class::Unsupported => {
            ex.flags |= sw::IE;
            return p.indefinite();
        }
        Class::QNan | Class::SNan => {
            if class(v) == Class::SNan {
                ex.flags |= sw::IE;
            }
            let sign = u64::from(sign80(v)) << (p.bits - 1);
            let frac = ((v as u64) << 1 >> 1) >> (63 - p.man);
            let e = ((1u64 << (p.bits - 1 - p.man)) - 1) << p.man;
            return p.quiet(sign | e | frac);
        }
        Class::Denormal => ex.flags |= sw::DE,
        _ => {}
    }
    let mut lost = false;
    let r: StatusAnd<u64> = if p.bits == 32 {
        X::from_bits(v)
            .convert_r(round_of(fcw), &mut lost)
            .map(|f: Single| f.to_bits() as u64)
    } else {
        X::from_bits(v)
            .convert_r(round_of(fcw), &mut lost)
            .map(|f: Double| f.to_bits() as u64)
    };
    let mut r = r;
    // Rounding toward zero turns an overflow into the largest finite value without
    // reporting it: overflow is when the source reaches 2^(emax+1).
    let emax1 = if p.bits == 32 { 128 } else { 1024 };
    if super::ssefp::at_largest(p, &r) && ((v >> 64) & 0x7fff) as i32 >= 16383 + emax1 {
        r.status |= Status::OVERFLOW;
    }
    ex.status(r.status);
    if r.status.contains(Status::INEXACT) {
        let z: StatusAnd<u64> = if p.bits == 32 {
            X::from_bits(v)
                .convert_r(Round::TowardZero, &mut lost)
                .map(|f: Single| f.to_bits() as u64)
        } else {
            X::from_bits(v)
                .convert_r(Round::TowardZero, &mut lost)
                .map(|f: Double| f.to_bits() as u64)
        };
        ex.c1 = z.value != r.value;
    }
    r.value
}

/// Round a result's significand to FCW's precision control (24 or 53 bits).
pub(super) fn precision(fcw: u16, ex: &mut Ex, v: u128) -> u128 {
    let bits = match (fcw >> 8) & 3 {
        0 => 24,
        2 => 53,
        _ => return v,
    };
    if class(v) != Class::Normal {
        return v;
    }
    let drop = 64 - bits;
    let mant = v as u64;
    let rest = mant & ((1u64 << drop) - 1);
    if rest == 0 {
        return v;
    }
    ex.flags |= sw::PE;
    let neg = sign80(v);
    let half = 1u64 << (drop - 1);
    let kept = mant >> drop;
    let up = match round_of(fcw) {
        Round::NearestTiesToEven => rest > half || (rest == half && kept & 1 == 1),
        Round::TowardPositive => !neg,
        Round::TowardNegative => neg,
        _ => false,
    };
    let mut exp = (v >> 64) & 0x7fff;
    let mut k = u128::from(kept) + u128::from(up);
    if k >> bits != 0 {
        k >>= 1;
        exp += 1;
    }
    let sign = v & (1 << 79);
    sign | (exp << 64) | ((k << drop) & u128::from(u64::MAX))
}

pub(super) fn to_f64(v: u128) -> f64 {
    let mut lost = false;
    let d: StatusAnd<Double> = X::from_bits(v).convert_r(Round::NearestTiesToEven, &mut lost);
    f64::from_bits(d.value.to_bits() as u64)
}

pub(super) fn from_f64(f: f64) -> u128 {
    let mut lost = false;
    let x: StatusAnd<X> =
        Double::from_bits(u128::from(f.to_bits())).convert_r(Round::NearestTiesToEven, &mut lost);
    x.value.to_bits()
}

pub(super) fn fsqrt(ex: &mut Ex, fcw: u16, v: u128) -> u128 {
    match class(v) {
        Class::Zero => return v,
        Class::Inf if !sign80(v) => return v,
        Class::Denormal => ex.flags |= sw::DE,
        _ => {}
    }
    if sign80(v) {
        ex.flags |= sw::IE;
        return INDEF;
    }
    // Scale into f64 range by an even power of two, estimate, then Newton in extended.
    let xv = X::from_bits(v);
    let mut e = 0;
    let norm = xv.frexp(&mut e); // xv = norm * 2^e, norm in [0.5, 1)
    let (norm, e) = if e % 2 != 0 {
        (norm.scalbn(1), e - 1)
    } else {
        (norm, e)
    };
    let mut y = X::from_bits(from_f64(to_f64(norm.to_bits()).sqrt()));
    let rc = round_of(fcw);
    let two = X::from_bits(0x4000_8000_0000_0000_0000);
    for _ in 0..2 {
        let q = norm.div_r(y, Round::NearestTiesToEven).value;
        y = y
            .add_r(q, Round::NearestTiesToEven)
            .value
            .div_r(two, Round::NearestTiesToEven)
            .value;
    }
    let r = y.scalbn(e / 2);
    let back = r.mul_r(r, rc).value;
    if back.partial_cmp(&xv) != Some(std::cmp::Ordering::Equal) {
        ex.flags |= sw::PE;
    }
    precision(fcw, ex, r.to_bits())
}
