//! Instruction semantics. Each decoded instruction carries a [`Handler`] chosen once at decode
//! time; handlers read their operands, check everything that can fault, and only then change
//! state, so a faulting instruction leaves no partial effects.

mod alu;
mod data;
mod fast;
mod flow;
mod fxsave;
pub mod interrupt;
mod muldiv;
mod seg;
pub mod sse;
pub mod ssefp;
mod string;
mod system;
mod x87;
mod x87num;

pub(crate) use fast::is_imm;

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::block::Insn;
use crate::cpu::{Mode, SS};
use crate::machine::{Machine, R, ud};

pub use interrupt::deliver_exception;
pub use system::{read_msr, write_msr};

/// What executes one decoded instruction. On entry RIP already points past the instruction.
pub type Handler = fn(&mut Machine, &Insn) -> R<()>;

/// Size mask for `size` bytes.
#[inline(always)]
pub fn mask(size: u64) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

impl Machine {
    /// Read a register by its iced-x86 name.
    #[inline(always)]
    pub fn reg(&self, r: Register) -> u64 {
        let n = r as usize;
        match n {
            1..=4 => self.cpu.gpr[n - 1] & 0xff,
            5..=8 => (self.cpu.gpr[n - 5] >> 8) & 0xff,
            9..=20 => self.cpu.gpr[n - 5] & 0xff,
            21..=36 => self.cpu.gpr[n - 21] & 0xffff,
            37..=52 => self.cpu.gpr[n - 37] & 0xffff_ffff,
            53..=68 => self.cpu.gpr[n - 53],
            71..=76 => u64::from(self.cpu.seg[n - 71].selector),
            _ => 0,
        }
    }

    /// Write a register: 8- and 16-bit writes merge, 32-bit writes zero-extend.
    #[inline(always)]
    pub fn set_reg(&mut self, r: Register, v: u64) {
        let n = r as usize;
        let g = &mut self.cpu.gpr;
        match n {
            1..=4 => g[n - 1] = (g[n - 1] & !0xff) | (v & 0xff),
            5..=8 => g[n - 5] = (g[n - 5] & !0xff00) | ((v & 0xff) << 8),
            9..=20 => g[n - 5] = (g[n - 5] & !0xff) | (v & 0xff),
            21..=36 => g[n - 21] = (g[n - 21] & !0xffff) | (v & 0xffff),
            37..=52 => g[n - 37] = v & 0xffff_ffff,
            53..=68 => g[n - 53] = v,
            _ => {}
        }
    }

    /// Write general register number `n` with an operand size of `size` bytes.
    #[inline(always)]
    pub fn set_gpr(&mut self, n: usize, size: u64, v: u64) {
        let g = &mut self.cpu.gpr[n];
        *g = match size {
            1 => (*g & !0xff) | (v & 0xff),
            2 => (*g & !0xffff) | (v & 0xffff),
            4 => v & 0xffff_ffff,
            _ => v,
        };
    }

    /// Effective address (offset) of the memory operand.
    #[inline(always)]
    pub fn ea(&self, x: &Insn) -> u64 {
        let i = &x.i;
        let mut a = i.memory_displacement64();
        let b = i.memory_base();
        if b != Register::None && b != Register::RIP && b != Register::EIP {
            a = a.wrapping_add(self.reg(b));
        }
        let idx = i.memory_index();
        if idx != Register::None {
            a = a.wrapping_add(
                self.reg(idx)
                    .wrapping_mul(u64::from(i.memory_index_scale())),
            );
        }
        a & x.amask
    }

    /// Segment register index of the memory operand.
    #[inline(always)]
    pub fn mseg(&self, x: &Insn) -> usize {
        (x.i.memory_segment() as usize)
            .wrapping_sub(Register::ES as usize)
            .min(5)
    }

    /// Read operand `n` (`size` bytes; immediates are masked to it).
    #[inline]
    pub fn rd(&mut self, x: &Insn, n: u32, size: u64) -> R<u64> {
        match x.i.op_kind(n) {
            OpKind::Register => Ok(self.reg(x.i.op_register(n))),
            OpKind::Memory => {
                let off = self.ea(x);
                self.read(self.mseg(x), off, size)
            }
            _ => Ok(x.i.immediate(n) & mask(size)),
        }
    }

