//! Data movement: MOV and its extensions, LEA, exchanges, stack operations, conversions.

use std::sync::Mutex;

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::alu::{add_flags, sub_flags};
use super::muldiv::sext;
use super::{Handler, mask};
use crate::block::Insn;
use crate::cpu::{Mode, SS, fl};
use crate::machine::{Machine, R, gp, ud};
use crate::paging::Kind;

fn mov(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let v = m.rd(x, 1, size)?;
    m.wr(x, 0, size, v)
}

/// MOV r, r/m and MOV r/m, r with a register destination: the common fast case.
fn mov_rr(m: &mut Machine, x: &Insn) -> R<()> {
    let v = m.reg(x.i.op1_register());
    m.set_reg(x.i.op0_register(), v);
    Ok(())
}

fn mov_r_imm(m: &mut Machine, x: &Insn) -> R<()> {
    m.set_reg(x.i.op0_register(), x.i.immediate(1));
    Ok(())
}

fn mov_r_mem(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let off = m.ea(x);
    let v = m.read(m.mseg(x), off, size)?;
    m.set_reg(x.i.op0_register(), v);
    Ok(())
}

fn mov_mem_r(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let v = m.reg(x.i.op1_register());
    let off = m.ea(x);
    m.write(m.mseg(x), off, size, v)
}

/// MOV involving a segment register.
fn mov_sreg(m: &mut Machine, x: &Insn) -> R<()> {
    if x.i.op0_kind() == OpKind::Register && x.i.op0_register().is_segment_register() {
        let sel = m.rd(x, 1, 2)? as u16;
        let idx = x.i.op0_register() as usize - Register::ES as usize;
        if idx == crate::cpu::CS {
            return Err(ud());
        }
        super::seg::load_data_seg(m, idx, sel)?;
        if idx == SS {
            m.cpu.shadow = true;
        }
        Ok(())
    } else {
        let v = m.reg(x.i.op1_register());
        if x.i.op0_kind() == OpKind::Register {
            // A register destination gets the selector zero-extended (to 32 bits; 16 with 66h).
            let r = x.i.op0_register();
            if r.size() == 2 {
                m.set_reg(r, v);
            } else {
                m.set_reg(r.full_register32(), v);
            }
            Ok(())
        } else {
            m.wr(x, 0, 2, v)
        }
    }
}

fn movzx(m: &mut Machine, x: &Insn) -> R<()> {
    let src_size = src_size(x);
    let v = m.rd(x, 1, src_size)? & mask(src_size);
    m.set_reg(x.i.op0_register(), v);
    Ok(())
}

fn movsx(m: &mut Machine, x: &Insn) -> R<()> {
    let src_size = src_size(x);
    let v = sext(m.rd(x, 1, src_size)?, src_size) as u64;
    m.set_reg(x.i.op0_register(), v);
    Ok(())
}

fn src_size(x: &Insn) -> u64 {
    match x.i.op1_kind() {
        OpKind::Register => x.i.op1_register().size() as u64,
        _ => x.i.memory_size().size() as u64,
    }
}

fn movbe(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let v = m.rd(x, 1, size)?;
    let swapped = match size {
        2 => u64::from((v as u16).swap_bytes()),
        4 => u64::from((v as u32).swap_bytes()),
        _ => v.swap_bytes(),
    };
    m.wr(x, 0, size, swapped)
}

fn lea(m: &mut Machine, x: &Insn) -> R<()> {
    let r = x.i.op0_register();
    // The address is computed at the address size, then truncated to the operand size.
    let a = m.ea(x);
    m.set_reg(r, a & mask(r.size() as u64));
    Ok(())
}

fn xchg(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    if x.i.op0_kind() == OpKind::Register && x.i.op1_kind() == OpKind::Register {
        let (a, b) = (x.i.op0_register(), x.i.op1_register());
        let (va, vb) = (m.reg(a), m.reg(b));
        m.set_reg(a, vb);
        m.set_reg(b, va);
        return Ok(());
    }
    let reg = if x.i.op0_kind() == OpKind::Memory {
        x.i.op1_register()
    } else {
        x.i.op0_register()
    };
    let v = m.reg(reg);
    let lin = m.linear(m.mseg(x), m.ea(x), size, Kind::Write)?;
    let old = m.rmw_lin(lin, size, true, |_| v)?;
    m.set_reg(reg, old);
    Ok(())
}

