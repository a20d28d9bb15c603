//! The differential test itself (x86-64 hosts only).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use iced_x86::{
    Code, Decoder, DecoderOptions, Encoder, EncodingKind, Formatter, IcedError, Instruction,
    MemoryOperand, Mnemonic, NasmFormatter, OpCodeOperandKind as K, OpKind, Register,
    RepPrefixKind,
};
use palacios_boot::{BootParams, elf::build_test_elf, elf64};
use palacios_emu::EmuBackend;
use palacios_vmm::backend::{Backend, Exit};
use palacios_vmm::config::BootFormat;
use palacios_vmm::{GuestMem, MemoryMap};
use palacios_x86::{CpuState, Regs};
use vm_memory::{Bytes, GuestAddress};

// ---- layout (offsets from the fixed base, identical natively and in the guest) ----------

/// Data buffer that memory operands, strings and the stack use; compared after each case.
pub(crate) const DATA_LEN: usize = 0x2000;
/// Native stub's input and output register blocks, saved host RSP, scratch stack.
pub(crate) const IN_OFF: u64 = 0x2000;
pub(crate) const OUT_OFF: u64 = 0x2100;
pub(crate) const HOST_RSP_OFF: u64 = 0x2200;
/// The far pointer (offset32, selector) of the 32-bit stub, and the 32-bit stub's saved ESP.
pub(crate) const FARPTR_OFF: u64 = 0x2300;
pub(crate) const HOST_ESP32_OFF: u64 = 0x2308;
/// DS and ES of the 64-bit code (null on Linux), restored after the 32-bit code.
pub(crate) const DS_SAVE_OFF: u64 = 0x2310;
pub(crate) const ES_SAVE_OFF: u64 = 0x2318;
pub(crate) const SCRATCH_TOP_OFF: u64 = 0x3000;
/// Code page: 64-bit cases, 32-bit cases, and the trampoline into 32-bit code.
pub(crate) const CODE_OFF: u64 = 0x3000;
pub(crate) const CODE32_OFF: u64 = 0x3800;
pub(crate) const TRAMPOLINE_OFF: u64 = 0x3c00;
/// The user-mode 32-bit code segment of x86_64 Linux.
pub(crate) const USER32_CS: u16 = 0x23;
pub(crate) const MAP_LEN: usize = 0x4000;
/// Guest RAM; every base candidate lies inside it.
pub(crate) const GUEST_RAM: u64 = 512 << 20;
pub(crate) const BASE_CANDIDATES: [u64; 6] = [
    0x1000_0000,
    0x0800_0000,
    0x1800_0000,
    0x0400_0000,
    0x1c00_0000,
    0x0c00_0000,
];
/// Where the boot ELF's (unused) entry point goes.
pub(crate) const ELF_ENTRY: u64 = 0x10_0000;

pub(crate) const CF: u64 = 1;
pub(crate) const PF: u64 = 1 << 2;
pub(crate) const AF: u64 = 1 << 4;
pub(crate) const ZF: u64 = 1 << 6;
pub(crate) const SF: u64 = 1 << 7;
pub(crate) const IF: u64 = 1 << 9;
pub(crate) const DF: u64 = 1 << 10;
pub(crate) const OF: u64 = 1 << 11;
pub(crate) const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
/// Flags compared (minus the instruction's undefined ones).
pub(crate) const COMPARED: u64 = ARITH | DF;

pub(crate) const RSP: usize = 4;
pub(crate) const RBP: usize = 5;
pub(crate) const RAX: usize = 0;
pub(crate) const RCX: usize = 1;
pub(crate) const RDX: usize = 2;
pub(crate) const RBX: usize = 3;
pub(crate) const RSI: usize = 6;
pub(crate) const RDI: usize = 7;

