//! MMX, SSE and SSE2: availability checks, register and memory operands, data movement,
//! integer and logical operations, shuffles. Floating-point arithmetic is in `ssefp.rs`.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};
use palacios_x86::{cr0, cr4};

use super::Handler;
use crate::block::Insn;
use crate::cpu::DS;
use crate::fpu::sw;
use crate::machine::{Fault, MF, Machine, NM, R, ud};

pub fn nm() -> Fault {
    Fault::Exc(NM, None)
}

/// SSE/SSE2 instructions: #UD with CR0.EM or without CR4.OSFXSR, then #NM with CR0.TS.
#[inline]
pub fn sse_ok(m: &Machine) -> R<()> {
    if m.cpu.cr0 & cr0::EM != 0 || m.cpu.cr4 & cr4::OSFXSR == 0 {
        return Err(ud());
    }
    if m.cpu.cr0 & cr0::TS != 0 {
        return Err(nm());
    }
    Ok(())
}

/// A pending unmasked x87 exception is delivered as #MF before the next waiting x87 or MMX
/// instruction (CR0.NE=1; the legacy FERR#/IRQ13 path of CR0.NE=0 is not modelled, and there
/// such exceptions stay pending).
#[inline]
pub fn x87_pending(m: &Machine) -> R<()> {
    if m.cpu.fpu.fsw & sw::ES != 0 && m.cpu.cr0 & cr0::NE != 0 {
        return Err(Fault::Exc(MF, None));
    }
    Ok(())
}

/// MMX instructions: #UD with CR0.EM, #NM with CR0.TS, #MF for a pending x87 exception;
/// then the x87 stack is switched to MMX use (TOP=0, all registers valid).
pub fn mmx_ok(m: &mut Machine) -> R<()> {
    if m.cpu.cr0 & cr0::EM != 0 {
        return Err(ud());
    }
    if m.cpu.cr0 & cr0::TS != 0 {
        return Err(nm());
    }
    x87_pending(m)?;
    m.cpu.fpu.set_top(0);
    m.cpu.fpu.tag = 0xff;
    Ok(())
}

/// The check for an instruction whose destination (or only vector operand) is `r`.
#[inline]
fn avail(m: &mut Machine, mmx: bool) -> R<()> {
    if mmx { mmx_ok(m) } else { sse_ok(m) }
}

/// Whether the instruction touches an MMX register (then it is an MMX instruction).
fn uses_mmx(x: &Insn) -> bool {
    (0..x.i.op_count()).any(|n| x.i.op_kind(n) == OpKind::Register && x.i.op_register(n).is_mm())
}

#[inline]
fn xi(r: Register) -> usize {
    r as usize - Register::XMM0 as usize
}

#[inline]
fn mi(r: Register) -> usize {
    r as usize - Register::MM0 as usize
}

/// A register operand's value: XMM (128 bits), MM (64) or a general register.
pub fn rv(m: &Machine, r: Register) -> u128 {
    if r.is_xmm() {
        m.cpu.fpu.xmm[xi(r)]
    } else if r.is_mm() {
        u128::from(m.cpu.fpu.r[mi(r)] as u64)
    } else {
        u128::from(m.reg(r))
    }
}

/// Write a register operand: an MM write sets the register's exponent bits to all ones.
pub fn set_rv(m: &mut Machine, r: Register, v: u128) {
    if r.is_xmm() {
        m.cpu.fpu.xmm[xi(r)] = v;
    } else if r.is_mm() {
        m.cpu.fpu.r[mi(r)] = (0xffffu128 << 64) | u128::from(v as u64);
    } else {
        m.set_reg(r, v as u64);
    }
}

/// Bytes of the memory operand.
#[inline]
pub fn msize(x: &Insn) -> u64 {
    x.i.memory_size().size() as u64
}

/// Read `size` bytes of the memory operand; 16-byte operands of `aligned` instructions must be
/// 16-byte aligned (#GP(0)).
pub fn read_mem(m: &mut Machine, x: &Insn, size: u64, aligned: bool) -> R<u128> {
    let off = m.ea(x);
    let seg = m.mseg(x);
    if size <= 8 {
        return Ok(u128::from(m.read(seg, off, size)?));
    }
    let mut b = [0u8; 16];
    let align = if aligned && size == 16 { 16 } else { 1 };
    m.read_buf(seg, off, &mut b[..size as usize], align)?;
    Ok(u128::from_le_bytes(b))
}

