//! Integer arithmetic and logic with exact flags.
//!
//! Undefined flags, chosen to match what Intel cores do where that is known and otherwise
//! documented here: shifts and rotates by more than one leave OF as for a count of one
//! (MSB(result) XOR CF for left shifts); AF is cleared by logic ops and shifts; BT*, BSF/BSR
//! leave OF, SF, AF, PF unchanged; BSF/BSR with a zero source leave the destination unchanged.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind};

use super::{Handler, mask};
use crate::block::Insn;
use crate::cpu::fl;
use crate::machine::{Machine, R};
use crate::paging::Kind;

#[inline(always)]
fn msb(v: u64, size: u64) -> u64 {
    (v >> (size * 8 - 1)) & 1
}

/// PF for each low byte (set when the number of one bits is even).
static PARITY: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if (i as u8).count_ones().is_multiple_of(2) {
            fl::PF as u8
        } else {
            0
        };
        i += 1;
    }
    t
};

/// ZF, SF and PF of a result.
#[inline(always)]
pub fn szp(r: u64, size: u64) -> u64 {
    let r = r & mask(size);
    let mut f = 0;
    if r == 0 {
        f |= fl::ZF;
    }
    if msb(r, size) != 0 {
        f |= fl::SF;
    }
    f | u64::from(PARITY[(r & 0xff) as usize])
}

#[inline(always)]
pub fn add_flags(a: u64, b: u64, r: u64, size: u64) -> u64 {
    let top = size * 8 - 1;
    let cf = (((a & b) | ((a | b) & !r)) >> top) & 1;
    let of = (((a ^ r) & (b ^ r)) >> top) & 1;
    szp(r, size) | cf | (of << 11) | ((a ^ b ^ r) & fl::AF)
}

#[inline(always)]
pub fn sub_flags(a: u64, b: u64, r: u64, size: u64) -> u64 {
    let top = size * 8 - 1;
    let cf = (((!a & b) | ((!a | b) & r)) >> top) & 1;
    let of = (((a ^ b) & (a ^ r)) >> top) & 1;
    szp(r, size) | cf | (of << 11) | ((a ^ b ^ r) & fl::AF)
}

pub const ADD: u8 = 0;
pub const OR: u8 = 1;
pub const ADC: u8 = 2;
pub const SBB: u8 = 3;
pub const AND: u8 = 4;
pub const SUB: u8 = 5;
pub const XOR: u8 = 6;
pub const CMP: u8 = 7;
pub const TEST: u8 = 8;

/// Result and arithmetic flags of a two-operand ALU operation.
#[inline(always)]
pub fn calc(op: u8, a: u64, b: u64, cf: u64, size: u64) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    match op {
        ADD => {
            let r = a.wrapping_add(b) & m;
            (r, add_flags(a, b, r, size))
        }
        ADC => {
            // The carry formula only looks at the top bit, so it holds with a carry-in too.
            let r = a.wrapping_add(b).wrapping_add(cf) & m;
            (r, add_flags(a, b, r, size))
        }
        SUB | CMP => {
            let r = a.wrapping_sub(b) & m;
            (r, sub_flags(a, b, r, size))
        }
        SBB => {
            let r = a.wrapping_sub(b).wrapping_sub(cf) & m;
            (r, sub_flags(a, b, r, size))
        }
        AND | TEST => {
            let r = a & b;
            (r, szp(r, size))
        }
        OR => {
            let r = a | b;
            (r, szp(r, size))
        }
        _ => {
            let r = a ^ b;
            (r, szp(r, size))
        }
    }
}

#[inline(always)]
fn set_arith(m: &mut Machine, f: u64) {
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | f;
}

/// Two-operand ALU instruction; destination register or memory (atomic with LOCK).
fn binop<const OP: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let src = m.rd(x, 1, size)?;
    let cf = m.cpu.flags & fl::CF;
    let writes = OP != CMP && OP != TEST;
    match x.i.op0_kind() {
        OpKind::Register => {
            let r0 = x.i.op0_register();
            let a = m.reg(r0);
            let (r, f) = calc(OP, a, src, cf, size);
            if writes {
                m.set_reg(r0, r);
            }
            set_arith(m, f);
        }
        _ => {
            let seg = m.mseg(x);
            let off = m.ea(x);
            if writes {
                let lin = m.linear(seg, off, size, Kind::Write)?;
                let mut flags = 0;
                m.rmw_lin(lin, size, x.i.has_lock_prefix(), |a| {
                    let (r, f) = calc(OP, a, src, cf, size);
                    flags = f;
                    r
                })?;
                set_arith(m, flags);
            } else {
                let a = m.read(seg, off, size)?;
                let (_, f) = calc(OP, a, src, cf, size);
                set_arith(m, f);
            }
        }
    }
    Ok(())
}