    /// Write operand `n`.
    #[inline]
    pub fn wr(&mut self, x: &Insn, n: u32, size: u64, v: u64) -> R<()> {
        match x.i.op_kind(n) {
            OpKind::Register => {
                self.set_reg(x.i.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let off = self.ea(x);
                self.write(self.mseg(x), off, size, v)
            }
            _ => Err(ud()),
        }
    }

    // ---- stack --------------------------------------------------------------------------

    /// Stack-pointer mask: 64-bit mode uses RSP, otherwise SS.B chooses ESP or SP.
    #[inline]
    pub fn sp_mask(&self) -> u64 {
        if self.cpu.mode == Mode::Long64 {
            u64::MAX
        } else if self.cpu.seg[SS].db {
            0xffff_ffff
        } else {
            0xffff
        }
    }

    #[inline]
    pub fn set_sp(&mut self, v: u64) {
        let m = self.sp_mask();
        self.cpu.gpr[4] = (self.cpu.gpr[4] & !m) | (v & m);
    }

    /// Push `size` bytes.
    #[inline]
    pub fn push(&mut self, v: u64, size: u64) -> R<()> {
        let m = self.sp_mask();
        let sp = self.cpu.gpr[4].wrapping_sub(size) & m;
        self.write(SS, sp, size, v)?;
        self.set_sp(sp);
        Ok(())
    }

    /// Pop `size` bytes.
    #[inline]
    pub fn pop(&mut self, size: u64) -> R<u64> {
        let m = self.sp_mask();
        let sp = self.cpu.gpr[4] & m;
        let v = self.read(SS, sp, size)?;
        self.set_sp(sp.wrapping_add(size));
        Ok(v)
    }

    /// Read `size` bytes at stack offset `sp + delta` without moving the stack.
    pub fn peek(&mut self, delta: u64, size: u64) -> R<u64> {
        let m = self.sp_mask();
        let sp = self.cpu.gpr[4].wrapping_add(delta) & m;
        self.read(SS, sp, size)
    }
}

/// An instruction the emulator does not implement: #UD, counted in telemetry.
fn unimplemented(m: &mut Machine, x: &Insn) -> R<()> {
    let name = format!("{:?}", x.i.mnemonic()).to_lowercase();
    *m.stats.unimplemented.entry(name).or_default() += 1;
    Err(ud())
}

/// #UD for instructions that are architecturally invalid here.
fn invalid(_: &mut Machine, _: &Insn) -> R<()> {
    Err(ud())
}

/// The general register number of `r` (8/16/32/64-bit forms; AH, CH, DH, BH excluded).
pub fn gpr_number(r: Register) -> Option<u8> {
    let n = r as usize;
    match n {
        1..=4 => Some((n - 1) as u8),
        9..=20 => Some((n - 5) as u8),
        21..=36 => Some((n - 21) as u8),
        37..=52 => Some((n - 37) as u8),
        53..=68 => Some((n - 53) as u8),
        _ => None,
    }
}

/// The handler of an instruction.
pub fn handler(i: &Instruction) -> Handler {
    use Mnemonic::*;
    if i.code() == iced_x86::Code::INVALID {
        return invalid;
    }
    if let Some(h) = fast::handler(i) {
        return h;
    }
    if let Some(h) = sse::handler(i)
        .or_else(|| ssefp::handler(i))
        .or_else(|| x87::handler(i))
        .or_else(|| fxsave::handler(i))
    {
        return h;
    }
    let m = i.mnemonic();
    if let Some(h) = alu::handler(m, i) {
        return h;
    }
    if let Some(h) = muldiv::handler(m) {
        return h;
    }
    if let Some(h) = data::handler(m, i) {
        return h;
    }
    if let Some(h) = flow::handler(m, i) {
        return h;
    }
    if let Some(h) = string::handler(m) {
        return h;
    }
    if let Some(h) = system::handler(m, i) {
        return h;
    }
    match m {
        INVALID => invalid,
        _ => unimplemented,
    }
}
