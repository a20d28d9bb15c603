//! Specialized handlers for the most frequent instruction forms: register operands resolved
//! to register numbers and immediates/branch targets precomputed at decode time
//! ([`Insn::a`], [`Insn::b`], [`Insn::imm`]), operand size as a constant. Everything else
//! takes the general handlers, which give the same results.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind};

use super::alu::{
    ADC, ADD, AND, CMP, OR, RCL, RCR, ROL, ROR, SAR, SBB, SHL, SHR, SUB, TEST, XOR, add_flags,
    calc, cond, shift, sub_flags,
};
use super::flow::set_rip;
use super::muldiv::sext;
use super::{Handler, gpr_number};
use crate::block::Insn;
use crate::cpu::fl;
use crate::machine::{Machine, R};
use crate::paging::Kind;

#[inline(always)]
fn writes(op: u8) -> bool {
    op != CMP && op != TEST
}

fn alu_rr<const OP: u8, const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let a = m.cpu.gpr[x.a as usize];
    let b = m.cpu.gpr[x.b as usize];
    let (r, f) = calc(OP, a, b, m.cpu.flags & fl::CF, S);
    if writes(OP) {
        m.set_gpr(x.a as usize, S, r);
    }
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | f;
    Ok(())
}

fn alu_ri<const OP: u8, const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let a = m.cpu.gpr[x.a as usize];
    let (r, f) = calc(OP, a, x.imm, m.cpu.flags & fl::CF, S);
    if writes(OP) {
        m.set_gpr(x.a as usize, S, r);
    }
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | f;
    Ok(())
}

fn alu_rm<const OP: u8, const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let off = m.ea(x);
    let b = m.read(m.mseg(x), off, S)?;
    let a = m.cpu.gpr[x.a as usize];
    let (r, f) = calc(OP, a, b, m.cpu.flags & fl::CF, S);
    if writes(OP) {
        m.set_gpr(x.a as usize, S, r);
    }
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | f;
    Ok(())
}

fn incdec_r<const DEC: bool, const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let a = m.cpu.gpr[x.a as usize] & super::mask(S);
    let (r, f) = if DEC {
        let r = a.wrapping_sub(1) & super::mask(S);
        (r, sub_flags(a, 1, r, S))
    } else {
        let r = a.wrapping_add(1) & super::mask(S);
        (r, add_flags(a, 1, r, S))
    };
    m.set_gpr(x.a as usize, S, r);
    m.cpu.flags = (m.cpu.flags & !(fl::ARITH & !fl::CF)) | (f & !fl::CF);
    Ok(())
}

fn mov_rr<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let v = m.cpu.gpr[x.b as usize];
    m.set_gpr(x.a as usize, S, v);
    Ok(())
}

fn mov_ri<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    m.set_gpr(x.a as usize, S, x.imm);
    Ok(())
}

fn mov_rm<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let off = m.ea(x);
    let v = m.read(m.mseg(x), off, S)?;
    m.set_gpr(x.a as usize, S, v);
    Ok(())
}

fn mov_mr<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let off = m.ea(x);
    let v = m.cpu.gpr[x.b as usize];
    m.write(m.mseg(x), off, S, v)
}

fn jcc<const CC: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let cc: ConditionCode = match CC {
        0 => ConditionCode::o,
        1 => ConditionCode::no,
        2 => ConditionCode::b,
        3 => ConditionCode::ae,
        4 => ConditionCode::e,
        5 => ConditionCode::ne,
        6 => ConditionCode::be,
        7 => ConditionCode::a,
        8 => ConditionCode::s,
        9 => ConditionCode::ns,
        10 => ConditionCode::p,
        11 => ConditionCode::np,
        12 => ConditionCode::l,
        13 => ConditionCode::ge,
        14 => ConditionCode::le,
        _ => ConditionCode::g,
    };
    if cond(cc, m.cpu.flags) {
        set_rip(m, x.imm)?;
    }
    Ok(())
}

fn jmp(m: &mut Machine, x: &Insn) -> R<()> {
    set_rip(m, x.imm)
}