/// One-operand read-modify-write (INC, DEC, NEG, NOT).
fn unop<const OP: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    const INC: u8 = 0;
    const DEC: u8 = 1;
    const NEG: u8 = 2;
    let size = u64::from(x.osz);
    let cf = m.cpu.flags & fl::CF;
    let f = move |a: u64| -> (u64, u64) {
        match OP {
            INC => {
                let r = a.wrapping_add(1) & mask(size);
                (r, (add_flags(a, 1, r, size) & !fl::CF) | cf)
            }
            DEC => {
                let r = a.wrapping_sub(1) & mask(size);
                (r, (sub_flags(a, 1, r, size) & !fl::CF) | cf)
            }
            NEG => {
                let r = 0u64.wrapping_sub(a) & mask(size);
                (r, sub_flags(0, a, r, size))
            }
            _ => (!a & mask(size), u64::MAX),
        }
    };
    let flags = if x.i.op0_kind() == OpKind::Register {
        let r0 = x.i.op0_register();
        let (r, fl_) = f(m.reg(r0));
        m.set_reg(r0, r);
        fl_
    } else {
        let lin = m.linear(m.mseg(x), m.ea(x), size, Kind::Write)?;
        let mut out = 0;
        m.rmw_lin(lin, size, x.i.has_lock_prefix(), |a| {
            let (r, fl_) = f(a);
            out = fl_;
            r
        })?;
        out
    };
    if flags != u64::MAX {
        set_arith(m, flags);
    }
    Ok(())
}

// ---- shifts and rotates ------------------------------------------------------------------

pub const SHL: u8 = 0;
pub const SHR: u8 = 1;
pub const SAR: u8 = 2;
pub const ROL: u8 = 3;
pub const ROR: u8 = 4;
pub const RCL: u8 = 5;
pub const RCR: u8 = 6;

/// Result and new flags (None: flags unchanged) of a shift by an already masked count.
pub fn shift(op: u8, a: u64, count: u64, size: u64, flags: u64) -> (u64, u64) {
    let bits = size * 8;
    let m = mask(size);
    let a = a & m;
    let cf_in = flags & fl::CF;
    let keep = flags & !fl::ARITH;
    match op {
        SHL => {
            let r = if count >= bits { 0 } else { (a << count) & m };
            let cf = if count > bits {
                0
            } else {
                ((u128::from(a) << count) >> bits) as u64 & 1
            };
            let of = msb(r, size) ^ cf;
            (r, keep | szp(r, size) | cf | (of << 11))
        }
        SHR => {
            let r = if count >= 64 { 0 } else { a >> count };
            let cf = if count > bits {
                0
            } else {
                (a >> (count - 1)) & 1
            };
            let of = if count == 1 { msb(a, size) } else { 0 };
            (r, keep | szp(r, size) | cf | (of << 11))
        }
        SAR => {
            let s = ((a << (64 - bits)) as i64) >> (64 - bits);
            let c = count.min(63);
            let r = ((s >> c) as u64) & m;
            let cf = ((s >> (c - 1).min(63)) as u64) & 1;
            (r, keep | szp(r, size) | cf)
        }
        ROL => {
            let c = count % bits;
            let r = if c == 0 {
                a
            } else {
                ((a << c) | (a >> (bits - c))) & m
            };
            let cf = r & 1;
            let of = msb(r, size) ^ cf;
            (r, (flags & !(fl::CF | fl::OF)) | cf | (of << 11))
        }
        ROR => {
            let c = count % bits;
            let r = if c == 0 {
                a
            } else {
                ((a >> c) | (a << (bits - c))) & m
            };
            let cf = msb(r, size);
            let of = msb(r, size) ^ ((r >> (bits - 2)) & 1);
            (r, (flags & !(fl::CF | fl::OF)) | cf | (of << 11))
        }
        RCL | _ => {
            let c = count % (bits + 1);
            if c == 0 {
                return (a, flags);
            }
            // Rotate the (bits + 1)-bit value CF:a.
            let wide = u128::from(a) | (u128::from(cf_in) << bits);
            let total = bits + 1;
            let wmask = (1u128 << total) - 1;
            let rot = if op == RCL {
                ((wide << c) | (wide >> (total - c))) & wmask
            } else {
                ((wide >> c) | (wide << (total - c))) & wmask
            };
            let r = (rot as u64) & m;
            let cf = ((rot >> bits) & 1) as u64;
            let of = if op == RCL {
                msb(r, size) ^ cf
            } else {
                msb(r, size) ^ ((r >> (bits - 2)) & 1)
            };
            (r, (flags & !(fl::CF | fl::OF)) | cf | (of << 11))
        }
    }
}