/// Write `size` bytes of the memory operand.
pub fn write_mem(m: &mut Machine, x: &Insn, size: u64, v: u128, aligned: bool) -> R<()> {
    let off = m.ea(x);
    let seg = m.mseg(x);
    if size <= 8 {
        return m.write(seg, off, size, v as u64);
    }
    let align = if aligned && size == 16 { 16 } else { 1 };
    m.write_buf(seg, off, &v.to_le_bytes()[..size as usize], align)
}

/// Operand `n`: register, memory (its own size) or immediate.
pub fn src(m: &mut Machine, x: &Insn, n: u32, aligned: bool) -> R<u128> {
    match x.i.op_kind(n) {
        OpKind::Register => Ok(rv(m, x.i.op_register(n))),
        OpKind::Memory => {
            let s = msize(x);
            read_mem(m, x, s, aligned)
        }
        _ => Ok(u128::from(x.i.immediate(n))),
    }
}

// ---- lanes --------------------------------------------------------------------------------

#[inline]
fn lane_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    }
}

/// Apply `f` to each `w`-byte lane of the low `bytes` bytes of `a` and `b`.
#[inline]
fn lanes(a: u128, b: u128, w: u32, bytes: u32, f: impl Fn(u64, u64) -> u64) -> u128 {
    let bits = w * 8;
    let mk = lane_mask(bits);
    let mut r = 0u128;
    for k in 0..bytes / w {
        let sh = k * bits;
        let x = (a >> sh) as u64 & mk;
        let y = (b >> sh) as u64 & mk;
        r |= u128::from(f(x, y) & mk) << sh;
    }
    r
}

#[inline]
fn lane(v: u128, k: u32, w: u32) -> u64 {
    (v >> (k * w * 8)) as u64 & lane_mask(w * 8)
}

#[inline]
fn sext(v: u64, bits: u32) -> i64 {
    ((v << (64 - bits)) as i64) >> (64 - bits)
}

#[inline]
fn sat_s(v: i64, bits: u32) -> u64 {
    let lo = -(1i64 << (bits - 1));
    let hi = (1i64 << (bits - 1)) - 1;
    v.clamp(lo, hi) as u64
}

#[inline]
fn sat_u(v: i64, bits: u32) -> u64 {
    v.clamp(0, lane_mask(bits) as i64) as u64
}

/// Interleave lanes of the low (or high) halves of `a` and `b`.
fn unpack(a: u128, b: u128, w: u32, bytes: u32, high: bool) -> u128 {
    let n = bytes / w / 2;
    let base = if high { n } else { 0 };
    let mut r = 0u128;
    for k in 0..n {
        r |= u128::from(lane(a, base + k, w)) << (2 * k * w * 8);
        r |= u128::from(lane(b, base + k, w)) << ((2 * k + 1) * w * 8);
    }
    r
}

/// Narrow the `w`-byte lanes of `a` then `b` to `w/2` bytes with saturation.
fn pack(a: u128, b: u128, w: u32, bytes: u32, signed_dst: bool) -> u128 {
    let n = bytes / w;
    let ob = w * 4;
    let mut r = 0u128;
    for (i, v) in [a, b].into_iter().enumerate() {
        for k in 0..n {
            let s = sext(lane(v, k, w), w * 8);
            let o = if signed_dst {
                sat_s(s, ob)
            } else {
                sat_u(s, ob)
            };
            r |= u128::from(o & lane_mask(ob)) << ((i as u32 * n + k) * ob);
        }
    }
    r
}

/// Shift each lane by the count in `count`: logical counts past the width give zero,
/// arithmetic ones fill with the sign.
fn shift(a: u128, count: u64, w: u32, bytes: u32, kind: u8) -> u128 {
    let bits = w * 8;
    lanes(a, 0, w, bytes, |x, _| match kind {
        0 if count < u64::from(bits) => x << count,
        1 if count < u64::from(bits) => x >> count,
        2 => (sext(x, bits) >> count.min(u64::from(bits) - 1)) as u64,
        _ => 0,
    })
}

