//! A block translator for 64-bit guest code on x86-64 hosts.
//!
//! A block that has run [`THRESHOLD`] times is translated into host code: the common
//! integer instructions (MOV/MOVZX/MOVSX, ALU ops, INC/DEC/NEG/NOT, LEA, shifts and rotates,
//! IMUL, BT/BSF/BSR/BSWAP, CMOVcc/SETcc, register XCHG, NOPs) run natively on copies of the
//! guest registers, with memory operands resolved through the software TLB inline; a TLB
//! miss, and every other instruction, calls the instruction's interpreter handler. A block
//! that ends in a conditional or direct jump back to its own start loops inside the
//! translation while the caller's instruction budget lasts and nothing asks it to stop; its
//! other exits (and RET) jump into the next block's translation through link slots the
//! dispatcher fills ([`Slot`]), under the same conditions.
//!
//! The translation keeps the interpreter's contract: registers, flags and RIP are exact at
//! every point where control leaves it (a fault, an exit, the block's end), and a fault
//! leaves the faulting instruction without side effects. Flags no later instruction reads
//! are kept in a host register and only written back where they could be observed.
//! Flags the architecture leaves undefined come from the host CPU and may differ from the
//! interpreter's choice.

use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::block::Block;
use crate::machine::{Fault, Machine};

#[cfg(target_arch = "x86_64")]
mod emit;
#[cfg(target_arch = "x86_64")]
mod flow;
#[cfg(target_arch = "x86_64")]
mod mem;

/// Executions of a block before it is translated.
pub const THRESHOLD: u32 = 256;
/// Set in a translation's result when the instruction at the count raised a fault
/// ([`Machine::jit_fault`]).
pub const FAULT: u64 = 1 << 63;

/// What a translation reads besides the machine.
#[repr(C)]
pub struct Ctx {
    /// Instructions the translation may retire before it stops looping.
    pub budget: u64,
    /// Set by another thread to make the core return.
    pub kick: *const AtomicBool,
    /// Code-page write counter (also bumped when a page becomes code), shared by all
    /// cores, and its value when the translation was entered: a change ends a loop.
    pub writes: *const AtomicU64,
    pub writes0: u64,
    /// The block cache's link epoch ([`Slot::epoch`]).
    pub link_epoch: u64,
    /// Set by an exit that went back to the dispatcher: its link slot, to fill.
    pub last_slot: *mut Slot,
}

/// How many exits with a link slot a block has at most (a conditional branch's two).
pub const SLOTS: usize = 2;

/// Where an exit of a translation goes when it chains: valid while the block cache, the
/// TLB and the code pages are as they were when it was filled.
#[repr(C)]
#[derive(Default)]
pub struct Slot {
    /// Chained entry of the next block's translation.
    pub target: u64,
    /// The guest RIP it is for (a RET's target varies).
    pub rip: u64,
    /// Block cache link epoch, TLB generation and code-write count when filled.
    pub epoch: u64,
    pub generation: u64,
    pub writes: u64,
}

type Entry = unsafe extern "sysv64" fn(*mut Machine, *const Ctx) -> u64;

/// A block's translation.
pub struct Code {
    entry: Entry,
    /// Entry for a jump from another translation (past the prologue).
    chain: u64,
    /// Link slots of the exits: only the code reads them, through the addresses it was
    /// assembled with; this keeps them allocated.
    #[allow(dead_code)]
    slots: Box<[Slot; SLOTS]>,
    /// The privilege level it was made for (it reads that half of the TLB).
    pub cpl: u8,
}

/// What a translation's run ended with.
pub struct Ran {
    pub done: u64,
    pub fault: Option<Fault>,
    /// The exit's link slot when it went back to the dispatcher unlinked.
    pub slot: *mut Slot,
}

/// A core's translations.
#[derive(Default)]
pub struct Jit {
    #[cfg(target_arch = "x86_64")]
    arena: Option<mem::Arena>,
    /// The arena is full: the block cache should be dropped.
    pub full: bool,
}