fn shift_op<const OP: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let raw = if x.i.op_count() < 2 {
        1
    } else {
        m.rd(x, 1, 1)?
    };
    let count = raw & if size == 8 { 0x3f } else { 0x1f };
    if count == 0 {
        // Nothing changes, but a memory operand is still checked for access, and a 32-bit
        // register is still written (zero-extended), as on hardware.
        if x.i.op0_kind() == OpKind::Memory {
            m.linear(m.mseg(x), m.ea(x), size, Kind::Write)?;
        } else if size == 4 {
            let r0 = x.i.op0_register();
            let v = m.reg(r0);
            m.set_reg(r0, v);
        }
        return Ok(());
    }
    let flags = m.cpu.flags;
    if x.i.op0_kind() == OpKind::Register {
        let r0 = x.i.op0_register();
        let (r, f) = shift(OP, m.reg(r0), count, size, flags);
        m.set_reg(r0, r);
        m.cpu.flags = f;
    } else {
        let lin = m.linear(m.mseg(x), m.ea(x), size, Kind::Write)?;
        let mut out = flags;
        m.rmw_lin(lin, size, x.i.has_lock_prefix(), |a| {
            let (r, f) = shift(OP, a, count, size, flags);
            out = f;
            r
        })?;
        m.cpu.flags = out;
    }
    Ok(())
}

/// SHLD / SHRD.
fn shiftd<const LEFT: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let bits = size * 8;
    let src = m.reg(x.i.op1_register());
    let raw = m.rd(x, 2, 1)?;
    let count = raw & if size == 8 { 0x3f } else { 0x1f };
    if count == 0 {
        // As for shifts: a 32-bit register destination is still zero-extended.
        if x.i.op0_kind() == OpKind::Register && size == 4 {
            let r0 = x.i.op0_register();
            let v = m.reg(r0);
            m.set_reg(r0, v);
        }
        return Ok(());
    }
    let flags = m.cpu.flags;
    let f = move |a: u64| -> (u64, u64) {
        let mk = mask(size);
        // The destination and the source side by side (the destination on the side the bits
        // leave): dest:src:dest for 16/32 bits, where counts above the operand width (16-bit
        // only) shift the destination in again, and dest:src for 64 bits (count < 64).
        let (a, src) = (a & mk, src & mk);
        let (r, cf) = if bits == 64 {
            if LEFT {
                let wide = (u128::from(a) << 64) | u128::from(src);
                (
                    ((wide << count) >> 64) as u64,
                    ((wide << (count - 1)) >> 127) as u64 & 1,
                )
            } else {
                let wide = (u128::from(src) << 64) | u128::from(a);
                ((wide >> count) as u64, (wide >> (count - 1)) as u64 & 1)
            }
        } else if LEFT {
            let wide = (u128::from(a) << (2 * bits)) | (u128::from(src) << bits) | u128::from(a);
            let r = ((wide << count) >> (2 * bits)) as u64 & mk;
            let cf = ((wide << (count - 1)) >> (3 * bits - 1)) as u64 & 1;
            (r, cf)
        } else {
            let wide = u128::from(a) | (u128::from(src) << bits) | (u128::from(a) << (2 * bits));
            let r = (wide >> count) as u64 & mk;
            let cf = (wide >> (count - 1)) as u64 & 1;
            (r, cf)
        };
        let of = (msb(r, size) ^ msb(a, size)) & 1;
        (r, (flags & !fl::ARITH) | szp(r, size) | cf | (of << 11))
    };
    if x.i.op0_kind() == OpKind::Register {
        let r0 = x.i.op0_register();
        let (r, fl_) = f(m.reg(r0));
        m.set_reg(r0, r);
        m.cpu.flags = fl_;
    } else {
        let lin = m.linear(m.mseg(x), m.ea(x), size, Kind::Write)?;
        let mut out = flags;
        m.rmw_lin(lin, size, x.i.has_lock_prefix(), |a| {
            let (r, fl_) = f(a);
            out = fl_;
            r
        })?;
        m.cpu.flags = out;
    }
    Ok(())
}