pub mod op {
    pub const PADDB: u8 = 0;
    pub const PADDW: u8 = 1;
    pub const PADDD: u8 = 2;
    pub const PADDQ: u8 = 3;
    pub const PSUBB: u8 = 4;
    pub const PSUBW: u8 = 5;
    pub const PSUBD: u8 = 6;
    pub const PSUBQ: u8 = 7;
    pub const PADDSB: u8 = 8;
    pub const PADDSW: u8 = 9;
    pub const PADDUSB: u8 = 10;
    pub const PADDUSW: u8 = 11;
    pub const PSUBSB: u8 = 12;
    pub const PSUBSW: u8 = 13;
    pub const PSUBUSB: u8 = 14;
    pub const PSUBUSW: u8 = 15;
    pub const PMULLW: u8 = 16;
    pub const PMULHW: u8 = 17;
    pub const PMULHUW: u8 = 18;
    pub const PMULUDQ: u8 = 19;
    pub const PMADDWD: u8 = 20;
    pub const PAVGB: u8 = 21;
    pub const PAVGW: u8 = 22;
    pub const PMINUB: u8 = 23;
    pub const PMAXUB: u8 = 24;
    pub const PMINSW: u8 = 25;
    pub const PMAXSW: u8 = 26;
    pub const PSADBW: u8 = 27;
    pub const PCMPEQB: u8 = 28;
    pub const PCMPEQW: u8 = 29;
    pub const PCMPEQD: u8 = 30;
    pub const PCMPGTB: u8 = 31;
    pub const PCMPGTW: u8 = 32;
    pub const PCMPGTD: u8 = 33;
    pub const AND: u8 = 34;
    pub const ANDN: u8 = 35;
    pub const OR: u8 = 36;
    pub const XOR: u8 = 37;
    pub const PACKSSWB: u8 = 38;
    pub const PACKSSDW: u8 = 39;
    pub const PACKUSWB: u8 = 40;
    pub const PUNPCKLBW: u8 = 41;
    pub const PUNPCKLWD: u8 = 42;
    pub const PUNPCKLDQ: u8 = 43;
    pub const PUNPCKLQDQ: u8 = 44;
    pub const PUNPCKHBW: u8 = 45;
    pub const PUNPCKHWD: u8 = 46;
    pub const PUNPCKHDQ: u8 = 47;
    pub const PUNPCKHQDQ: u8 = 48;
    pub const PSLLW: u8 = 49;
    pub const PSLLD: u8 = 50;
    pub const PSLLQ: u8 = 51;
    pub const PSRLW: u8 = 52;
    pub const PSRLD: u8 = 53;
    pub const PSRLQ: u8 = 54;
    pub const PSRAW: u8 = 55;
    pub const PSRAD: u8 = 56;
    pub const PSLLDQ: u8 = 57;
    pub const PSRLDQ: u8 = 58;
}

