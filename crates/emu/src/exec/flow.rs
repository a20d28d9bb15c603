//! Control transfers: jumps, calls, returns, loops and software interrupts.

use iced_x86::{Instruction, Mnemonic, OpKind};
use palacios_vmm::intercept::SyscallAbi;

use super::alu::cond;
use super::interrupt::{self, Source};
use super::muldiv::sext;
use super::{Handler, mask};
use crate::block::Insn;
use crate::cpu::{CS, Mode, fl};
use crate::machine::{BR, Fault, Machine, OF, R, canonical, gp, ud};

/// Set RIP to a near target after the CS limit (or canonical) check.
#[inline]
pub fn set_rip(m: &mut Machine, target: u64) -> R<()> {
    match m.cpu.mode {
        Mode::Long64 => {
            if !canonical(target) {
                return Err(gp(0));
            }
        }
        Mode::Real => {}
        _ => {
            if target > u64::from(m.cpu.seg[CS].limit) {
                return Err(gp(0));
            }
        }
    }
    m.cpu.rip = target;
    Ok(())
}

fn jmp_rel(m: &mut Machine, x: &Insn) -> R<()> {
    set_rip(m, x.i.near_branch_target())
}

fn jcc(m: &mut Machine, x: &Insn) -> R<()> {
    if cond(x.i.condition_code(), m.cpu.flags) {
        set_rip(m, x.i.near_branch_target())?;
    }
    Ok(())
}

/// The operand-size mask of a near indirect branch target.
fn target_of(m: &mut Machine, x: &Insn) -> R<u64> {
    let size = u64::from(x.osz);
    Ok(m.rd(x, 0, size)? & mask(size))
}

fn jmp_ind(m: &mut Machine, x: &Insn) -> R<()> {
    let t = target_of(m, x)?;
    set_rip(m, t)
}

fn call_rel(m: &mut Machine, x: &Insn) -> R<()> {
    let size = (-x.i.stack_pointer_increment()) as u64;
    let ret = m.cpu.rip;
    let target = x.i.near_branch_target();
    let old = m.cpu.rip;
    set_rip(m, target)?;
    if let Err(e) = m.push(ret & mask(size), size) {
        m.cpu.rip = old;
        return Err(e);
    }
    Ok(())
}

fn call_ind(m: &mut Machine, x: &Insn) -> R<()> {
    let size = (-x.i.stack_pointer_increment()) as u64;
    let ret = m.cpu.rip;
    let t = target_of(m, x)?;
    set_rip(m, t)?;
    if let Err(e) = m.push(ret & mask(size), size) {
        m.cpu.rip = ret;
        return Err(e);
    }
    Ok(())
}

fn ret(m: &mut Machine, x: &Insn) -> R<()> {
    let size = if x.i.op_count() == 1 {
        (x.i.stack_pointer_increment() as u64).wrapping_sub(u64::from(x.i.immediate16()))
    } else {
        x.i.stack_pointer_increment() as u64
    };
    let extra = if x.i.op_count() == 1 {
        u64::from(x.i.immediate16())
    } else {
        0
    };
    let t = m.peek(0, size)? & mask(size);
    set_rip(m, t)?;
    let sp = m.cpu.gpr[4].wrapping_add(size + extra);
    m.set_sp(sp);
    Ok(())
}