// ---- bit operations ----------------------------------------------------------------------

/// BT, BTS, BTR, BTC (0..3).
fn bitop<const OP: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let bits = size * 8;
    let reg_offset = x.i.op1_kind() == OpKind::Register;
    let off = m.rd(x, 1, size)?;
    let apply = |a: u64, bit: u64| -> u64 {
        match OP {
            1 => a | (1 << bit),
            2 => a & !(1 << bit),
            3 => a ^ (1 << bit),
            _ => a,
        }
    };
    let cf;
    if x.i.op0_kind() == OpKind::Register {
        let r0 = x.i.op0_register();
        let bit = off & (bits - 1);
        let a = m.reg(r0);
        cf = (a >> bit) & 1;
        if OP != 0 {
            m.set_reg(r0, apply(a, bit));
        }
    } else {
        let seg = m.mseg(x);
        let mut ea = m.ea(x);
        let bit;
        if reg_offset {
            // A register offset is signed and may address outside the operand.
            let s = ((off << (64 - bits)) as i64) >> (64 - bits);
            let units = s.div_euclid(bits as i64);
            ea = ea.wrapping_add((units * size as i64) as u64) & x.amask;
            bit = s.rem_euclid(bits as i64) as u64;
        } else {
            bit = off & (bits - 1);
        }
        if OP == 0 {
            cf = (m.read(seg, ea, size)? >> bit) & 1;
        } else {
            let lin = m.linear(seg, ea, size, Kind::Write)?;
            let old = m.rmw_lin(lin, size, x.i.has_lock_prefix(), |a| apply(a, bit))?;
            cf = (old >> bit) & 1;
        }
    }
    m.cpu.flags = (m.cpu.flags & !fl::CF) | cf;
    Ok(())
}

/// BSF / BSR (and LZCNT/TZCNT, which a CPU without them executes as BSR/BSF).
fn bitscan<const REVERSE: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let src = m.rd(x, 1, size)? & mask(size);
    if src == 0 {
        m.cpu.flags |= fl::ZF;
        return Ok(());
    }
    let idx = if REVERSE {
        63 - u64::from(src.leading_zeros())
    } else {
        u64::from(src.trailing_zeros())
    };
    m.set_reg(x.i.op0_register(), idx);
    m.cpu.flags &= !fl::ZF;
    Ok(())
}

fn popcnt(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let src = m.rd(x, 1, size)? & mask(size);
    m.set_reg(x.i.op0_register(), u64::from(src.count_ones()));
    set_arith(m, if src == 0 { fl::ZF } else { 0 });
    Ok(())
}

// ---- flags and conditions ----------------------------------------------------------------

/// Whether condition `cc` holds for `f`.
#[inline(always)]
pub fn cond(cc: ConditionCode, f: u64) -> bool {
    let cf = f & fl::CF != 0;
    let zf = f & fl::ZF != 0;
    let sf = f & fl::SF != 0;
    let of = f & fl::OF != 0;
    let pf = f & fl::PF != 0;
    match cc {
        ConditionCode::o => of,
        ConditionCode::no => !of,
        ConditionCode::b => cf,
        ConditionCode::ae => !cf,
        ConditionCode::e => zf,
        ConditionCode::ne => !zf,
        ConditionCode::be => cf || zf,
        ConditionCode::a => !cf && !zf,
        ConditionCode::s => sf,
        ConditionCode::ns => !sf,
        ConditionCode::p => pf,
        ConditionCode::np => !pf,
        ConditionCode::l => sf != of,
        ConditionCode::ge => sf == of,
        ConditionCode::le => zf || sf != of,
        ConditionCode::g => !zf && sf == of,
        ConditionCode::None => true,
    }
}