fn push_r<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let v = m.cpu.gpr[x.a as usize];
    if S == 8 && m.cpu.mode == crate::cpu::Mode::Long64 {
        return push64(m, v);
    }
    m.push(v & super::mask(S), S)
}

fn pop_r<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let v = m.pop(S)?;
    m.set_gpr(x.a as usize, S, v);
    Ok(())
}

/// 64-bit mode: push a quadword (SS has no base or limit there).
#[inline(always)]
fn push64(m: &mut Machine, v: u64) -> R<()> {
    let sp = m.cpu.gpr[4].wrapping_sub(8);
    if !crate::machine::canonical(sp) {
        return Err(crate::machine::Fault::Exc(crate::machine::SSF, Some(0)));
    }
    m.write_lin(sp, 8, v)?;
    m.cpu.gpr[4] = sp;
    Ok(())
}

fn call_rel<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let ret = m.cpu.rip;
    if S == 8 && m.cpu.mode == crate::cpu::Mode::Long64 {
        if !crate::machine::canonical(x.imm) {
            return Err(crate::machine::gp(0));
        }
        push64(m, ret)?;
        m.cpu.rip = x.imm;
        return Ok(());
    }
    set_rip(m, x.imm)?;
    if let Err(e) = m.push(ret, S) {
        m.cpu.rip = ret;
        return Err(e);
    }
    Ok(())
}

fn ret_near<const S: u64>(m: &mut Machine, _: &Insn) -> R<()> {
    if S == 8 && m.cpu.mode == crate::cpu::Mode::Long64 {
        let sp = m.cpu.gpr[4];
        if !crate::machine::canonical(sp) || !crate::machine::canonical(sp.wrapping_add(7)) {
            return Err(crate::machine::Fault::Exc(crate::machine::SSF, Some(0)));
        }
        let t = m.read_lin(sp, 8)?;
        if !crate::machine::canonical(t) {
            return Err(crate::machine::gp(0));
        }
        m.cpu.rip = t;
        m.cpu.gpr[4] = sp.wrapping_add(8);
        return Ok(());
    }
    let t = m.peek(0, S)? & super::mask(S);
    set_rip(m, t)?;
    let sp = m.cpu.gpr[4].wrapping_add(S);
    m.set_sp(sp);
    Ok(())
}

/// ALU r/m, reg or r/m, imm with a memory destination (no LOCK).
fn alu_m<const OP: u8, const S: u64, const IMM: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    let seg = m.mseg(x);
    let off = m.ea(x);
    let b = if IMM { x.imm } else { m.cpu.gpr[x.b as usize] };
    let cf = m.cpu.flags & fl::CF;
    let f = if writes(OP) {
        let lin = m.linear(seg, off, S, Kind::Write)?;
        let mut flags = 0;
        m.rmw_lin(lin, S, false, |a| {
            let (r, f) = calc(OP, a, b, cf, S);
            flags = f;
            r
        })?;
        flags
    } else {
        let a = m.read(seg, off, S)?;
        calc(OP, a, b, cf, S).1
    };
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | f;
    Ok(())
}

/// Shift or rotate of a register by an immediate (or 1) or by CL.
fn shift_r<const OP: u8, const S: u64, const CL: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    let raw = if CL { m.cpu.gpr[1] } else { x.imm };
    let count = raw & if S == 8 { 0x3f } else { 0x1f };
    let a = m.cpu.gpr[x.a as usize];
    if count == 0 {
        // Flags stay; a 32-bit destination is still written (zero-extended).
        m.set_gpr(x.a as usize, S, a);
        return Ok(());
    }
    let (r, f) = shift(OP, a, count, S, m.cpu.flags);
    m.set_gpr(x.a as usize, S, r);
    m.cpu.flags = f;
    Ok(())
}

fn setcc_r(m: &mut Machine, x: &Insn) -> R<()> {
    let v = cond(x.i.condition_code(), m.cpu.flags) as u64;
    m.set_gpr(x.a as usize, 1, v);
    Ok(())
}