/// The count register of LOOP/JCXZ at the instruction's address size (CX, ECX or RCX; an
/// address-size prefix changes it, which the code tells).
fn counter_mask(x: &Insn) -> u64 {
    use iced_x86::Code::*;
    match x.i.code() {
        Loopne_rel8_16_CX | Loopne_rel8_32_CX | Loope_rel8_16_CX | Loope_rel8_32_CX
        | Loop_rel8_16_CX | Loop_rel8_32_CX | Jcxz_rel8_16 | Jcxz_rel8_32 => 0xffff,
        Loopne_rel8_16_ECX | Loopne_rel8_32_ECX | Loopne_rel8_64_ECX | Loope_rel8_16_ECX
        | Loope_rel8_32_ECX | Loope_rel8_64_ECX | Loop_rel8_16_ECX | Loop_rel8_32_ECX
        | Loop_rel8_64_ECX | Jecxz_rel8_16 | Jecxz_rel8_32 | Jecxz_rel8_64 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn loop_<const KIND: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let cm = counter_mask(x);
    let c = m.cpu.gpr[1].wrapping_sub(1) & cm;
    let zf = m.cpu.flags & fl::ZF != 0;
    let take = c != 0
        && match KIND {
            1 => zf,  // LOOPE
            2 => !zf, // LOOPNE
            _ => true,
        };
    if take {
        set_rip(m, x.i.near_branch_target())?;
    }
    m.cpu.gpr[1] = (m.cpu.gpr[1] & !cm) | c;
    if cm == 0xffff_ffff {
        m.cpu.gpr[1] &= 0xffff_ffff;
    }
    Ok(())
}

fn jcxz(m: &mut Machine, x: &Insn) -> R<()> {
    if m.cpu.gpr[1] & counter_mask(x) == 0 {
        set_rip(m, x.i.near_branch_target())?;
    }
    Ok(())
}

fn int_n(m: &mut Machine, x: &Insn) -> R<()> {
    let v = x.i.immediate8();
    if v == 0x80 {
        m.syscall_intercept(SyscallAbi::Int80, m.cpu.gpr[0] & 0xffff_ffff, x.i.len())?;
    }
    interrupt::deliver(m, v, Source::Software, None)
}

fn int3(m: &mut Machine, _: &Insn) -> R<()> {
    interrupt::deliver(m, 3, Source::SoftwareException, None)
}

fn int1(m: &mut Machine, _: &Insn) -> R<()> {
    interrupt::deliver(m, 1, Source::Privileged, None)
}

fn into(m: &mut Machine, _: &Insn) -> R<()> {
    if m.cpu.flags & fl::OF != 0 {
        return interrupt::deliver(m, OF, Source::SoftwareException, None);
    }
    Ok(())
}

/// BOUND: #BR unless lower <= index <= upper, signed at the operand size (the bounds pair is
/// in memory).
fn bound(m: &mut Machine, x: &Insn) -> R<()> {
    let r = x.i.op0_register();
    let size = r.size() as u64;
    let seg = m.mseg(x);
    let off = m.ea(x);
    let lo = sext(m.read(seg, off, size)?, size);
    let hi = sext(m.read(seg, off.wrapping_add(size) & x.amask, size)?, size);
    let idx = sext(m.reg(r), size);
    if idx < lo || idx > hi {
        return Err(Fault::Exc(BR, None));
    }
    Ok(())
}

fn ud2(_: &mut Machine, _: &Insn) -> R<()> {
    Err(ud())
}

fn jmp_far(m: &mut Machine, x: &Insn) -> R<()> {
    let (sel, off) = far_pointer(m, x)?;
    super::seg::far_jump(m, sel, off, None)
}

fn call_far(m: &mut Machine, x: &Insn) -> R<()> {
    let (sel, off) = far_pointer(m, x)?;
    let size = (-x.i.stack_pointer_increment()) as u64 / 2;
    super::seg::far_jump(m, sel, off, Some(size))
}

/// The selector and offset of a far JMP/CALL (immediate or memory m16:16/32/64).
fn far_pointer(m: &mut Machine, x: &Insn) -> R<(u16, u64)> {
    match x.i.op0_kind() {
        OpKind::FarBranch16 => Ok((x.i.far_branch_selector(), u64::from(x.i.far_branch16()))),
        OpKind::FarBranch32 => Ok((x.i.far_branch_selector(), u64::from(x.i.far_branch32()))),
        OpKind::Memory => {
            let total = x.i.memory_size().size() as u64;
            let osz = total - 2;
            let seg = m.mseg(x);
            let off = m.ea(x);
            let o = m.read(seg, off, osz)?;
            let s = m.read(seg, off.wrapping_add(osz) & x.amask, 2)?;
            Ok((s as u16, o))
        }
        _ => Err(ud()),
    }
}

fn retf(m: &mut Machine, x: &Insn) -> R<()> {
    let imm = if x.i.op_count() == 1 {
        u64::from(x.i.immediate16())
    } else {
        0
    };
    use iced_x86::Code;
    let size = match x.i.code() {
        Code::Retfw | Code::Retfw_imm16 => 2,
        Code::Retfq | Code::Retfq_imm16 => 8,
        _ => 4,
    };
    super::seg::far_return(m, size, imm)
}

fn iret(m: &mut Machine, x: &Insn) -> R<()> {
    let size = match x.i.mnemonic() {
        Mnemonic::Iret => 2,
        Mnemonic::Iretd => 4,
        _ => 8,
    };
    let cpl = m.cpu.cpl;
    super::seg::iret(m, size)?;
    if cpl != m.cpu.cpl {
        m.note_user_entry();
    }
    Ok(())
}

pub fn handler(mn: Mnemonic, i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match mn {
        Jmp => match i.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => jmp_rel,
            OpKind::FarBranch16 | OpKind::FarBranch32 => jmp_far,
            OpKind::Memory if is_far_mem(i) => jmp_far,
            _ => jmp_ind,
        },
        Jo | Jno | Jb | Jae | Je | Jne | Jbe | Ja | Js | Jns | Jp | Jnp | Jl | Jge | Jle | Jg => {
            jcc
        }
        Call => match i.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => call_rel,
            OpKind::FarBranch16 | OpKind::FarBranch32 => call_far,
            OpKind::Memory if is_far_mem(i) => call_far,
            _ => call_ind,
        },
        Ret => ret,
        Retf => retf,
        Loop => loop_::<0>,
        Loope => loop_::<1>,
        Loopne => loop_::<2>,
        Jcxz | Jecxz | Jrcxz => jcxz,
        Int => int_n,
        Int3 => int3,
        Int1 => int1,
        Into => into,
        Bound => bound,
        Ud0 | Ud1 | Ud2 => ud2,
        Iret | Iretd | Iretq => iret,
        _ => return None,
    })
}

fn is_far_mem(i: &Instruction) -> bool {
    matches!(
        i.memory_size(),
        iced_x86::MemorySize::SegPtr16
            | iced_x86::MemorySize::SegPtr32
            | iced_x86::MemorySize::SegPtr64
    )
}
