//! String instructions with REP/REPE/REPNE. A repeated instruction runs a bounded batch of
//! iterations and then re-executes itself (so interrupts are taken between batches); a fault
//! midway leaves the registers at the faulting iteration, as the architecture requires.

use iced_x86::Mnemonic;

use super::Handler;
use super::alu::{SUB, calc};
use super::system::check_io;
use crate::block::Insn;
use crate::cpu::{ES, fl};
use crate::machine::{Fault, Machine, R};
use palacios_vmm::backend::{Exit, IoData};

/// Iterations per execution of a REP instruction before yielding.
const BATCH: u64 = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Movs,
    Cmps,
    Scas,
    Lods,
    Stos,
    Ins,
    Outs,
}

fn string<const OP: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    let op = match OP {
        0 => Op::Movs,
        1 => Op::Cmps,
        2 => Op::Scas,
        3 => Op::Lods,
        4 => Op::Stos,
        5 => Op::Ins,
        _ => Op::Outs,
    };
    // INS/OUTS: the data size, not DX's (the operand-size cache picks the port register).
    let size = match op {
        Op::Ins | Op::Outs => x.i.memory_size().size() as u64,
        _ => u64::from(x.osz),
    };
    let am = x.amask;
    let rep = x.i.has_rep_prefix() || x.i.has_repne_prefix();
    let repne = x.i.has_repne_prefix();
    let step = if m.cpu.flags & fl::DF != 0 {
        size.wrapping_neg()
    } else {
        size
    };
    let src_seg = m.mseg(x);
    let port = (m.cpu.gpr[2] & 0xffff) as u16;
    if matches!(op, Op::Ins | Op::Outs) {
        check_io(m, port, size)?;
    }
    let mut n = 0u64;
    loop {
        if rep && m.cpu.gpr[1] & am == 0 {
            break;
        }
        let si = m.cpu.gpr[6] & am;
        let di = m.cpu.gpr[7] & am;
        let mut stop = false;
        match op {
            Op::Movs => {
                let v = m.read(src_seg, si, size)?;
                m.write(ES, di, size, v)?;
                adv(m, 6, step, am);
                adv(m, 7, step, am);
            }
            Op::Stos => {
                let v = m.cpu.gpr[0];
                m.write(ES, di, size, v)?;
                adv(m, 7, step, am);
            }
            Op::Lods => {
                let v = m.read(src_seg, si, size)?;
                m.set_gpr(0, size, v);
                adv(m, 6, step, am);
            }
            Op::Cmps | Op::Scas => {
                let (a, b) = if op == Op::Cmps {
                    (m.read(src_seg, si, size)?, m.read(ES, di, size)?)
                } else {
                    (m.cpu.gpr[0], m.read(ES, di, size)?)
                };
                let (_, f) = calc(SUB, a, b, 0, size);
                m.cpu.flags = (m.cpu.flags & !fl::ARITH) | f;
                if op == Op::Cmps {
                    adv(m, 6, step, am);
                }
                adv(m, 7, step, am);
                let zf = f & fl::ZF != 0;
                stop = if repne { zf } else { !zf };
            }
            Op::Ins => {
                let Some(d) = m.io_answer else {
                    // Check the destination first, so a fault comes before the port read.
                    m.probe_write(ES, di, size)?;
                    return Err(Fault::exit(Exit::IoIn {
                        port,
                        size: size as u8,
                    }));
                };
                let mut b = [0u8; 8];
                b[..d.as_slice().len()].copy_from_slice(d.as_slice());
                m.write(ES, di, size, u64::from_le_bytes(b))?;
                m.io_answer = None;
                adv(m, 7, step, am);
                stop = true;
            }
            Op::Outs => {
                let v = m.read(src_seg, si, size)?;
                m.exit_after(Exit::IoOut {
                    port,
                    data: IoData::new(&v.to_le_bytes()[..size as usize]),
                });
                adv(m, 6, step, am);
                stop = true;
            }
        }
        if !rep {
            return Ok(());
        }
        let c = m.cpu.gpr[1].wrapping_sub(1) & am;
        m.cpu.gpr[1] = (m.cpu.gpr[1] & !am) | c;
        if am == 0xffff_ffff {
            m.cpu.gpr[1] &= 0xffff_ffff;
        }
        n += 1;
        let cmp = matches!(op, Op::Cmps | Op::Scas);
        if c == 0 || (cmp && stop) {
            return Ok(());
        }
        if stop || n >= BATCH || m.brk {
            // More to do: run this instruction again.
            m.cpu.rip = x.i.ip() & ipmask(m);
            m.brk = true;
            return Ok(());
        }
    }
    Ok(())
}

fn ipmask(m: &Machine) -> u64 {
    match m.cpu.bits {
        16 => 0xffff,
        32 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

#[inline(always)]
fn adv(m: &mut Machine, reg: usize, step: u64, am: u64) {
    let v = m.cpu.gpr[reg].wrapping_add(step) & am;
    m.cpu.gpr[reg] = if am == 0xffff_ffff {
        v
    } else {
        (m.cpu.gpr[reg] & !am) | v
    };
}

pub fn handler(mn: Mnemonic) -> Option<Handler> {
    use Mnemonic::*;
    Some(match mn {
        Movsb | Movsw | Movsd | Movsq => string::<0>,
        Cmpsb | Cmpsw | Cmpsd | Cmpsq => string::<1>,
        Scasb | Scasw | Scasd | Scasq => string::<2>,
        Lodsb | Lodsw | Lodsd | Lodsq => string::<3>,
        Stosb | Stosw | Stosd | Stosq => string::<4>,
        Insb | Insw | Insd => string::<5>,
        Outsb | Outsw | Outsd => string::<6>,
        _ => return None,
    })
}