/// MOVZX/MOVSX from a register or memory of `SRC` bytes.
fn movx<const SRC: u64, const SIGN: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    let v = if x.b != 0xff {
        m.cpu.gpr[x.b as usize]
    } else {
        let off = m.ea(x);
        m.read(m.mseg(x), off, SRC)?
    };
    let v = if SIGN {
        sext(v, SRC) as u64
    } else {
        v & super::mask(SRC)
    };
    m.set_gpr(x.a as usize, u64::from(x.osz), v);
    Ok(())
}

fn mov_mi<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let off = m.ea(x);
    m.write(m.mseg(x), off, S, x.imm)
}

fn push_i<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    // The immediate is sign-extended to the stack width (not to `Insn::osz`).
    m.push(x.i.immediate(0) & super::mask(S), S)
}

fn lea_r(m: &mut Machine, x: &Insn) -> R<()> {
    let a = m.ea(x);
    let s = u64::from(x.osz);
    m.set_gpr(x.a as usize, s, a & super::mask(s));
    Ok(())
}

macro_rules! by_size {
    ($f:ident, $s:expr $(, $c:expr)?) => {
        match $s {
            1 => $f::<$($c,)? 1>,
            2 => $f::<$($c,)? 2>,
            4 => $f::<$($c,)? 4>,
            _ => $f::<$($c,)? 8>,
        }
    };
}

fn alu_op(mn: Mnemonic) -> Option<u8> {
    use Mnemonic::*;
    Some(match mn {
        Add => ADD,
        Or => OR,
        Adc => ADC,
        Sbb => SBB,
        And => AND,
        Sub => SUB,
        Xor => XOR,
        Cmp => CMP,
        Test => TEST,
        _ => return None,
    })
}

macro_rules! alu_by_op {
    ($f:ident, $op:expr, $s:expr) => {
        match $op {
            ADD => by_size!($f, $s, ADD),
            OR => by_size!($f, $s, OR),
            ADC => by_size!($f, $s, ADC),
            SBB => by_size!($f, $s, SBB),
            AND => by_size!($f, $s, AND),
            SUB => by_size!($f, $s, SUB),
            XOR => by_size!($f, $s, XOR),
            CMP => by_size!($f, $s, CMP),
            _ => by_size!($f, $s, TEST),
        }
    };
}