impl Jit {
    /// Translate `b` for the machine's current state; None if it cannot be.
    pub fn compile(&mut self, b: &Block, m: &Machine) -> Option<Code> {
        #[cfg(target_arch = "x86_64")]
        {
            if b.bits != 64 || m.cpu.mode != crate::cpu::Mode::Long64 {
                return None;
            }
            if self.arena.is_none() {
                self.arena = Some(mem::Arena::new()?);
            }
            let arena = self.arena.as_mut()?;
            let mut slots = Box::new([Slot::default(), Slot::default()]);
            let (bytes, chain) =
                emit::translate(b, m.cpu.cpl, arena.next_addr(), slots.as_mut_ptr())?;
            let Some(p) = arena.install(&bytes) else {
                self.full = true;
                return None;
            };
            // SAFETY: `p` holds a function assembled for this address with this signature.
            let entry = unsafe { std::mem::transmute::<*const u8, Entry>(p) };
            Some(Code {
                entry,
                chain: p as u64 + chain,
                slots,
                cpl: m.cpu.cpl,
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (b, m);
            None
        }
    }

    /// Forget every translation (the blocks they belong to are being dropped).
    pub fn reset(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = self.arena.as_mut() {
            a.reset();
        }
        self.full = false;
    }
}

/// Run a translation (and the ones it chains to). Returns the instructions retired and the
/// fault that stopped it, as `run_block` does.
pub fn run(c: &Code, m: &mut Machine, budget: u64, kick: &AtomicBool, link_epoch: u64) -> Ran {
    let code = &m.phys.code;
    let ctx = Ctx {
        budget,
        kick,
        writes: code.writes_counter(),
        writes0: code.writes(),
        link_epoch,
        last_slot: std::ptr::null_mut(),
    };
    // SAFETY: the translation belongs to a block of this core's cache, which is alive (it
    // points at the block's instruction records); it only touches the machine through the
    // offsets it was built with and calls `exec_one`, and it returns normally.
    let r = unsafe { (c.entry)(m, &ctx) };
    if r & FAULT != 0 {
        let f = m.jit_fault.take().unwrap_or(Fault::Fatal(
            &"translated block reported a fault it did not keep",
        ));
        Ran {
            done: r & !FAULT,
            fault: Some(f),
            slot: std::ptr::null_mut(),
        }
    } else {
        Ran {
            done: r,
            fault: None,
            slot: ctx.last_slot,
        }
    }
}

/// Fill `slot` (of a translation in the cache, whose link epoch is `link_epoch`) with
/// `to`, the translation of the block at the current RIP.
///
/// # Safety
/// `slot` must come from a [`Ran`] of a translation whose block is still in the cache
/// (the cache's link epoch has not changed since that run).
pub unsafe fn link(slot: *mut Slot, to: &Code, m: &Machine, link_epoch: u64) {
    // SAFETY: the caller guarantees the slot's translation (and so its slots) is alive.
    let s = unsafe { &mut *slot };
    *s = Slot {
        target: to.chain,
        rip: m.cpu.rip,
        epoch: link_epoch,
        generation: m.tlb.generation,
        writes: m.phys.code.writes(),
    };
}

/// Called from translated code for an instruction it does not run natively: the
/// interpreter's handler, with the interpreter's conventions (RIP already points past the
/// instruction). Returns 0 to go on, 1 when the handler asked the block to stop, 2 for a
/// fault (kept in [`Machine::jit_fault`]).
#[cfg(target_arch = "x86_64")]
extern "sysv64" fn exec_one(m: *mut Machine, x: *const crate::block::Insn) -> u64 {
    // SAFETY: translated code passes the machine it was entered with and a record of its
    // own (live) block.
    let (m, x) = unsafe { (&mut *m, &*x) };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (x.h)(m, x)));
    match r {
        Ok(Ok(())) => u64::from(m.brk),
        Ok(Err(f)) => {
            m.jit_fault = Some(f);
            2
        }
        Err(_) => {
            m.jit_fault = Some(Fault::Fatal(
                &"emulator bug: an instruction handler panicked",
            ));
            2
        }
    }
}
