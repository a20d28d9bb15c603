//! x87/SSE control and state instructions: FNINIT, FNCLEX, FLDCW/FNSTCW, FNSTSW, FNSTENV/
//! FLDENV, FNSAVE/FRSTOR, WAIT, FXSAVE/FXRSTOR (both layouts), LDMXCSR/STMXCSR.
//!
//! FNSTENV/FNSAVE always use the protected-mode layouts (14/28-byte environment by operand
//! size), also in real mode, where hardware stores 20-bit linear pointers instead.

use iced_x86::{Instruction, MemorySize, Mnemonic, Register};
use palacios_x86::cr0;

use super::Handler;
use super::sse::{nm, sse_ok, x87_pending};
use crate::block::Insn;
use crate::cpu::Mode;
use crate::fpu::{MXCSR_MASK, sw};
use crate::machine::{Machine, R, gp};

/// #NM with CR0.EM or CR0.TS (every x87 instruction and FXSAVE/FXRSTOR).
fn x87_ok(m: &Machine) -> R<()> {
    if m.cpu.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(nm());
    }
    Ok(())
}

/// Whether the mnemonic is the waiting form (FINIT, FSTSW, ... decoded with their 9B).
fn waits(x: &Insn) -> bool {
    use Mnemonic::*;
    matches!(
        x.i.mnemonic(),
        Finit | Fclex | Fstcw | Fstsw | Fstenv | Fsave | Fldcw | Fldenv | Frstor
    )
}

fn check(m: &Machine, x: &Insn) -> R<()> {
    x87_ok(m)?;
    if waits(x) {
        x87_pending(m)?;
    }
    Ok(())
}

/// ES and B follow whether any unmasked exception flag is set (after FCW or FSW loads).
fn update_es(m: &mut Machine) {
    let f = &mut m.cpu.fpu;
    if f.fsw & !f.fcw & sw::EXC != 0 {
        f.fsw |= sw::ES | sw::B;
    } else {
        f.fsw &= !(sw::ES | sw::B);
    }
}

fn finit(m: &mut Machine, x: &Insn) -> R<()> {
    check(m, x)?;
    m.cpu.fpu.init();
    Ok(())
}

fn fclex(m: &mut Machine, x: &Insn) -> R<()> {
    check(m, x)?;
    m.cpu.fpu.fsw &= !(sw::EXC | sw::SF | sw::ES | sw::B);
    Ok(())
}

fn fldcw(m: &mut Machine, x: &Insn) -> R<()> {
    check(m, x)?;
    let off = m.ea(x);
    let v = m.read(m.mseg(x), off, 2)? as u16;
    m.cpu.fpu.fcw = v | 0x40;
    update_es(m);
    Ok(())
}

fn fstcw(m: &mut Machine, x: &Insn) -> R<()> {
    check(m, x)?;
    let off = m.ea(x);
    m.write(m.mseg(x), off, 2, u64::from(m.cpu.fpu.fcw))
}

fn fstsw(m: &mut Machine, x: &Insn) -> R<()> {
    check(m, x)?;
    let v = u64::from(m.cpu.fpu.fsw);
    if x.i.op0_kind() == iced_x86::OpKind::Register {
        m.set_reg(Register::AX, v);
        return Ok(());
    }
    let off = m.ea(x);
    m.write(m.mseg(x), off, 2, v)
}

fn wait(m: &mut Machine, _: &Insn) -> R<()> {
    if m.cpu.cr0 & (cr0::MP | cr0::TS) == cr0::MP | cr0::TS {
        return Err(nm());
    }
    x87_pending(m)
}

/// The environment image (14 or 28 bytes, protected-mode layout).
fn env_image(m: &Machine, big: bool) -> Vec<u8> {
    let f = &m.cpu.fpu;
    let words: [u32; 7] = [
        u32::from(f.fcw),
        u32::from(f.fsw),
        u32::from(f.tag_word()),
        f.fip as u32,
        u32::from(f.fcs) | (u32::from(f.fop & 0x7ff) << 16),
        f.fdp as u32,
        u32::from(f.fds),
    ];
    let mut v = Vec::with_capacity(28);
    for (k, w) in words.iter().enumerate() {
        if big {
            let w = if k < 3 { *w | 0xffff_0000 } else { *w };
            v.extend_from_slice(&w.to_le_bytes());
        } else {
            let w = if k == 4 { *w & 0xffff } else { *w };
            v.extend_from_slice(&(w as u16).to_le_bytes());
        }
    }
    v
}

fn load_env(m: &mut Machine, b: &[u8], big: bool) {
    let w = |k: usize| -> u32 {
        if big {
            u32::from_le_bytes(b[4 * k..4 * k + 4].try_into().unwrap())
        } else {
            u32::from(u16::from_le_bytes(b[2 * k..2 * k + 2].try_into().unwrap()))
        }
    };
    let f = &mut m.cpu.fpu;
    f.fcw = w(0) as u16 | 0x40;
    f.fsw = w(1) as u16;
    f.set_tag_word(w(2) as u16);
    f.fip = u64::from(w(3));
    f.fcs = w(4) as u16;
    if big {
        f.fop = (w(4) >> 16) as u16 & 0x7ff;
    }
    f.fdp = u64::from(w(5));
    f.fds = w(6) as u16;
    update_es(m);
}

fn env_big(x: &Insn) -> bool {
    matches!(
        x.i.memory_size(),
        MemorySize::FpuEnv28 | MemorySize::FpuState108
    )
}