/// The integer operation `o` on vectors of `bytes` bytes (8: MMX, 16: XMM).
fn int_op(o: u8, a: u128, b: u128, bytes: u32) -> u128 {
    use op::*;
    let cnt = b as u64;
    match o {
        PADDB..=PADDQ => lanes(a, b, 1 << (o - PADDB), bytes, |x, y| x.wrapping_add(y)),
        PSUBB..=PSUBQ => lanes(a, b, 1 << (o - PSUBB), bytes, |x, y| x.wrapping_sub(y)),
        PADDSB | PADDSW | PSUBSB | PSUBSW => {
            let w = if o == PADDSB || o == PSUBSB { 1 } else { 2 };
            let sub = o >= PSUBSB;
            lanes(a, b, w, bytes, |x, y| {
                let (x, y) = (sext(x, w * 8), sext(y, w * 8));
                sat_s(if sub { x - y } else { x + y }, w * 8)
            })
        }
        PADDUSB | PADDUSW | PSUBUSB | PSUBUSW => {
            let w = if o == PADDUSB || o == PSUBUSB { 1 } else { 2 };
            let sub = o >= PSUBUSB;
            lanes(a, b, w, bytes, |x, y| {
                let (x, y) = (x as i64, y as i64);
                sat_u(if sub { x - y } else { x + y }, w * 8)
            })
        }
        PMULLW => lanes(a, b, 2, bytes, |x, y| x.wrapping_mul(y)),
        PMULHW => lanes(a, b, 2, bytes, |x, y| {
            ((sext(x, 16) * sext(y, 16)) >> 16) as u64
        }),
        PMULHUW => lanes(a, b, 2, bytes, |x, y| (x * y) >> 16),
        PMULUDQ => lanes(a, b, 8, bytes, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
        PMADDWD => lanes(a, b, 4, bytes, |x, y| {
            let p0 = sext(x & 0xffff, 16) * sext(y & 0xffff, 16);
            let p1 = sext(x >> 16, 16) * sext(y >> 16, 16);
            p0.wrapping_add(p1) as u64
        }),
        PAVGB => lanes(a, b, 1, bytes, |x, y| (x + y + 1) >> 1),
        PAVGW => lanes(a, b, 2, bytes, |x, y| (x + y + 1) >> 1),
        PMINUB => lanes(a, b, 1, bytes, |x, y| x.min(y)),
        PMAXUB => lanes(a, b, 1, bytes, |x, y| x.max(y)),
        PMINSW => lanes(a, b, 2, bytes, |x, y| sext(x, 16).min(sext(y, 16)) as u64),
        PMAXSW => lanes(a, b, 2, bytes, |x, y| sext(x, 16).max(sext(y, 16)) as u64),
        PSADBW => lanes(a, b, 8, bytes, |x, y| {
            (0..8)
                .map(|k| ((x >> (8 * k)) & 0xff).abs_diff((y >> (8 * k)) & 0xff))
                .sum()
        }),
        PCMPEQB..=PCMPEQD => lanes(a, b, 1 << (o - PCMPEQB), bytes, |x, y| {
            if x == y { u64::MAX } else { 0 }
        }),
        PCMPGTB..=PCMPGTD => {
            let w = 1 << (o - PCMPGTB);
            lanes(a, b, w, bytes, |x, y| {
                if sext(x, w * 8) > sext(y, w * 8) {
                    u64::MAX
                } else {
                    0
                }
            })
        }
        AND => a & b,
        ANDN => !a & b,
        OR => a | b,
        XOR => a ^ b,
        PACKSSWB => pack(a, b, 2, bytes, true),
        PACKSSDW => pack(a, b, 4, bytes, true),
        PACKUSWB => pack(a, b, 2, bytes, false),
        PUNPCKLBW..=PUNPCKLQDQ => unpack(a, b, 1 << (o - PUNPCKLBW), bytes, false),
        PUNPCKHBW..=PUNPCKHQDQ => unpack(a, b, 1 << (o - PUNPCKHBW), bytes, true),
        PSLLW..=PSLLQ => shift(a, cnt, 2 << (o - PSLLW), bytes, 0),
        PSRLW..=PSRLQ => shift(a, cnt, 2 << (o - PSRLW), bytes, 1),
        PSRAW | PSRAD => shift(a, cnt, 2 << (o - PSRAW), bytes, 2),
        PSLLDQ => {
            if cnt > 15 {
                0
            } else {
                a << (cnt * 8)
            }
        }
        PSRLDQ => {
            if cnt > 15 {
                0
            } else {
                a >> (cnt * 8)
            }
        }
        _ => unreachable!("integer operation {o}"),
    }
}

/// dst = dst OP src, for MMX (64-bit) or XMM (128-bit) destinations; shifts take their count
/// from a register, memory or an immediate.
fn pbin<const O: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let d = x.i.op0_register();
    let mmx = d.is_mm();
    avail(m, mmx)?;
    let b = src(m, x, 1, !mmx)?;
    let a = rv(m, d);
    let r = int_op(O, a, b, if mmx { 8 } else { 16 });
    set_rv(m, d, r);
    Ok(())
}