fn xadd(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let src_r = x.i.op1_register();
    let src = m.reg(src_r) & mask(size);
    let (old, r) = if x.i.op0_kind() == OpKind::Register {
        let d = x.i.op0_register();
        let old = m.reg(d) & mask(size);
        let r = old.wrapping_add(src) & mask(size);
        m.set_reg(src_r, old);
        m.set_reg(d, r);
        (old, r)
    } else {
        let lin = m.linear(m.mseg(x), m.ea(x), size, Kind::Write)?;
        let old =
            m.rmw_lin(lin, size, x.i.has_lock_prefix(), |a| a.wrapping_add(src))? & mask(size);
        m.set_reg(src_r, old);
        (old, old.wrapping_add(src) & mask(size))
    };
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | add_flags(old, src, r, size);
    Ok(())
}

fn cmpxchg(m: &mut Machine, x: &Insn) -> R<()> {
    let size = u64::from(x.osz);
    let src = m.reg(x.i.op1_register());
    let acc = m.cpu.gpr[0] & mask(size);
    let old = if x.i.op0_kind() == OpKind::Register {
        let d = x.i.op0_register();
        let old = m.reg(d) & mask(size);
        if old == acc {
            m.set_reg(d, src);
        }
        old
    } else {
        let lin = m.linear(m.mseg(x), m.ea(x), size, Kind::Write)?;
        m.rmw_lin(lin, size, x.i.has_lock_prefix(), |a| {
            if a & mask(size) == acc { src } else { a }
        })? & mask(size)
    };
    let r = acc.wrapping_sub(old) & mask(size);
    m.cpu.flags = (m.cpu.flags & !fl::ARITH) | sub_flags(acc, old, r, size);
    if old != acc {
        m.set_gpr(0, size, old);
    }
    Ok(())
}

/// CMPXCHG16B has no 128-bit host atomic in stable Rust: it is serialized by this lock
/// (atomic against other CMPXCHG16Bs, which is what its users pair it with).
static WIDE_LOCK: Mutex<()> = Mutex::new(());

fn cmpxchg_wide(m: &mut Machine, x: &Insn) -> R<()> {
    let wide = x.i.mnemonic() == Mnemonic::Cmpxchg16b;
    let half = if wide { 8 } else { 4 };
    let seg = m.mseg(x);
    let off = m.ea(x);
    if wide && off & 15 != 0 {
        return Err(gp(0));
    }
    let lin = m.linear(seg, off, half * 2, Kind::Write)?;
    let mk = mask(half);
    let (ax, dx) = (m.cpu.gpr[0] & mk, m.cpu.gpr[2] & mk);
    let (bx, cx) = (m.cpu.gpr[3] & mk, m.cpu.gpr[1] & mk);
    let (lo, hi, equal);
    if !wide {
        let want = ax | (dx << 32);
        let new = bx | (cx << 32);
        let old = m.rmw_lin(lin, 8, x.i.has_lock_prefix(), |a| {
            if a == want { new } else { a }
        })?;
        lo = old & mk;
        hi = old >> 32;
        equal = old == want;
    } else {
        let _g = WIDE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        m.probe_write(seg, off, 16)?;
        let l = m.read_lin(lin, 8)?;
        let h = m.read_lin(lin + 8, 8)?;
        equal = l == ax && h == dx;
        if equal {
            m.write_lin(lin, 8, bx)?;
            m.write_lin(lin + 8, 8, cx)?;
        } else {
            // The processor writes the old value back.
            m.write_lin(lin, 8, l)?;
            m.write_lin(lin + 8, 8, h)?;
        }
        lo = l;
        hi = h;
    }
    if equal {
        m.cpu.flags |= fl::ZF;
    } else {
        m.cpu.flags &= !fl::ZF;
        m.set_gpr(0, half, lo);
        m.set_gpr(2, half, hi);
    }
    Ok(())
}

fn bswap(m: &mut Machine, x: &Insn) -> R<()> {
    let r = x.i.op0_register();
    let v = m.reg(r);
    let s = match r.size() {
        4 => u64::from((v as u32).swap_bytes()),
        8 => v.swap_bytes(),
        // BSWAP of a 16-bit register is undefined; Intel and AMD cores clear it.
        _ => 0,
    };
    m.set_reg(r, s);
    Ok(())
}

// ---- stack -----------------------------------------------------------------------------

fn push_size(x: &Insn) -> u64 {
    (-x.i.stack_pointer_increment()) as u64
}