pub(crate) const NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];
use iced_x86::Register as G;
pub(crate) const R64: [Register; 16] = [
    G::RAX,
    G::RCX,
    G::RDX,
    G::RBX,
    G::RSP,
    G::RBP,
    G::RSI,
    G::RDI,
    G::R8,
    G::R9,
    G::R10,
    G::R11,
    G::R12,
    G::R13,
    G::R14,
    G::R15,
];
pub(crate) const R32: [Register; 16] = [
    G::EAX,
    G::ECX,
    G::EDX,
    G::EBX,
    G::ESP,
    G::EBP,
    G::ESI,
    G::EDI,
    G::R8D,
    G::R9D,
    G::R10D,
    G::R11D,
    G::R12D,
    G::R13D,
    G::R14D,
    G::R15D,
];
pub(crate) const R16: [Register; 16] = [
    G::AX,
    G::CX,
    G::DX,
    G::BX,
    G::SP,
    G::BP,
    G::SI,
    G::DI,
    G::R8W,
    G::R9W,
    G::R10W,
    G::R11W,
    G::R12W,
    G::R13W,
    G::R14W,
    G::R15W,
];
pub(crate) const R8: [Register; 20] = [
    G::AL,
    G::CL,
    G::DL,
    G::BL,
    G::SPL,
    G::BPL,
    G::SIL,
    G::DIL,
    G::R8L,
    G::R9L,
    G::R10L,
    G::R11L,
    G::R12L,
    G::R13L,
    G::R14L,
    G::R15L,
    G::AH,
    G::CH,
    G::DH,
    G::BH,
];

pub(crate) fn mask(size: u64) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

pub(crate) fn sext(v: u64, size: u64) -> i64 {
    let sh = 64 - size * 8;
    ((v << sh) as i64) >> sh
}

pub(crate) fn gpr_index(r: Register) -> usize {
    let full = r.full_register();
    R64.iter()
        .position(|&x| x == full)
        .expect("a general-purpose register")
}

pub(crate) fn is_high8(r: Register) -> bool {
    matches!(r, G::AH | G::CH | G::DH | G::BH)
}

// ---- random numbers -----------------------------------------------------------------------

/// SplitMix64.
pub(crate) struct Rng(u64);

pub(crate) const SPECIAL: [u64; 20] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
    0x8000_0000_0000_0001,
];

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
    /// A register value: often a boundary value in the low 8/16/32/64 bits.
    fn value(&mut self) -> u64 {
        match self.below(8) {
            0 | 1 => {
                let w = self.pick(&[1u64, 2, 4, 8]);
                let s = self.pick(&SPECIAL);
                (self.next() & !mask(w)) | (s & mask(w))
            }
            2 => self.pick(&SPECIAL),
            3 => self.below(70),
            4 => 0u64.wrapping_sub(self.below(70)),
            _ => self.next(),
        }
    }
    /// A shift or rotate count: mostly around the operand width.
    fn count(&mut self, bits: u64) -> u64 {
        match self.below(4) {
            0 => self.below(256),
            1 => self.pick(&[0, 1, bits - 1, bits, bits + 1, 31, 32, 63]),
            _ => self.below(bits + 2),
        }
    }
}

// ---- machine state ------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
    pub(crate) gpr: [u64; 16],
    pub(crate) flags: u64,
}

impl State {
    fn get(&self, r: Register) -> u64 {
        let v = self.gpr[gpr_index(r)];
        if is_high8(r) {
            (v >> 8) & 0xff
        } else {
            v & mask(r.size() as u64)
        }
    }
    /// Set the low `r.size()` bits (or the high byte), keeping the rest.
    fn set_low(&mut self, r: Register, v: u64) {
        let i = gpr_index(r);
        if is_high8(r) {
            self.gpr[i] = (self.gpr[i] & !0xff00) | ((v & 0xff) << 8);
        } else {
            let m = mask(r.size() as u64);
            self.gpr[i] = (self.gpr[i] & !m) | (v & m);
        }
    }
}

pub(crate) fn rd(data: &[u8], base: u64, addr: u64, size: u64) -> u64 {
    let o = (addr - base) as usize;
    let mut b = [0u8; 8];
    b[..size as usize].copy_from_slice(&data[o..o + size as usize]);
    u64::from_le_bytes(b)
}

pub(crate) fn wr(data: &mut [u8], base: u64, addr: u64, size: u64, v: u64) {
    let o = (addr - base) as usize;
    data[o..o + size as usize].copy_from_slice(&v.to_le_bytes()[..size as usize]);
}

mod cases;
mod emulator;
mod forms;
mod native;
mod run;

#[allow(unused_imports)]
pub(crate) use {cases::*, emulator::*, forms::*, native::*, run::*};