/// Shuffles with an immediate: PSHUFD/LW/HW, PSHUFW, SHUFPS, SHUFPD.
fn pshuf<const O: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let d = x.i.op0_register();
    let mmx = d.is_mm();
    avail(m, mmx)?;
    let b = src(m, x, 1, !mmx)?;
    let a = rv(m, d);
    let imm = x.i.immediate(2) as u32;
    let sel = |v: u128, k: u32, w: u32| u128::from(lane(v, (imm >> (2 * k)) & 3, w));
    let r = match O {
        // PSHUFD
        0 => (0..4).fold(0, |r, k| r | sel(b, k, 4) << (32 * k)),
        // PSHUFLW
        1 => (b & !0xffff_ffff_ffff_ffffu128) | (0..4).fold(0, |r, k| r | sel(b, k, 2) << (16 * k)),
        // PSHUFHW
        2 => {
            let hi = b >> 64;
            (b & 0xffff_ffff_ffff_ffff)
                | ((0..4).fold(0, |r, k| r | sel(hi, k, 2) << (16 * k)) << 64)
        }
        // PSHUFW
        3 => (0..4).fold(0, |r, k| r | sel(b, k, 2) << (16 * k)),
        // SHUFPS
        4 => sel(a, 0, 4) | sel(a, 1, 4) << 32 | sel(b, 2, 4) << 64 | sel(b, 3, 4) << 96,
        // SHUFPD
        _ => u128::from(lane(a, imm & 1, 8)) | (u128::from(lane(b, (imm >> 1) & 1, 8)) << 64),
    };
    set_rv(m, d, r);
    Ok(())
}

fn pinsrw(m: &mut Machine, x: &Insn) -> R<()> {
    let d = x.i.op0_register();
    let mmx = d.is_mm();
    avail(m, mmx)?;
    let v = src(m, x, 1, false)? & 0xffff;
    let k = (x.i.immediate(2) as u32) & if mmx { 3 } else { 7 };
    let a = rv(m, d);
    set_rv(m, d, (a & !(0xffffu128 << (16 * k))) | (v << (16 * k)));
    Ok(())
}

fn pextrw(m: &mut Machine, x: &Insn) -> R<()> {
    let s = x.i.op1_register();
    let mmx = s.is_mm();
    avail(m, mmx)?;
    let k = (x.i.immediate(2) as u32) & if mmx { 3 } else { 7 };
    let v = lane(rv(m, s), k, 2);
    let d = x.i.op0_register();
    m.set_gpr(super::gpr_number(d).unwrap_or(0) as usize, 8, v);
    Ok(())
}

/// MOVMSKPS / MOVMSKPD / PMOVMSKB: sign bits into a general register.
fn movmsk<const W: u32>(m: &mut Machine, x: &Insn) -> R<()> {
    let s = x.i.op1_register();
    let mmx = s.is_mm();
    avail(m, mmx)?;
    let v = rv(m, s);
    let bytes = if mmx { 8 } else { 16 };
    let bits = (0..bytes / W).fold(0u64, |r, k| r | ((lane(v, k, W) >> (W * 8 - 1)) << k));
    let d = x.i.op0_register();
    m.set_gpr(super::gpr_number(d).unwrap_or(0) as usize, 8, bits);
    Ok(())
}

// ---- moves ----------------------------------------------------------------------------------

/// Full-width moves (MOVAPS/UPS/APD/UPD/DQA/DQU, MOVNT*, MOVQ mm): `A` demands alignment.
fn mov_full<const A: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, uses_mmx(x))?;
    match x.i.op0_kind() {
        OpKind::Register => {
            let v = src(m, x, 1, A)?;
            set_rv(m, x.i.op0_register(), v);
            Ok(())
        }
        _ => {
            let v = rv(m, x.i.op1_register());
            write_mem(m, x, msize(x), v, A)
        }
    }
}

/// MOVD/MOVQ and MOVQ2DQ/MOVDQ2Q: the source zero-extended into a vector register, or
/// the low bits of a vector register into a general register or memory.
fn mov_zx(m: &mut Machine, x: &Insn) -> R<()> {
    avail(m, uses_mmx(x))?;
    let v = src(m, x, 1, false)?;
    match x.i.op0_kind() {
        OpKind::Register => {
            let d = x.i.op0_register();
            let s1 = x.i.op1_kind();
            let size = if s1 == OpKind::Memory {
                msize(x)
            } else {
                let r = x.i.op1_register();
                if r.is_xmm() || r.is_mm() {
                    8
                } else {
                    r.size() as u64
                }
            };
            let v = if size >= 16 {
                v
            } else {
                v & ((1u128 << (size * 8)) - 1)
            };
            if d.is_xmm() || d.is_mm() {
                set_rv(m, d, v);
            } else {
                let n = super::gpr_number(d).unwrap_or(0) as usize;
                m.set_gpr(n, d.size() as u64, v as u64);
            }
            Ok(())
        }
        _ => write_mem(m, x, msize(x), v, false),
    }
}

