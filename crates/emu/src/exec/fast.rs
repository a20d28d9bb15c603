//! Specialized handlers for the most frequent instruction forms: register operands resolved
//! to register numbers and immediates/branch targets precomputed at decode time
//! ([`Insn::a`], [`Insn::b`], [`Insn::imm`]), operand size as a constant. Everything else
//! takes the general handlers, which give the same results.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind};

use super::alu::{ADC, ADD, AND, CMP, OR, SBB, SUB, TEST, XOR, add_flags, calc, cond, sub_flags};
use super::flow::set_rip;
use super::{Handler, gpr_number};
use crate::block::Insn;
use crate::cpu::fl;
use crate::machine::{Machine, R};

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
    m.push(v & super::mask(S), S)
}

fn pop_r<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let v = m.pop(S)?;
    m.set_gpr(x.a as usize, S, v);
    Ok(())
}

fn call_rel<const S: u64>(m: &mut Machine, x: &Insn) -> R<()> {
    let ret = m.cpu.rip;
    set_rip(m, x.imm)?;
    if let Err(e) = m.push(ret, S) {
        m.cpu.rip = ret;
        return Err(e);
    }
    Ok(())
}

fn ret_near<const S: u64>(m: &mut Machine, _: &Insn) -> R<()> {
    let t = m.peek(0, S)? & super::mask(S);
    set_rip(m, t)?;
    let sp = m.cpu.gpr[4].wrapping_add(S);
    m.set_sp(sp);
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

fn is_imm(k: OpKind) -> bool {
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