fn push(m: &mut Machine, x: &Insn) -> R<()> {
    let size = push_size(x);
    let v = match x.i.op0_kind() {
        OpKind::Register => m.reg(x.i.op0_register()),
        OpKind::Memory => {
            let off = m.ea(x);
            m.read(m.mseg(x), off, size)?
        }
        _ => x.i.immediate(0),
    };
    m.push(v & mask(size), size)
}

fn pop(m: &mut Machine, x: &Insn) -> R<()> {
    let size = x.i.stack_pointer_increment() as u64;
    if x.i.op0_kind() == OpKind::Register {
        let r = x.i.op0_register();
        if r.is_segment_register() {
            let sel = m.peek(0, size)? as u16;
            let idx = r as usize - Register::ES as usize;
            super::seg::load_data_seg(m, idx, sel)?;
            let sp = m.cpu.gpr[4].wrapping_add(size);
            m.set_sp(sp);
            if idx == SS {
                m.cpu.shadow = true;
            }
            return Ok(());
        }
        let v = m.pop(size)?;
        m.set_reg(r, v);
        Ok(())
    } else {
        // POP to memory: the address is computed with the incremented stack pointer.
        let v = m.peek(0, size)?;
        let old_sp = m.cpu.gpr[4];
        m.set_sp(old_sp.wrapping_add(size));
        let off = m.ea(x);
        let r = m.write(m.mseg(x), off, size, v);
        if r.is_err() {
            m.cpu.gpr[4] = old_sp;
        }
        r
    }
}

fn pusha(m: &mut Machine, x: &Insn) -> R<()> {
    let size = if x.i.mnemonic() == Mnemonic::Pushad {
        4
    } else {
        2
    };
    let sp = m.cpu.gpr[4];
    let top = sp.wrapping_sub(8 * size) & m.sp_mask();
    m.probe_write(SS, top, 8 * size)?;
    for n in [0usize, 1, 2, 3, 4, 5, 6, 7] {
        let v = if n == 4 { sp } else { m.cpu.gpr[n] };
        m.push(v & mask(size), size)?;
    }
    Ok(())
}

fn popa(m: &mut Machine, x: &Insn) -> R<()> {
    let size = if x.i.mnemonic() == Mnemonic::Popad {
        4
    } else {
        2
    };
    let mut vals = [0u64; 8];
    for (k, v) in vals.iter_mut().enumerate() {
        *v = m.peek(k as u64 * size, size)?;
    }
    for (k, n) in [7usize, 6, 5, 4, 3, 2, 1, 0].into_iter().enumerate() {
        if n != 4 {
            m.set_gpr(n, size, vals[k]);
        }
    }
    let sp = m.cpu.gpr[4].wrapping_add(8 * size);
    m.set_sp(sp);
    Ok(())
}

fn enter(m: &mut Machine, x: &Insn) -> R<()> {
    // ENTER's stack-pointer increment covers the whole frame: the push size is the operand size.
    let size = match x.i.code() {
        iced_x86::Code::Enterw_imm16_imm8 => 2,
        iced_x86::Code::Enterd_imm16_imm8 => 4,
        _ => 8,
    };
    let alloc = u64::from(x.i.immediate16());
    let level = u64::from(x.i.immediate8_2nd()) & 31;
    let spm = m.sp_mask();
    let bp_mask = if m.cpu.mode == Mode::Long64 {
        u64::MAX
    } else {
        spm
    };
    let old_sp = m.cpu.gpr[4];
    let old_bp = m.cpu.gpr[5];
    // Check the whole frame is writable before changing anything.
    let frame_bytes = size * (level + 1) + alloc;
    let low = old_sp.wrapping_sub(frame_bytes) & spm;
    if frame_bytes > 0 {
        m.probe_write(SS, low, frame_bytes.min(4096).max(size))?;
    }
    m.push(old_bp & mask(size), size)?;
    let frame = m.cpu.gpr[4] & spm;
    let mut bp = old_bp;
    for _ in 1..level.max(1) {
        if level == 0 {
            break;
        }
        bp = bp.wrapping_sub(size) & bp_mask;
        let v = match m.read(SS, bp, size) {
            Ok(v) => v,
            Err(e) => {
                m.cpu.gpr[4] = old_sp;
                return Err(e);
            }
        };
        if let Err(e) = m.push(v, size) {
            m.cpu.gpr[4] = old_sp;
            return Err(e);
        }
    }
    if level > 0
        && let Err(e) = m.push(frame, size)
    {
        m.cpu.gpr[4] = old_sp;
        return Err(e);
    }
    m.set_gpr(5, size.min(if spm == 0xffff { 2 } else { 8 }), frame);
    let sp = (m.cpu.gpr[4].wrapping_sub(alloc)) & spm;
    m.set_sp(sp);
    Ok(())
}