/// MOVSS / MOVSD (SSE2): register to register merges the low element; a load zeroes the rest.
fn mov_scalar<const W: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    sse_ok(m)?;
    let mk = (1u128 << (W * 8)) - 1;
    if x.i.op0_kind() == OpKind::Memory {
        let v = rv(m, x.i.op1_register());
        return write_mem(m, x, W, v & mk, false);
    }
    let d = x.i.op0_register();
    if x.i.op1_kind() == OpKind::Memory {
        let v = read_mem(m, x, W, false)?;
        set_rv(m, d, v);
    } else {
        let v = rv(m, x.i.op1_register());
        let a = rv(m, d);
        set_rv(m, d, (a & !mk) | (v & mk));
    }
    Ok(())
}

/// MOVLPS/LPD/HPS/HPD/HLPS/LHPS: move 64 bits into the low/high half (`DH`) from the
/// low/high half (`SH`) of a register, or between a half and memory.
fn mov_half<const DH: bool, const SH: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    sse_ok(m)?;
    let half = |v: u128, hi: bool| {
        if hi {
            v >> 64
        } else {
            v & u128::from(u64::MAX)
        }
    };
    if x.i.op0_kind() == OpKind::Memory {
        let v = half(rv(m, x.i.op1_register()), SH);
        return write_mem(m, x, 8, v, false);
    }
    let v = if x.i.op1_kind() == OpKind::Memory {
        read_mem(m, x, 8, false)?
    } else {
        half(rv(m, x.i.op1_register()), SH)
    };
    let d = x.i.op0_register();
    let a = rv(m, d);
    let r = if DH {
        (a & u128::from(u64::MAX)) | (v << 64)
    } else {
        (a & !u128::from(u64::MAX)) | v
    };
    set_rv(m, d, r);
    Ok(())
}

/// MOVNTI: a general register to memory.
fn movnti(m: &mut Machine, x: &Insn) -> R<()> {
    let v = m.reg(x.i.op1_register());
    let size = msize(x);
    let off = m.ea(x);
    let seg = m.mseg(x);
    m.write(seg, off, size, v)
}

/// MASKMOVQ / MASKMOVDQU: the bytes whose mask byte has its top bit set, to DS:rDI.
fn maskmov(m: &mut Machine, x: &Insn) -> R<()> {
    let s = x.i.op0_register();
    let mmx = s.is_mm();
    avail(m, mmx)?;
    let v = rv(m, s);
    let mask = rv(m, x.i.op1_register());
    let bytes = if mmx { 8 } else { 16 };
    let seg = match x.i.memory_segment() {
        Register::None => DS,
        r => r as usize - Register::ES as usize,
    };
    let base = m.cpu.gpr[7] & x.amask;
    // Check the whole operand first so a fault leaves nothing written.
    if mask & ((1u128 << (bytes * 8)) - 1) != 0 {
        m.probe_write(seg, base, bytes)?;
    }
    for k in 0..bytes {
        if (mask >> (k * 8 + 7)) & 1 != 0 {
            m.write(
                seg,
                base.wrapping_add(k) & x.amask,
                1,
                (v >> (k * 8)) as u64 & 0xff,
            )?;
        }
    }
    Ok(())
}

fn emms(m: &mut Machine, _: &Insn) -> R<()> {
    if m.cpu.cr0 & cr0::EM != 0 {
        return Err(ud());
    }
    if m.cpu.cr0 & cr0::TS != 0 {
        return Err(nm());
    }
    x87_pending(m)?;
    m.cpu.fpu.tag = 0;
    Ok(())
}