/// FNSTENV/FSTENV, and FNSAVE/FSAVE (`SAVE`: environment plus the eight registers, then
/// FNINIT).
fn fstenv<const SAVE: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    check(m, x)?;
    let big = env_big(x);
    let mut img = env_image(m, big);
    if SAVE {
        for i in 0..8 {
            let p = m.cpu.fpu.phys(i);
            img.extend_from_slice(&m.cpu.fpu.r[p].to_le_bytes()[..10]);
        }
    }
    let off = m.ea(x);
    m.write_buf(m.mseg(x), off, &img, 1)?;
    if SAVE {
        m.cpu.fpu.init();
    } else {
        m.cpu.fpu.fcw |= 0x3f;
    }
    Ok(())
}

fn fldenv<const RSTOR: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    check(m, x)?;
    let big = env_big(x);
    let len = if big { 28 } else { 14 } + if RSTOR { 80 } else { 0 };
    let mut b = vec![0u8; len];
    let off = m.ea(x);
    m.read_buf(m.mseg(x), off, &mut b, 1)?;
    let e = if big { 28 } else { 14 };
    load_env(m, &b[..e], big);
    if RSTOR {
        for i in 0..8 {
            let mut r = [0u8; 16];
            r[..10].copy_from_slice(&b[e + 10 * i..e + 10 * i + 10]);
            let p = m.cpu.fpu.phys(i);
            m.cpu.fpu.r[p] = u128::from_le_bytes(r);
        }
    }
    Ok(())
}

/// How much of the 512-byte FXSAVE area is architectural state: XMM8-15 only in 64-bit mode.
fn fx_len(m: &Machine) -> usize {
    if m.cpu.mode == Mode::Long64 { 416 } else { 288 }
}

fn fxsave<const W64: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    x87_ok(m)?;
    let f = &m.cpu.fpu;
    let mut b = vec![0u8; fx_len(m)];
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.tag;
    b[6..8].copy_from_slice(&(f.fop & 0x7ff).to_le_bytes());
    if W64 {
        b[8..16].copy_from_slice(&f.fip.to_le_bytes());
        b[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    } else {
        b[8..12].copy_from_slice(&(f.fip as u32).to_le_bytes());
        b[12..14].copy_from_slice(&f.fcs.to_le_bytes());
        b[16..20].copy_from_slice(&(f.fdp as u32).to_le_bytes());
        b[20..22].copy_from_slice(&f.fds.to_le_bytes());
    }
    b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    b[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    for i in 0..8 {
        let v = f.r[f.phys(i)];
        b[32 + 16 * i..42 + 16 * i].copy_from_slice(&v.to_le_bytes()[..10]);
    }
    for (k, chunk) in b[160..].chunks_mut(16).enumerate() {
        chunk.copy_from_slice(&f.xmm[k].to_le_bytes());
    }
    let off = m.ea(x);
    m.write_buf(m.mseg(x), off, &b, 16)
}

fn fxrstor<const W64: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    x87_ok(m)?;
    let mut b = vec![0u8; fx_len(m)];
    let off = m.ea(x);
    m.read_buf(m.mseg(x), off, &mut b, 16)?;
    let rd16 = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    let rd32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let rd64 = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let mxcsr = rd32(24);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(gp(0));
    }
    let f = &mut m.cpu.fpu;
    f.fcw = rd16(0);
    f.fsw = rd16(2);
    f.tag = b[4];
    f.fop = rd16(6) & 0x7ff;
    if W64 {
        f.fip = rd64(8);
        f.fdp = rd64(16);
    } else {
        f.fip = u64::from(rd32(8));
        f.fcs = rd16(12);
        f.fdp = u64::from(rd32(16));
        f.fds = rd16(20);
    }
    f.mxcsr = mxcsr;
    for i in 0..8 {
        let mut r = [0u8; 16];
        r[..10].copy_from_slice(&b[32 + 16 * i..42 + 16 * i]);
        let p = f.phys(i);
        f.r[p] = u128::from_le_bytes(r);
    }
    let n = (b.len() - 160) / 16;
    for k in 0..n {
        f.xmm[k] = u128::from_le_bytes(b[160 + 16 * k..176 + 16 * k].try_into().unwrap());
    }
    Ok(())
}

fn ldmxcsr(m: &mut Machine, x: &Insn) -> R<()> {
    sse_ok(m)?;
    let off = m.ea(x);
    let v = m.read(m.mseg(x), off, 4)? as u32;
    if v & !MXCSR_MASK != 0 {
        return Err(gp(0));
    }
    m.cpu.fpu.mxcsr = v;
    Ok(())
}

fn stmxcsr(m: &mut Machine, x: &Insn) -> R<()> {
    sse_ok(m)?;
    let off = m.ea(x);
    m.write(m.mseg(x), off, 4, u64::from(m.cpu.fpu.mxcsr))
}

/// The 8087/287 control instructions that are no-ops on later FPUs (FNENI, FNDISI, FNSETPM).
fn fnop_legacy(m: &mut Machine, _: &Insn) -> R<()> {
    x87_ok(m)
}

/// The handler of an x87/SSE state instruction.
pub fn handler(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    let h: Handler = match i.mnemonic() {
        Fninit | Finit => finit,
        Fnclex | Fclex => fclex,
        Fldcw => fldcw,
        Fnstcw | Fstcw => fstcw,
        Fnstsw | Fstsw => fstsw,
        Fnstenv | Fstenv => fstenv::<false>,
        Fnsave | Fsave => fstenv::<true>,
        Fldenv => fldenv::<false>,
        Frstor => fldenv::<true>,
        Wait => wait,
        Fxsave => fxsave::<false>,
        Fxsave64 => fxsave::<true>,
        Fxrstor => fxrstor::<false>,
        Fxrstor64 => fxrstor::<true>,
        Ldmxcsr => ldmxcsr,
        Stmxcsr => stmxcsr,
        Fneni | Fndisi | Fnsetpm | Feni | Fdisi | Fsetpm => fnop_legacy,
        _ => return None,
    };
    Some(h)
}
