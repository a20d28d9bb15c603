//! Control transfers and the stack in translated code: PUSH/POP, the block's final
//! CALL/RET/JMP/Jcc (direct or through a register), the loop back-edge and the exits that
//! chain into the next translation.

use std::mem::offset_of;

use iced_x86::code_asm::*;
use iced_x86::{Code as Op, ConditionCode};

use super::emit::{ARITH, T, eflags, reg_num};
use super::{Ctx, SLOTS, Slot};
use crate::block::Insn;
use crate::paging::perm;

type Res<T> = Result<T, IcedError>;

impl T<'_> {
    pub(super) fn rsp(&self) -> AsmMemoryOperand {
        qword_ptr(rbx + (self.l.gpr + 8 * 4))
    }

    /// The stack slot of a push (`push`) or pop: its host address into R11 and the new
    /// RSP of a push (or the current one) into RSI; a TLB miss goes to `slow`. (64-bit
    /// stack: SS has no base, and a TLB hit means the address is canonical.)
    pub(super) fn stack_slot(&mut self, push: bool, slow: CodeLabel) -> Res<()> {
        self.a.mov(r11, self.rsp())?;
        if push {
            self.a.sub(r11, 8)?;
        }
        self.a.mov(rsi, r11)?;
        self.probe(8, if push { perm::R | perm::W } else { perm::R }, slow)
    }

    /// Go to `slow` unless RAX is canonical (the handler raises the #GP).
    pub(super) fn canonical_rax(&mut self, slow: CodeLabel) -> Res<()> {
        self.a.mov(rcx, rax)?;
        self.a.shl(rcx, 16)?;
        self.a.sar(rcx, 16)?;
        self.a.cmp(rcx, rax)?;
        self.a.jne(slow)
    }

    /// PUSH r64 or POP r64.
    pub(super) fn push_pop(&mut self, k: usize, push: bool) -> Res<()> {
        let x: &Insn = &self.b.insns[k];
        let r = reg_num(x.i.op0_register());
        let reg = qword_ptr(rbx + (self.l.gpr + 8 * r));
        let slow = self.slow_path(k);
        self.stack_slot(push, slow)?;
        if push {
            self.a.mov(rax, reg)?;
            self.a.mov(qword_ptr(r11), rax)?;
        } else {
            self.a.mov(rax, qword_ptr(r11))?;
            self.a.add(rsi, 8)?;
        }
        self.a.mov(self.rsp(), rsi)?;
        if !push {
            self.a.mov(reg, rax)?;
        }
        self.resume(k)
    }

    /// The block's final CALL rel32.
    pub(super) fn call(&mut self, k: usize) -> Res<()> {
        self.flush()?;
        let x: &Insn = &self.b.insns[k];
        let slow = self.slow_path(k);
        self.stack_slot(true, slow)?;
        self.a.mov(rax, x.next)?;
        self.a.mov(qword_ptr(r11), rax)?;
        self.a.mov(self.rsp(), rsi)?;
        self.resume(k)?;
        self.a.mov(rax, x.imm)?;
        self.exit_to(self.b.insns.len())
    }

    /// The block's final RET / RET imm16.
    pub(super) fn ret(&mut self, k: usize) -> Res<()> {
        self.flush()?;
        let x: &Insn = &self.b.insns[k];
        let pop = 8 + if x.i.code() == Op::Retnq_imm16 {
            x.i.immediate16() as i32
        } else {
            0
        };
        let slow = self.slow_path(k);
        self.stack_slot(false, slow)?;
        self.a.mov(rax, qword_ptr(r11))?;
        self.canonical_rax(slow)?;
        self.a.lea(rsi, qword_ptr(rsi + pop))?;
        self.a.mov(self.rsp(), rsi)?;
        self.a.mov(qword_ptr(rbx + self.l.rip), rax)?;
        self.resume(k)?;
        self.a.mov(rax, qword_ptr(rbx + self.l.rip))?;
        self.exit_to(self.b.insns.len())
    }

    /// The block's final JMP r64 or CALL r64.
    pub(super) fn indirect(&mut self, k: usize, call: bool) -> Res<()> {
        self.flush()?;
        let x: &Insn = &self.b.insns[k];
        let r = reg_num(x.i.op0_register());
        let slow = self.slow_path(k);
        self.a.mov(rax, qword_ptr(rbx + (self.l.gpr + 8 * r)))?;
        self.canonical_rax(slow)?;
        if call {
            self.stack_slot(true, slow)?;
            self.a.mov(rdx, x.next)?;
            self.a.mov(qword_ptr(r11), rdx)?;
            self.a.mov(self.rsp(), rsi)?;
        }
        self.a.mov(qword_ptr(rbx + self.l.rip), rax)?;
        self.resume(k)?;
        self.a.mov(rax, qword_ptr(rbx + self.l.rip))?;
        self.exit_to(self.b.insns.len())
    }

    /// Leave the block for guest RIP = RAX after `n` instructions: straight into the
    /// translation of the block there when this exit's link slot holds one that is still
    /// valid and nothing asks the run to stop, else back to the dispatcher (which may then
    /// fill the slot).
    pub(super) fn exit_to(&mut self, n: usize) -> Res<()> {
        let slot = self.next_slot;
        assert!(slot < SLOTS, "more exits than link slots");
        self.next_slot += 1;
        // SAFETY: `slots` points at SLOTS slots (checked above); only the address is taken.
        let s = unsafe { self.slots.add(slot) } as u64;
        let mut out = self.a.create_label();
        let c = |f: usize| r14 + f as i32;
        let sl = |f: usize| rcx + f as i32;
        self.a.add(r13, n as i32)?;
        self.a.mov(rcx, s)?;
        self.a.cmp(rax, qword_ptr(sl(offset_of!(Slot, rip))))?;
        self.a.jne(out)?;
        self.a.mov(rdx, qword_ptr(sl(offset_of!(Slot, epoch))))?;
        self.a.cmp(rdx, qword_ptr(c(offset_of!(Ctx, link_epoch))))?;
        self.a.jne(out)?;
        self.a.mov(rdx, qword_ptr(rbx + self.l.generation))?;
        self.a
            .cmp(rdx, qword_ptr(sl(offset_of!(Slot, generation))))?;
        self.a.jne(out)?;
        self.a.mov(rdx, qword_ptr(c(offset_of!(Ctx, writes))))?;
        self.a.mov(rdx, qword_ptr(rdx))?;
        self.a.cmp(rdx, qword_ptr(sl(offset_of!(Slot, writes))))?;
        self.a.jne(out)?;
        self.a.cmp(r13, qword_ptr(c(offset_of!(Ctx, budget))))?;
        self.a.jae(out)?;
        self.a.mov(rdx, qword_ptr(c(offset_of!(Ctx, kick))))?;
        self.a.cmp(byte_ptr(rdx), 0)?;
        self.a.jne(out)?;
        self.a.jmp(qword_ptr(sl(offset_of!(Slot, target))))?;
        self.bind(&mut out)?;
        self.a.mov(qword_ptr(rbx + self.l.rip), rax)?;
        self.a.mov(qword_ptr(c(offset_of!(Ctx, last_slot))), rcx)?;
        self.a.mov(rax, r13)?;
        self.a.jmp(self.epilogue)
    }

    /// The block's final direct jump.
    pub(super) fn branch(&mut self, k: usize) -> Res<()> {
        let pend = self.pend;
        self.flush()?;
        let x: &Insn = &self.b.insns[k];
        let n = self.b.insns.len();
        if x.i.is_jmp_short_or_near() {
            return self.go(x.imm, n);
        }
        let mut taken = self.a.create_label();
        let reads = eflags(x.i.rflags_read()) & ARITH;
        if reads & !pend == 0 {
            // The flags it reads are still in R15 (the write-back above left it alone).
            self.a.mov(r10, r15)?;
        } else {
            self.a.mov(r10, qword_ptr(rbx + self.l.flags))?;
        }
        self.cond(x.i.condition_code(), taken)?;
        self.go(x.next, n)?;
        self.bind(&mut taken)?;
        self.go(x.imm, n)
    }

    /// Continue at guest `rip` after `n` instructions: loop when it is this block's start.
    pub(super) fn go(&mut self, rip: u64, n: usize) -> Res<()> {
        if !(self.pure && rip == self.b.rip) {
            self.a.mov(rax, rip)?;
            return self.exit_to(n);
        }
        let mut stop = self.a.create_label();
        let c = |f: usize| r14 + f as i32;
        self.a.add(r13, n as i32)?;
        self.a.cmp(r13, qword_ptr(c(offset_of!(Ctx, budget))))?;
        self.a.jae(stop)?;
        self.a.mov(rax, qword_ptr(c(offset_of!(Ctx, kick))))?;
        self.a.cmp(byte_ptr(rax), 0)?;
        self.a.jne(stop)?;
        self.a.mov(rax, qword_ptr(c(offset_of!(Ctx, writes))))?;
        self.a.mov(rax, qword_ptr(rax))?;
        self.a.cmp(rax, qword_ptr(c(offset_of!(Ctx, writes0))))?;
        self.a.jne(stop)?;
        self.a.jmp(self.top)?;
        self.bind(&mut stop)?;
        self.set_rip(rip)?;
        self.a.mov(rax, r13)?;
        self.a.jmp(self.epilogue)
    }

    /// Jump to `to` when condition `cc` holds for the flags image in R10.
    pub(super) fn cond(&mut self, cc: ConditionCode, to: CodeLabel) -> Res<()> {
        use ConditionCode::*;
        let asm = &mut self.a;
        let bit = |c| match c {
            o | no => 11,
            b | ae => 0,
            e | ne => 6,
            s | ns => 7,
            _ => 2, // p, np
        };
        match cc {
            o | b | e | s | p => {
                asm.bt(r10, bit(cc))?;
                asm.jc(to)
            }
            no | ae | ne | ns | np => {
                asm.bt(r10, bit(cc))?;
                asm.jnc(to)
            }
            be | a => {
                asm.test(r10d, 0x41)?;
                if cc == be { asm.jnz(to) } else { asm.jz(to) }
            }
            l | ge => {
                asm.mov(eax, r10d)?;
                asm.shr(eax, 4)?;
                asm.xor(eax, r10d)?;
                asm.test(eax, 0x80)?;
                if cc == l { asm.jnz(to) } else { asm.jz(to) }
            }
            le | g => {
                asm.mov(eax, r10d)?;
                asm.shr(eax, 4)?;
                asm.xor(eax, r10d)?;
                asm.and(eax, 0x80)?;
                asm.mov(r9d, r10d)?;
                asm.and(r9d, 0x40)?;
                asm.or(eax, r9d)?;
                if cc == le { asm.jnz(to) } else { asm.jz(to) }
            }
            None => asm.jmp(to),
        }
    }
}