/// The handler of an MMX/SSE/SSE2 data-movement or integer instruction.
pub fn handler(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    use op::*;
    let h: Handler = match i.mnemonic() {
        Paddb => pbin::<PADDB>,
        Paddw => pbin::<PADDW>,
        Paddd => pbin::<PADDD>,
        Paddq => pbin::<PADDQ>,
        Psubb => pbin::<PSUBB>,
        Psubw => pbin::<PSUBW>,
        Psubd => pbin::<PSUBD>,
        Psubq => pbin::<PSUBQ>,
        Paddsb => pbin::<PADDSB>,
        Paddsw => pbin::<PADDSW>,
        Paddusb => pbin::<PADDUSB>,
        Paddusw => pbin::<PADDUSW>,
        Psubsb => pbin::<PSUBSB>,
        Psubsw => pbin::<PSUBSW>,
        Psubusb => pbin::<PSUBUSB>,
        Psubusw => pbin::<PSUBUSW>,
        Pmullw => pbin::<PMULLW>,
        Pmulhw => pbin::<PMULHW>,
        Pmulhuw => pbin::<PMULHUW>,
        Pmuludq => pbin::<PMULUDQ>,
        Pmaddwd => pbin::<PMADDWD>,
        Pavgb => pbin::<PAVGB>,
        Pavgw => pbin::<PAVGW>,
        Pminub => pbin::<PMINUB>,
        Pmaxub => pbin::<PMAXUB>,
        Pminsw => pbin::<PMINSW>,
        Pmaxsw => pbin::<PMAXSW>,
        Psadbw => pbin::<PSADBW>,
        Pcmpeqb => pbin::<PCMPEQB>,
        Pcmpeqw => pbin::<PCMPEQW>,
        Pcmpeqd => pbin::<PCMPEQD>,
        Pcmpgtb => pbin::<PCMPGTB>,
        Pcmpgtw => pbin::<PCMPGTW>,
        Pcmpgtd => pbin::<PCMPGTD>,
        Pand | Andps | Andpd => pbin::<AND>,
        Pandn | Andnps | Andnpd => pbin::<ANDN>,
        Por | Orps | Orpd => pbin::<OR>,
        Pxor | Xorps | Xorpd => pbin::<XOR>,
        Packsswb => pbin::<PACKSSWB>,
        Packssdw => pbin::<PACKSSDW>,
        Packuswb => pbin::<PACKUSWB>,
        Punpcklbw => pbin::<PUNPCKLBW>,
        Punpcklwd => pbin::<PUNPCKLWD>,
        Punpckldq | Unpcklps => pbin::<PUNPCKLDQ>,
        Punpcklqdq | Unpcklpd => pbin::<PUNPCKLQDQ>,
        Punpckhbw => pbin::<PUNPCKHBW>,
        Punpckhwd => pbin::<PUNPCKHWD>,
        Punpckhdq | Unpckhps => pbin::<PUNPCKHDQ>,
        Punpckhqdq | Unpckhpd => pbin::<PUNPCKHQDQ>,
        Psllw => pbin::<PSLLW>,
        Pslld => pbin::<PSLLD>,
        Psllq => pbin::<PSLLQ>,
        Psrlw => pbin::<PSRLW>,
        Psrld => pbin::<PSRLD>,
        Psrlq => pbin::<PSRLQ>,
        Psraw => pbin::<PSRAW>,
        Psrad => pbin::<PSRAD>,
        Pslldq => pbin::<PSLLDQ>,
        Psrldq => pbin::<PSRLDQ>,
        Pshufd => pshuf::<0>,
        Pshuflw => pshuf::<1>,
        Pshufhw => pshuf::<2>,
        Pshufw => pshuf::<3>,
        Shufps => pshuf::<4>,
        Shufpd => pshuf::<5>,
        Pinsrw => pinsrw,
        Pextrw => pextrw,
        Movmskps => movmsk::<4>,
        Movmskpd => movmsk::<8>,
        Pmovmskb => movmsk::<1>,
        Movaps | Movapd | Movdqa | Movntps | Movntpd | Movntdq => mov_full::<true>,
        Movups | Movupd | Movdqu | Movntq => mov_full::<false>,
        Movd | Movq2dq | Movdq2q => mov_zx,
        Movq => match i.code() {
            Code::Movq_mm_mmm64 | Code::Movq_mmm64_mm => mov_full::<false>,
            _ => mov_zx,
        },
        Movss => mov_scalar::<4>,
        Movsd if matches!(i.code(), Code::Movsd_xmm_xmmm64 | Code::Movsd_xmmm64_xmm) => {
            mov_scalar::<8>
        }
        Movlps | Movlpd => mov_half::<false, false>,
        Movhps | Movhpd => mov_half::<true, true>,
        Movhlps => mov_half::<false, true>,
        Movlhps => mov_half::<true, false>,
        Movnti => movnti,
        Maskmovq | Maskmovdqu => maskmov,
        Emms => emms,
        _ => return None,
    };
    Some(h)
}