fn setcc(m: &mut Machine, x: &Insn) -> R<()> {
    let v = cond(x.i.condition_code(), m.cpu.flags) as u64;
    m.wr(x, 0, 1, v)
}

fn cmovcc(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    // The source is read (and may fault) whether or not the move happens.
    let v = m.rd(x, 1, size)?;
    let r0 = x.i.op0_register();
    if cond(x.i.condition_code(), m.cpu.flags) {
        m.set_reg(r0, v);
    } else if size == 4 {
        // A 32-bit CMOV zero-extends its destination even when the condition is false.
        let cur = m.reg(r0);
        m.set_reg(r0, cur);
    }
    Ok(())
}

fn flagop<const OP: u8>(m: &mut Machine, _: &Insn) -> R<()> {
    let f = &mut m.cpu.flags;
    match OP {
        0 => *f &= !fl::CF,
        1 => *f |= fl::CF,
        2 => *f ^= fl::CF,
        3 => *f &= !fl::DF,
        _ => *f |= fl::DF,
    }
    Ok(())
}

fn lahf(m: &mut Machine, _: &Insn) -> R<()> {
    let v = (m.cpu.flags & (fl::ARITH & !fl::OF)) | 2;
    m.cpu.gpr[0] = (m.cpu.gpr[0] & !0xff00) | (v << 8);
    Ok(())
}

fn sahf(m: &mut Machine, _: &Insn) -> R<()> {
    let ah = (m.cpu.gpr[0] >> 8) & 0xff;
    let bits = fl::CF | fl::PF | fl::AF | fl::ZF | fl::SF;
    m.cpu.flags = (m.cpu.flags & !bits) | (ah & bits);
    Ok(())
}

// ---- BCD ---------------------------------------------------------------------------------

fn bcd<const OP: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let f = m.cpu.flags;
    let ax = m.cpu.gpr[0] & 0xffff;
    let al = ax & 0xff;
    let af = f & fl::AF != 0;
    let cf = f & fl::CF != 0;
    let mut nf = f & !fl::ARITH;
    let new_ax;
    match OP {
        // DAA
        0 => {
            let mut a = al;
            let mut c = false;
            if (al & 0xf) > 9 || af {
                a += 6;
                c = cf || a > 0xff;
                nf |= fl::AF;
            }
            if al > 0x99 || cf {
                a += 0x60;
                c = true;
            }
            let a = a & 0xff;
            nf |= szp(a, 1) | c as u64;
            new_ax = (ax & 0xff00) | a;
        }
        // DAS
        1 => {
            let mut a = al;
            let mut c = false;
            if (al & 0xf) > 9 || af {
                c = cf || a < 6;
                a = a.wrapping_sub(6);
                nf |= fl::AF;
            }
            if al > 0x99 || cf {
                a = a.wrapping_sub(0x60);
                c = true;
            }
            let a = a & 0xff;
            nf |= szp(a, 1) | c as u64;
            new_ax = (ax & 0xff00) | a;
        }
        // AAA
        2 => {
            let mut v = ax;
            if (al & 0xf) > 9 || af {
                v = v.wrapping_add(0x106);
                nf |= fl::AF | fl::CF;
            }
            v &= 0xff0f;
            nf |= szp(v & 0xff, 1);
            new_ax = v & 0xffff;
        }
        // AAS: AX -= 6 (a borrow from AL reaches AH), then AH -= 1, as current cores do.
        3 => {
            let mut v = ax;
            if (al & 0xf) > 9 || af {
                let t = ax.wrapping_sub(6) & 0xffff;
                let hi = ((t >> 8).wrapping_sub(1)) & 0xff;
                v = (hi << 8) | (t & 0xff);
                nf |= fl::AF | fl::CF;
            }
            v &= 0xff0f;
            nf |= szp(v & 0xff, 1);
            new_ax = v;
        }
        // AAM
        4 => {
            let base = x.i.immediate8() as u64;
            if base == 0 {
                return Err(crate::machine::Fault::Exc(crate::machine::DE, None));
            }
            let a = al % base;
            new_ax = ((al / base) << 8) | a;
            nf = (f & !fl::ARITH) | szp(a, 1);
        }
        // AAD
        _ => {
            let base = x.i.immediate8() as u64;
            let a = (al + ((ax >> 8) * base)) & 0xff;
            let (_, addf) = calc(ADD, al, ((ax >> 8) * base) & 0xff, 0, 1);
            new_ax = a;
            nf = (f & !fl::ARITH) | addf;
        }
    }
    m.cpu.gpr[0] = (m.cpu.gpr[0] & !0xffff) | new_ax;
    m.cpu.flags = nf;
    Ok(())
}

