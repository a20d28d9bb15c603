//! MUL, IMUL, DIV, IDIV. SF, ZF, AF and PF after multiplication are undefined; this
//! emulator sets SF, ZF and PF from the low half of the result and clears AF.

use iced_x86::Mnemonic;

use super::alu::szp;
use super::{Handler, mask};
use crate::block::Insn;
use crate::cpu::fl;
use crate::machine::{DE, Fault, Machine, R};

fn de() -> Fault {
    Fault::Exc(DE, None)
}

/// Sign-extend the low `size` bytes of `v`.
#[inline]
pub fn sext(v: u64, size: u64) -> i64 {
    let sh = 64 - size * 8;
    ((v << sh) as i64) >> sh
}

/// The implicit accumulator pair: (low, high) register values for `size`.
fn acc(m: &Machine, size: u64) -> (u64, u64) {
    match size {
        1 => (m.cpu.gpr[0] & 0xff, (m.cpu.gpr[0] >> 8) & 0xff),
        _ => (m.cpu.gpr[0] & mask(size), m.cpu.gpr[2] & mask(size)),
    }
}

fn set_acc(m: &mut Machine, size: u64, lo: u64, hi: u64) {
    if size == 1 {
        m.set_gpr(0, 2, (lo & 0xff) | ((hi & 0xff) << 8));
    } else {
        m.set_gpr(0, size, lo);
        m.set_gpr(2, size, hi);
    }
}

fn mul_flags(m: &mut Machine, lo: u64, overflow: bool, size: u64) {
    let o = if overflow { fl::CF | fl::OF } else { 0 };
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | o | szp(lo, size);
}

fn mul(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let src = m.rd(x, 0, size)? & mask(size);
    let (a, _) = acc(m, size);
    let p = u128::from(a) * u128::from(src);
    let bits = size * 8;
    let lo = (p as u64) & mask(size);
    let hi = ((p >> bits) as u64) & mask(size);
    set_acc(m, size, lo, hi);
    mul_flags(m, lo, hi != 0, size);
    Ok(())
}

fn imul(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let bits = size * 8;
    match x.i.op_count() {
        1 => {
            let src = sext(m.rd(x, 0, size)?, size);
            let (a, _) = acc(m, size);
            let p = i128::from(sext(a, size)) * i128::from(src);
            let lo = (p as u64) & mask(size);
            let hi = ((p >> bits) as u64) & mask(size);
            set_acc(m, size, lo, hi);
            let fits = i128::from(sext(lo, size)) == p;
            mul_flags(m, lo, !fits, size);
        }
        n => {
            let (a, b) = if n == 2 {
                (m.reg(x.i.op0_register()), m.rd(x, 1, size)?)
            } else {
                (m.rd(x, 1, size)?, m.rd(x, 2, size)?)
            };
            let p = i128::from(sext(a, size)) * i128::from(sext(b, size));
            let lo = (p as u64) & mask(size);
            let fits = i128::from(sext(lo, size)) == p;
            m.set_reg(x.i.op0_register(), lo);
            mul_flags(m, lo, !fits, size);
        }
    }
    Ok(())
}

fn div(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let bits = size * 8;
    let d = m.rd(x, 0, size)? & mask(size);
    if d == 0 {
        return Err(de());
    }
    let (lo, hi) = if size == 1 {
        (m.cpu.gpr[0] & 0xffff, 0)
    } else {
        acc(m, size)
    };
    let n = if size == 1 {
        u128::from(lo)
    } else {
        (u128::from(hi) << bits) | u128::from(lo)
    };
    let q = n / u128::from(d);
    let r = n % u128::from(d);
    if q > u128::from(mask(size)) {
        return Err(de());
    }
    set_acc(m, size, q as u64, r as u64);
    Ok(())
}

fn idiv(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let bits = size * 8;
    let d = sext(m.rd(x, 0, size)?, size);
    if d == 0 {
        return Err(de());
    }
    let n: i128 = if size == 1 {
        i128::from(sext(m.cpu.gpr[0] & 0xffff, 2))
    } else {
        let (lo, hi) = acc(m, size);
        let wide = (u128::from(hi) << bits) | u128::from(lo);
        let sh = 128 - 2 * bits;
        ((wide << sh) as i128) >> sh
    };
    let d = i128::from(d);
    // i128 cannot overflow here: |n| < 2^127.
    let q = n / d;
    let r = n % d;
    let max = (1i128 << (bits - 1)) - 1;
    let min = -(1i128 << (bits - 1));
    if q > max || q < min {
        return Err(de());
    }
    set_acc(m, size, (q as u64) & mask(size), (r as u64) & mask(size));
    Ok(())
}

pub fn handler(mn: Mnemonic) -> Option<Handler> {
    Some(match mn {
        Mnemonic::Mul => mul,
        Mnemonic::Imul => imul,
        Mnemonic::Div => div,
        Mnemonic::Idiv => idiv,
        _ => return None,
    })
}