fn leave(m: &mut Machine, x: &Insn) -> R<()> {
    // iced-x86 reports no stack-pointer increment for LEAVE (RSP comes from RBP).
    let size = match x.i.code() {
        iced_x86::Code::Leavew => 2,
        iced_x86::Code::Leaved => 4,
        _ => 8,
    };
    let spm = m.sp_mask();
    let bp = m.cpu.gpr[5] & spm;
    let v = m.read(SS, bp, size)?;
    m.set_sp(bp.wrapping_add(size));
    m.set_gpr(5, size, v);
    Ok(())
}

// ---- conversions and misc ------------------------------------------------------------------

fn convert<const OP: u8>(m: &mut Machine, _: &Insn) -> R<()> {
    let a = m.cpu.gpr[0];
    match OP {
        0 => m.set_gpr(0, 2, sext(a, 1) as u64),         // CBW
        1 => m.set_gpr(0, 4, sext(a, 2) as u64),         // CWDE
        2 => m.set_gpr(0, 8, sext(a, 4) as u64),         // CDQE
        3 => m.set_gpr(2, 2, (sext(a, 2) >> 16) as u64), // CWD
        4 => m.set_gpr(2, 4, (sext(a, 4) >> 32) as u64), // CDQ
        _ => m.set_gpr(2, 8, ((a as i64) >> 63) as u64), // CQO
    }
    Ok(())
}

fn xlat(m: &mut Machine, x: &Insn) -> R<()> {
    let off = (m.cpu.gpr[3].wrapping_add(m.cpu.gpr[0] & 0xff)) & x.amask;
    let v = m.read(m.mseg(x), off, 1)?;
    m.set_gpr(0, 1, v);
    Ok(())
}

fn nop(_: &mut Machine, _: &Insn) -> R<()> {
    Ok(())
}

/// CLFLUSH and friends: check the access like a read, then do nothing.
fn touch(m: &mut Machine, x: &Insn) -> R<()> {
    let off = m.ea(x);
    m.linear(m.mseg(x), off, 1, Kind::Read)?;
    Ok(())
}

pub fn handler(mn: Mnemonic, i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match mn {
        Mov => {
            let k0 = i.op0_kind();
            let k1 = i.op1_kind();
            let sreg = (k0 == OpKind::Register && i.op0_register().is_segment_register())
                || (k1 == OpKind::Register && i.op1_register().is_segment_register());
            if sreg {
                mov_sreg
            } else if k0 == OpKind::Register && i.op0_register().is_gpr() {
                match k1 {
                    OpKind::Register if i.op1_register().is_gpr() => mov_rr,
                    OpKind::Memory => mov_r_mem,
                    OpKind::Immediate8
                    | OpKind::Immediate16
                    | OpKind::Immediate32
                    | OpKind::Immediate64
                    | OpKind::Immediate32to64 => mov_r_imm,
                    _ => return None, // control/debug registers: system
                }
            } else if k0 == OpKind::Memory && k1 == OpKind::Register && i.op1_register().is_gpr() {
                mov_mem_r
            } else if k0 == OpKind::Register && !i.op0_register().is_gpr() {
                return None;
            } else if k1 == OpKind::Register && !i.op1_register().is_gpr() {
                return None;
            } else {
                mov
            }
        }
        Movzx => movzx,
        Movsx | Movsxd => movsx,
        Movbe => movbe,
        Lea => lea,
        Xchg => xchg,
        Xadd => xadd,
        Cmpxchg => cmpxchg,
        Cmpxchg8b | Cmpxchg16b => cmpxchg_wide,
        Bswap => bswap,
        Push => push,
        Pop => pop,
        Pusha | Pushad => pusha,
        Popa | Popad => popa,
        Enter => enter,
        Leave => leave,
        Cbw => convert::<0>,
        Cwde => convert::<1>,
        Cdqe => convert::<2>,
        Cwd => convert::<3>,
        Cdq => convert::<4>,
        Cqo => convert::<5>,
        Xlatb => xlat,
        Nop | Endbr32 | Endbr64 | Lfence | Mfence | Sfence | Pause => nop,
        Prefetch | Prefetchnta | Prefetcht0 | Prefetcht1 | Prefetcht2 | Prefetchw => nop,
        Clflush | Clflushopt => touch,
        _ => return None,
    })
}