pub fn handler(mn: Mnemonic, i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    let _ = i;
    Some(match mn {
        Add => binop::<ADD>,
        Or => binop::<OR>,
        Adc => binop::<ADC>,
        Sbb => binop::<SBB>,
        And => binop::<AND>,
        Sub => binop::<SUB>,
        Xor => binop::<XOR>,
        Cmp => binop::<CMP>,
        Test => binop::<TEST>,
        Inc => unop::<0>,
        Dec => unop::<1>,
        Neg => unop::<2>,
        Not => unop::<3>,
        Shl | Sal => shift_op::<SHL>,
        Shr => shift_op::<SHR>,
        Sar => shift_op::<SAR>,
        Rol => shift_op::<ROL>,
        Ror => shift_op::<ROR>,
        Rcl => shift_op::<RCL>,
        Rcr => shift_op::<RCR>,
        Shld => shiftd::<true>,
        Shrd => shiftd::<false>,
        Bt => bitop::<0>,
        Bts => bitop::<1>,
        Btr => bitop::<2>,
        Btc => bitop::<3>,
        Bsf | Tzcnt => bitscan::<false>,
        Bsr | Lzcnt => bitscan::<true>,
        Popcnt => popcnt,
        Clc => flagop::<0>,
        Stc => flagop::<1>,
        Cmc => flagop::<2>,
        Cld => flagop::<3>,
        Std => flagop::<4>,
        Lahf => lahf,
        Sahf => sahf,
        Daa => bcd::<0>,
        Das => bcd::<1>,
        Aaa => bcd::<2>,
        Aas => bcd::<3>,
        Aam => bcd::<4>,
        Aad => bcd::<5>,
        Seto | Setno | Setb | Setae | Sete | Setne | Setbe | Seta | Sets | Setns | Setp | Setnp
        | Setl | Setge | Setle | Setg => setcc,
        Cmovo | Cmovno | Cmovb | Cmovae | Cmove | Cmovne | Cmovbe | Cmova | Cmovs | Cmovns
        | Cmovp | Cmovnp | Cmovl | Cmovge | Cmovle | Cmovg => cmovcc,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_sub_flags() {
        let (r, f) = calc(ADD, 0xff, 1, 0, 1);
        assert_eq!(r, 0);
        assert_eq!(
            f & (fl::CF | fl::ZF | fl::AF | fl::PF),
            fl::CF | fl::ZF | fl::AF | fl::PF
        );
        let (_, f) = calc(ADD, 0x7f, 1, 0, 1);
        assert_ne!(f & fl::OF, 0);
        let (r, f) = calc(SUB, 0, 1, 0, 4);
        assert_eq!(r, 0xffff_ffff);
        assert_ne!(f & fl::CF, 0);
        assert_ne!(f & fl::SF, 0);
        let (r, f) = calc(ADC, u64::MAX, u64::MAX, 1, 8);
        assert_eq!(r, u64::MAX);
        assert_ne!(f & fl::CF, 0);
        let (r, f) = calc(SBB, 0, u64::MAX, 1, 8);
        assert_eq!(r, 0);
        assert_ne!(f & fl::CF, 0);
    }

    #[test]
    fn rotates_through_carry() {
        let (r, f) = shift(RCL, 0x80, 1, 1, 0);
        assert_eq!(r, 0);
        assert_eq!(f & fl::CF, fl::CF);
        let (r, f) = shift(RCR, 0x01, 1, 1, fl::CF);
        assert_eq!(r, 0x80);
        assert_eq!(f & fl::CF, fl::CF);
        let (r, _) = shift(SAR, 0x80, 7, 1, 0);
        assert_eq!(r, 0xff);
    }
}