pub(crate) fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// A specialized handler for `i`, if it has one of the covered forms.
pub fn handler(i: &Instruction) -> Option<Handler> {
    let mn = i.mnemonic();
    let reg = |n: u32| i.op_kind(n) == OpKind::Register && gpr_number(i.op_register(n)).is_some();
    let size = |n: u32| i.op_register(n).size() as u64;
    if i.has_lock_prefix() {
        return None;
    }
    if let Some(op) = alu_op(mn) {
        if i.op_count() == 2 && i.op0_kind() == OpKind::Memory {
            let s = i.memory_size().size() as u64;
            if !matches!(s, 1 | 2 | 4 | 8) {
                return None;
            }
            macro_rules! m_forms {
                ($imm:expr) => {
                    match (op, s) {
                        (ADD, 1) => alu_m::<ADD, 1, $imm>,
                        (ADD, 2) => alu_m::<ADD, 2, $imm>,
                        (ADD, 4) => alu_m::<ADD, 4, $imm>,
                        (ADD, _) => alu_m::<ADD, 8, $imm>,
                        (OR, 1) => alu_m::<OR, 1, $imm>,
                        (OR, 2) => alu_m::<OR, 2, $imm>,
                        (OR, 4) => alu_m::<OR, 4, $imm>,
                        (OR, _) => alu_m::<OR, 8, $imm>,
                        (ADC, 1) => alu_m::<ADC, 1, $imm>,
                        (ADC, 2) => alu_m::<ADC, 2, $imm>,
                        (ADC, 4) => alu_m::<ADC, 4, $imm>,
                        (ADC, _) => alu_m::<ADC, 8, $imm>,
                        (SBB, 1) => alu_m::<SBB, 1, $imm>,
                        (SBB, 2) => alu_m::<SBB, 2, $imm>,
                        (SBB, 4) => alu_m::<SBB, 4, $imm>,
                        (SBB, _) => alu_m::<SBB, 8, $imm>,
                        (AND, 1) => alu_m::<AND, 1, $imm>,
                        (AND, 2) => alu_m::<AND, 2, $imm>,
                        (AND, 4) => alu_m::<AND, 4, $imm>,
                        (AND, _) => alu_m::<AND, 8, $imm>,
                        (SUB, 1) => alu_m::<SUB, 1, $imm>,
                        (SUB, 2) => alu_m::<SUB, 2, $imm>,
                        (SUB, 4) => alu_m::<SUB, 4, $imm>,
                        (SUB, _) => alu_m::<SUB, 8, $imm>,
                        (XOR, 1) => alu_m::<XOR, 1, $imm>,
                        (XOR, 2) => alu_m::<XOR, 2, $imm>,
                        (XOR, 4) => alu_m::<XOR, 4, $imm>,
                        (XOR, _) => alu_m::<XOR, 8, $imm>,
                        (CMP, 1) => alu_m::<CMP, 1, $imm>,
                        (CMP, 2) => alu_m::<CMP, 2, $imm>,
                        (CMP, 4) => alu_m::<CMP, 4, $imm>,
                        (CMP, _) => alu_m::<CMP, 8, $imm>,
                        (_, 1) => alu_m::<TEST, 1, $imm>,
                        (_, 2) => alu_m::<TEST, 2, $imm>,
                        (_, 4) => alu_m::<TEST, 4, $imm>,
                        (_, _) => alu_m::<TEST, 8, $imm>,
                    }
                };
            }
            if reg(1) && size(1) == s {
                return Some(m_forms!(false));
            }
            if is_imm(i.op1_kind()) {
                return Some(m_forms!(true));
            }
            return None;
        }
        if i.op_count() == 2 && reg(0) {
            let s = size(0);
            if reg(1) {
                return Some(alu_by_op!(alu_rr, op, s));
            }
            if is_imm(i.op1_kind()) {
                return Some(alu_by_op!(alu_ri, op, s));
            }
            if i.op1_kind() == OpKind::Memory {
                return Some(alu_by_op!(alu_rm, op, s));
            }
        }
        return None;
    }
    use Mnemonic::*;
    Some(match mn {
        Inc | Dec if i.op_count() == 1 && reg(0) => {
            if mn == Dec {
                by_size!(incdec_r, size(0), true)
            } else {
                by_size!(incdec_r, size(0), false)
            }
        }
        Mov if i.op_count() == 2 && reg(0) && reg(1) => by_size!(mov_rr, size(0)),
        Mov if reg(0) && is_imm(i.op1_kind()) => by_size!(mov_ri, size(0)),
        Mov if reg(0) && i.op1_kind() == OpKind::Memory => by_size!(mov_rm, size(0)),
        Mov if i.op0_kind() == OpKind::Memory && reg(1) => by_size!(mov_mr, size(1)),
        Mov if i.op0_kind() == OpKind::Memory && is_imm(i.op1_kind()) => {
            by_size!(mov_mi, i.memory_size().size() as u64)
        }
        Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr if reg(0) => {
            let cl = i.op_count() == 2 && i.op1_kind() == OpKind::Register;
            if i.op_count() == 2 && !cl && !is_imm(i.op1_kind()) {
                return None;
            }
            let op = match mn {
                Shl | Sal => SHL,
                Shr => SHR,
                Sar => SAR,
                Rol => ROL,
                Ror => ROR,
                Rcl => RCL,
                _ => RCR,
            };
            macro_rules! sh {
                ($cl:expr) => {
                    match (op, size(0)) {
                        (SHL, 1) => shift_r::<SHL, 1, $cl>,
                        (SHL, 2) => shift_r::<SHL, 2, $cl>,
                        (SHL, 4) => shift_r::<SHL, 4, $cl>,
                        (SHL, _) => shift_r::<SHL, 8, $cl>,
                        (SHR, 1) => shift_r::<SHR, 1, $cl>,
                        (SHR, 2) => shift_r::<SHR, 2, $cl>,
                        (SHR, 4) => shift_r::<SHR, 4, $cl>,
                        (SHR, _) => shift_r::<SHR, 8, $cl>,
                        (SAR, 1) => shift_r::<SAR, 1, $cl>,
                        (SAR, 2) => shift_r::<SAR, 2, $cl>,
                        (SAR, 4) => shift_r::<SAR, 4, $cl>,
                        (SAR, _) => shift_r::<SAR, 8, $cl>,
                        (ROL, 1) => shift_r::<ROL, 1, $cl>,
                        (ROL, 2) => shift_r::<ROL, 2, $cl>,
                        (ROL, 4) => shift_r::<ROL, 4, $cl>,
                        (ROL, _) => shift_r::<ROL, 8, $cl>,
                        (ROR, 1) => shift_r::<ROR, 1, $cl>,
                        (ROR, 2) => shift_r::<ROR, 2, $cl>,
                        (ROR, 4) => shift_r::<ROR, 4, $cl>,
                        (ROR, _) => shift_r::<ROR, 8, $cl>,
                        (RCL, 1) => shift_r::<RCL, 1, $cl>,
                        (RCL, 2) => shift_r::<RCL, 2, $cl>,
                        (RCL, 4) => shift_r::<RCL, 4, $cl>,
                        (RCL, _) => shift_r::<RCL, 8, $cl>,
                        (_, 1) => shift_r::<RCR, 1, $cl>,
                        (_, 2) => shift_r::<RCR, 2, $cl>,
                        (_, 4) => shift_r::<RCR, 4, $cl>,
                        (_, _) => shift_r::<RCR, 8, $cl>,
                    }
                };
            }
            if cl { sh!(true) } else { sh!(false) }
        }
        Seto | Setno | Setb | Setae | Sete | Setne | Setbe | Seta | Sets | Setns | Setp | Setnp
        | Setl | Setge | Setle | Setg
            if reg(0) =>
        {
            setcc_r
        }
        Movzx | Movsx if reg(0) && (reg(1) || i.op1_kind() == OpKind::Memory) => {
            let src = if reg(1) {
                size(1)
            } else {
                i.memory_size().size() as u64
            };
            match (mn == Movsx, src) {
                (false, 1) => movx::<1, false>,
                (false, _) => movx::<2, false>,
                (true, 1) => movx::<1, true>,
                (true, _) => movx::<2, true>,
            }
        }
        Movsxd if reg(0) && size(0) == 8 && (reg(1) || i.op1_kind() == OpKind::Memory) => {
            movx::<4, true>
        }
        Push if is_imm(i.op0_kind()) => by_size!(push_i, (-i.stack_pointer_increment()) as u64),
        Lea if reg(0) => lea_r,
        Jo | Jno | Jb | Jae | Je | Jne | Jbe | Ja | Js | Jns | Jp | Jnp | Jl | Jge | Jle | Jg => {
            let cc = i.condition_code() as u8 - ConditionCode::o as u8;
            match cc {
                0 => jcc::<0>,
                1 => jcc::<1>,
                2 => jcc::<2>,
                3 => jcc::<3>,
                4 => jcc::<4>,
                5 => jcc::<5>,
                6 => jcc::<6>,
                7 => jcc::<7>,
                8 => jcc::<8>,
                9 => jcc::<9>,
                10 => jcc::<10>,
                11 => jcc::<11>,
                12 => jcc::<12>,
                13 => jcc::<13>,
                14 => jcc::<14>,
                _ => jcc::<15>,
            }
        }
        Jmp if matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) =>
        {
            jmp
        }
        Push if reg(0) => by_size!(push_r, (-i.stack_pointer_increment()) as u64),
        Pop if reg(0) => by_size!(pop_r, i.stack_pointer_increment() as u64),
        Call if matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) =>
        {
            by_size!(call_rel, (-i.stack_pointer_increment()) as u64)
        }
        Ret if i.op_count() == 0 => by_size!(ret_near, i.stack_pointer_increment() as u64),
        _ => return None,
    })
}
