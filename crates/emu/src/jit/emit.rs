//! Host code for one block (see the module above for the contract).
//!
//! Register use in a translation: RBX = the machine, R14 = the [`Ctx`], R13 = instructions
//! retired by earlier loop iterations, R15 = host flags not yet written back (`pend` says
//! which), R9-R11 = address and TLB scratch, RAX, RCX, RDX, RSI, RDI, R8 = copies of the
//! guest registers an instruction uses.

use std::mem::{offset_of, size_of};

use iced_x86::code_asm::*;
use iced_x86::{
    Code as Op, IcedError, Instruction, InstructionInfoFactory, MemoryOperand, Mnemonic, OpAccess,
    OpKind, Register, RflagsBits,
};

use super::{Slot, exec_one};
use crate::block::{Block, Insn};
use crate::machine::Machine;
use crate::paging::{Entry, TLB_SIZE, perm};

type Res<T> = Result<T, IcedError>;

/// Host registers that hold guest register copies: 64, 32, 16 and 8-bit names.
const POOL: [[Register; 4]; 6] = [
    [Register::RAX, Register::EAX, Register::AX, Register::AL],
    [Register::RCX, Register::ECX, Register::CX, Register::CL],
    [Register::RDX, Register::EDX, Register::DX, Register::DL],
    [Register::RSI, Register::ESI, Register::SI, Register::SIL],
    [Register::RDI, Register::EDI, Register::DI, Register::DIL],
    [Register::R8, Register::R8D, Register::R8W, Register::R8L],
];

fn sized(p: usize, size: usize) -> Register {
    POOL[p][match size {
        8 => 0,
        4 => 1,
        2 => 2,
        _ => 3,
    }]
}

/// The arithmetic flags in EFLAGS positions.
pub(super) const ARITH: u32 = 0x8d5;

pub(super) fn eflags(b: u32) -> u32 {
    let mut r = 0;
    for (iced, ef) in [
        (RflagsBits::OF, 0x800),
        (RflagsBits::SF, 0x80),
        (RflagsBits::ZF, 0x40),
        (RflagsBits::AF, 0x10),
        (RflagsBits::CF, 0x1),
        (RflagsBits::PF, 0x4),
    ] {
        if b & iced != 0 {
            r |= ef;
        }
    }
    r
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Nothing to do (NOPs).
    Skip,
    /// Runs natively.
    Native,
    /// The block's final Jcc/JMP rel.
    Branch,
    /// Through the interpreter's handler.
    Helper,
    /// PUSH r64 / POP r64 (not RSP), and the block's final CALL rel / RET.
    Push,
    Pop,
    Call,
    Ret,
    /// The block's final JMP r64 / CALL r64.
    JmpReg,
    CallReg,
}

fn canonical(v: u64) -> bool {
    ((v << 16) as i64 >> 16) as u64 == v
}

fn is_shift(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(m, Shl | Shr | Sar | Rol | Ror | Rcl | Rcr)
}

fn whitelisted(i: &Instruction) -> bool {
    use Mnemonic::*;
    let m = i.mnemonic();
    let regs = |n: u32| (0..n).all(|k| i.op_kind(k) == OpKind::Register);
    match m {
        Mov | Movzx | Movsx | Movsxd | Add | Or | Adc | Sbb | And | Sub | Xor | Cmp | Test
        | Inc | Dec | Neg | Not | Lea | Shl | Shr | Sar | Rol | Ror | Rcl | Rcr | Bsf | Bsr
        | Bswap => true,
        Cmovo | Cmovno | Cmovb | Cmovae | Cmove | Cmovne | Cmovbe | Cmova | Cmovs | Cmovns
        | Cmovp | Cmovnp | Cmovl | Cmovge | Cmovle | Cmovg => true,
        Seto | Setno | Setb | Setae | Sete | Setne | Setbe | Seta | Sets | Setns | Setp | Setnp
        | Setl | Setge | Setle | Setg => true,
        Imul => i.op_count() >= 2,
        Bt | Bts | Btr | Btc => i.op0_kind() == OpKind::Register,
        Xchg => regs(2),
        _ => false,
    }
}

fn gpr_ok(r: Register) -> bool {
    r.is_gpr() && !matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

fn addr_reg_ok(r: Register) -> bool {
    r == Register::None || r.is_gpr32() || r.is_gpr64()
}

fn kind(x: &Insn, last: bool) -> Kind {
    let i = &x.i;
    use Mnemonic::*;
    if matches!(i.mnemonic(), Nop | Endbr64 | Endbr32) {
        return Kind::Skip;
    }
    if last && (i.is_jcc_short_or_near() || i.is_jmp_short_or_near()) {
        // A non-canonical target is the handler's #GP at the branch.
        return if canonical(x.imm) {
            Kind::Branch
        } else {
            Kind::Helper
        };
    }
    match i.code() {
        Op::Push_r64 => return Kind::Push,
        Op::Pop_r64 if i.op0_register() != Register::RSP => return Kind::Pop,
        Op::Call_rel32_64 if last && canonical(x.imm) => return Kind::Call,
        Op::Retnq | Op::Retnq_imm16 if last => return Kind::Ret,
        Op::Jmp_rm64 if last && i.op0_kind() == OpKind::Register => return Kind::JmpReg,
        Op::Call_rm64 if last && i.op0_kind() == OpKind::Register => return Kind::CallReg,
        _ => {}
    }
    if !whitelisted(i) || i.has_rep_prefix() || i.has_repne_prefix() {
        return Kind::Helper;
    }
    if is_shift(i.mnemonic()) && i.op1_kind() != OpKind::Register {
        let bits = if x.osz == 8 { 63 } else { 31 };
        if i.immediate(1) & bits == 0 {
            return Kind::Helper; // flags unchanged: left to the interpreter
        }
    }
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register if gpr_ok(i.op_register(n)) => {}
            OpKind::Memory => {
                let b = i.memory_base();
                let base_ok = addr_reg_ok(b) || b == Register::RIP || b == Register::EIP;
                if !base_ok || !addr_reg_ok(i.memory_index()) {
                    return Kind::Helper;
                }
                if i.mnemonic() != Lea && !matches!(i.memory_size().size(), 1 | 2 | 4 | 8) {
                    return Kind::Helper;
                }
            }
            k if crate::exec::is_imm(k) => {}
            _ => return Kind::Helper,
        }
    }
    Kind::Native
}

/// Byte offsets into the machine and the context.
pub(super) struct Layout {
    pub(super) gpr: i32,
    pub(super) rip: i32,
    pub(super) flags: i32,
    pub(super) generation: i32,
    pub(super) seg_base: [i32; 6],
    /// This privilege level's TLB half.
    pub(super) set: i32,
    pub(super) entry: i32,
    pub(super) page: i32,
    pub(super) perm: i32,
    pub(super) host: i32,
}

impl Layout {
    pub(super) fn new(cpl: u8) -> Layout {
        let seg0 = offset_of!(Machine, cpu.seg);
        let seg_size = size_of::<palacios_x86::Segment>();
        let base = offset_of!(palacios_x86::Segment, base);
        let user = usize::from(cpl == 3);
        Layout {
            gpr: offset_of!(Machine, cpu.gpr) as i32,
            rip: offset_of!(Machine, cpu.rip) as i32,
            flags: offset_of!(Machine, cpu.flags) as i32,
            generation: offset_of!(Machine, tlb.generation) as i32,
            seg_base: std::array::from_fn(|s| (seg0 + s * seg_size + base) as i32),
            set: (offset_of!(Machine, tlb.sets) + user * TLB_SIZE * size_of::<Entry>()) as i32,
            entry: size_of::<Entry>() as i32,
            page: offset_of!(Entry, page) as i32,
            perm: offset_of!(Entry, perm) as i32,
            host: offset_of!(Entry, host) as i32,
        }
    }
}

pub(super) fn reg_num(r: Register) -> i32 {
    r.full_register() as i32 - Register::RAX as i32
}

struct Stub {
    label: CodeLabel,
    k: usize,
    /// Flags pending at the jump, to write back before the handler runs.
    pend: u32,
    resume: CodeLabel,
}

pub(super) struct T<'a> {
    pub(super) a: CodeAssembler,
    pub(super) l: Layout,
    pub(super) b: &'a Block,
    pub(super) pend: u32,
    /// Instruction count of the assembler when the last label was bound.
    pub(super) bound_at: Option<usize>,
    pub(super) epilogue: CodeLabel,
    pub(super) top: CodeLabel,
    slow: Vec<Stub>,
    outs: Vec<(usize, CodeLabel)>,
    pub(super) pure: bool,
    info: InstructionInfoFactory,
    /// The block's link slots and how many exits use them so far.
    pub(super) slots: *mut Slot,
    pub(super) next_slot: usize,
}

/// Translate `b` for code that runs at privilege `cpl`, placed at host address `ip`, with
/// its exits' link slots at `slots` ([`super::SLOTS`] of them). Returns the code and the
/// offset of the entry for chained jumps (past the prologue).
pub fn translate(b: &Block, cpl: u8, ip: u64, slots: *mut Slot) -> Option<(Vec<u8>, u64)> {
    let n = b.insns.len();
    let kinds: Vec<Kind> = (0..n).map(|k| kind(&b.insns[k], k + 1 == n)).collect();
    if kinds.iter().all(|k| matches!(k, Kind::Helper | Kind::Skip)) {
        return None; // nothing would run natively: the interpreter is as fast
    }
    let mut t = T::new(b, cpl, slots).ok()?;
    t.body(&kinds).ok()?;
    let r =
        t.a.assemble_options(
            ip,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .ok()?;
    let chain = r.label_ip(&t.top).ok()? - ip;
    Some((r.inner.code_buffer, chain))
}

impl<'a> T<'a> {
    pub(super) fn new(b: &'a Block, cpl: u8, slots: *mut Slot) -> Res<T<'a>> {
        let mut a = CodeAssembler::new(64)?;
        let epilogue = a.create_label();
        let top = a.create_label();
        Ok(T {
            a,
            l: Layout::new(cpl),
            b,
            pend: 0,
            bound_at: None,
            epilogue,
            top,
            slow: Vec::new(),
            outs: Vec::new(),
            pure: false,
            info: InstructionInfoFactory::new(),
            slots,
            next_slot: 0,
        })
    }

    /// Bind `l` to the next instruction (a NOP separates two labels at one place).
    pub(super) fn bind(&mut self, l: &mut CodeLabel) -> Res<()> {
        let n = self.a.instructions().len();
        if self.bound_at == Some(n) {
            self.a.nop()?;
        }
        self.a.set_label(l)?;
        self.bound_at = Some(self.a.instructions().len());
        Ok(())
    }

    pub(super) fn add(&mut self, i: Res<Instruction>) -> Res<()> {
        self.a.add_instruction(i?)
    }

    /// The whole function, given each instruction's [`Kind`].
    fn body(&mut self, kinds: &[Kind]) -> Res<()> {
        let n = self.b.insns.len();
        self.pure = !kinds.contains(&Kind::Helper);
        for r in [rbx, rbp, r12, r13, r14, r15] {
            self.a.push(r)?;
        }
        self.a.sub(rsp, 8)?;
        self.a.mov(rbx, rdi)?;
        self.a.mov(r14, rsi)?;
        self.a.xor(r13d, r13d)?;
        let mut top = self.top;
        self.bind(&mut top)?;
        self.top = top;
        for k in 0..n {
            match kinds[k] {
                Kind::Skip => {}
                Kind::Native => self.native(k)?,
                Kind::Branch => self.branch(k)?,
                Kind::Helper => {
                    self.flush()?;
                    self.call_helper(k)?;
                }
                Kind::Push | Kind::Pop => self.push_pop(k, kinds[k] == Kind::Push)?,
                Kind::Call => self.call(k)?,
                Kind::Ret => self.ret(k)?,
                Kind::JmpReg | Kind::CallReg => self.indirect(k, kinds[k] == Kind::CallReg)?,
            }
        }
        let last = kinds[n - 1];
        if !matches!(
            last,
            Kind::Branch | Kind::Call | Kind::Ret | Kind::JmpReg | Kind::CallReg
        ) {
            self.flush()?;
            if last != Kind::Helper {
                self.set_rip(self.b.insns[n - 1].next)?;
            }
            self.a.lea(rax, qword_ptr(r13 + n as i32))?;
            self.a.jmp(self.epilogue)?;
        }
        self.stubs()?;
        let mut ep = self.epilogue;
        self.bind(&mut ep)?;
        self.a.add(rsp, 8)?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            self.a.pop(r)?;
        }
        self.a.ret()
    }

    pub(super) fn set_rip(&mut self, v: u64) -> Res<()> {
        self.a.mov(rax, v)?;
        self.a.mov(qword_ptr(rbx + self.l.rip), rax)
    }

    /// Write the pending host flags back to the guest's RFLAGS.
    pub(super) fn flush(&mut self) -> Res<()> {
        if self.pend == 0 {
            return Ok(());
        }
        let f = qword_ptr(rbx + self.l.flags);
        self.a.mov(rax, f)?;
        self.a.and(rax, !(self.pend as i32))?;
        self.a.mov(r10, r15)?;
        self.a.and(r10d, self.pend as i32)?;
        self.a.or(rax, r10)?;
        self.a.mov(f, rax)?;
        self.pend = 0;
        Ok(())
    }

    pub(super) fn out_label(&mut self, k: usize) -> CodeLabel {
        if let Some(&(_, l)) = self.outs.iter().find(|(j, _)| *j == k) {
            return l;
        }
        let l = self.a.create_label();
        self.outs.push((k, l));
        l
    }

    /// Run instruction `k` through its handler (flags must be written back already).
    pub(super) fn call_helper(&mut self, k: usize) -> Res<()> {
        let x: &Insn = &self.b.insns[k];
        self.set_rip(x.next)?;
        self.a.mov(rdi, rbx)?;
        self.a.mov(rsi, x as *const Insn as u64)?;
        self.a.mov(rax, exec_one as *const () as u64)?;
        self.a.call(rax)?;
        self.a.test(eax, eax)?;
        let out = self.out_label(k);
        self.a.jnz(out)
    }

    pub(super) fn native(&mut self, k: usize) -> Res<()> {
        let x: &'a Insn = &self.b.insns[k];
        let i = &x.i;
        let mods = eflags(i.rflags_modified()) & ARITH;
        let mut reads = eflags(i.rflags_read()) & ARITH;
        if is_shift(i.mnemonic()) && i.op1_kind() == OpKind::Register {
            reads |= mods; // a count of 0 in CL leaves the flags alone
        }
        // Write pending flags back before a reader, and before this instruction's own flags
        // replace R15 when some pending ones would be lost (a TLB miss path writes them back
        // by itself).
        if reads != 0 || (mods != 0 && self.pend & !mods != 0) {
            self.flush()?;
        }
        let info = self.info.info(i);
        let mem_access = info.used_memory().first().map(|u| u.access());
        let accesses: Vec<OpAccess> = (0..i.op_count()).map(|n| info.op_access(n)).collect();

        // Guest registers used, each with a host copy.
        let mut map: Vec<Register> = Vec::new();
        let host = |r: Register, map: &mut Vec<Register>| -> usize {
            let f = r.full_register();
            match map.iter().position(|&g| g == f) {
                Some(p) => p,
                None => {
                    map.push(f);
                    map.len() - 1
                }
            }
        };
        let has_mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
        let base = i.memory_base();
        let index = i.memory_index();
        let rip_rel = matches!(base, Register::RIP | Register::EIP)
            || (base == Register::None && index == Register::None);
        for n in 0..i.op_count() {
            if i.op_kind(n) == OpKind::Register {
                host(i.op_register(n), &mut map);
            }
        }
        if has_mem && !rip_rel {
            for r in [base, index] {
                if r != Register::None {
                    host(r, &mut map);
                }
            }
        }
        let pool = |r: Register, map: &Vec<Register>| {
            map.iter()
                .position(|&g| g == r.full_register())
                .unwrap_or(0)
        };
        for (p, &g) in map.iter().enumerate() {
            self.add(Instruction::with2(
                Op::Mov_r64_rm64,
                POOL[p][0],
                MemoryOperand::with_base_displ(
                    Register::RBX,
                    i64::from(self.l.gpr + 8 * reg_num(g)),
                ),
            ))?;
        }

        let mut h = *i;
        if i.mnemonic() == Mnemonic::Lea {
            let d = i.op0_register();
            let dst = sized(pool(d, &map), d.size());
            if rip_rel {
                let v = i.memory_displacement64() & x.amask;
                let (code, v) = match d.size() {
                    8 => (Op::Mov_r64_imm64, v),
                    4 => (Op::Mov_r32_imm32, v & 0xffff_ffff),
                    _ => (Op::Mov_r16_imm16, v & 0xffff),
                };
                self.add(Instruction::with2(code, dst, v))?;
            } else {
                h.set_op0_register(dst);
                if base != Register::None {
                    h.set_memory_base(sized(pool(base, &map), base.size()));
                }
                if index != Register::None {
                    h.set_memory_index(sized(pool(index, &map), index.size()));
                }
                h.set_segment_prefix(Register::None);
                self.a.add_instruction(h)?;
            }
        } else {
            if has_mem {
                self.address(x, &map)?;
                let need = match mem_access {
                    Some(OpAccess::Read | OpAccess::CondRead) => perm::R,
                    _ => perm::R | perm::W,
                };
                let slow = self.slow_path(k);
                self.probe(i.memory_size().size() as i32, need, slow)?;
                h.set_memory_base(Register::R11);
                h.set_memory_index(Register::None);
                h.set_memory_index_scale(1);
                h.set_memory_displacement64(0);
                h.set_memory_displ_size(0);
                h.set_segment_prefix(Register::None);
            }
            for n in 0..i.op_count() {
                if i.op_kind(n) == OpKind::Register {
                    let r = i.op_register(n);
                    h.set_op_register(n, sized(pool(r, &map), r.size()));
                }
            }
            if reads == 0x1 {
                // Only CF is read (ADC, SBB, RCL/RCR by an immediate): BT sets it without
                // the cost of POPF.
                self.a.bt(qword_ptr(rbx + self.l.flags), 0)?;
            } else if reads != 0 {
                self.a.mov(r10, qword_ptr(rbx + self.l.flags))?;
                self.a.and(r10d, ARITH as i32)?;
                self.a.push(r10)?;
                self.a.popfq()?;
            }
            self.a.add_instruction(h)?;
            if mods != 0 {
                self.a.pushfq()?;
                self.a.pop(r15)?;
                self.pend = mods;
            }
        }
        // Write back the registers the instruction wrote.
        for n in 0..i.op_count() {
            if i.op_kind(n) != OpKind::Register {
                continue;
            }
            let writes = matches!(
                accesses[n as usize],
                OpAccess::Write
                    | OpAccess::ReadWrite
                    | OpAccess::CondWrite
                    | OpAccess::ReadCondWrite
            );
            if writes {
                let r = i.op_register(n);
                let p = pool(r, &map);
                self.add(Instruction::with2(
                    Op::Mov_rm64_r64,
                    MemoryOperand::with_base_displ(
                        Register::RBX,
                        i64::from(self.l.gpr + 8 * reg_num(r)),
                    ),
                    POOL[p][0],
                ))?;
            }
        }
        self.resume(k)
    }

    /// A TLB-miss path for instruction `k`: returns the label to jump to; the instruction
    /// goes on at [`T::resume`].
    pub(super) fn slow_path(&mut self, k: usize) -> CodeLabel {
        let label = self.a.create_label();
        let resume = self.a.create_label();
        self.slow.push(Stub {
            label,
            k,
            pend: self.pend,
            resume,
        });
        label
    }

    /// Where instruction `k`'s TLB-miss path comes back.
    pub(super) fn resume(&mut self, k: usize) -> Res<()> {
        if let Some(s) = self.slow.last_mut()
            && s.k == k
        {
            let mut resume = s.resume;
            self.bind(&mut resume)?;
        }
        Ok(())
    }

    /// The linear address of the memory operand into R11 (64-bit mode: only FS and GS
    /// have bases).
    pub(super) fn address(&mut self, x: &Insn, map: &[Register]) -> Res<()> {
        let i = &x.i;
        let base = i.memory_base();
        let index = i.memory_index();
        let pool = |r: Register| {
            map.iter()
                .position(|&g| g == r.full_register())
                .unwrap_or(0)
        };
        if matches!(base, Register::RIP | Register::EIP)
            || (base == Register::None && index == Register::None)
        {
            self.a.mov(r11, i.memory_displacement64() & x.amask)?;
        } else {
            let a32 = x.amask == 0xffff_ffff;
            let hb = if base == Register::None {
                Register::None
            } else {
                sized(pool(base), base.size())
            };
            let hi = if index == Register::None {
                Register::None
            } else {
                sized(pool(index), index.size())
            };
            let d = i.memory_displacement64();
            let (disp, dsize) = if a32 {
                let d = d as u32;
                (i64::from(d), if d == 0 { 0 } else { 4 })
            } else {
                let d = d as i64;
                (d, if d == 0 { 0 } else { 8 })
            };
            let mo = MemoryOperand::new(
                hb,
                hi,
                i.memory_index_scale(),
                disp,
                dsize,
                false,
                Register::None,
            );
            if a32 {
                self.add(Instruction::with2(Op::Lea_r32_m, Register::R11D, mo))?;
            } else {
                self.add(Instruction::with2(Op::Lea_r64_m, Register::R11, mo))?;
            }
        }
        let seg = i.memory_segment();
        if matches!(seg, Register::FS | Register::GS) {
            let s = if seg == Register::FS { 4 } else { 5 };
            self.a.add(r11, qword_ptr(rbx + self.l.seg_base[s]))?;
        }
        Ok(())
    }

    /// Look the linear address in R11 up in the TLB; on a hit R11 becomes the host
    /// pointer, otherwise jump to `slow`.
    pub(super) fn probe(&mut self, size: i32, need: u8, slow: CodeLabel) -> Res<()> {
        let l = &self.l;
        let (set, page, perm_off, host, entry) = (l.set, l.page, l.perm, l.host, l.entry);
        self.a.mov(r10, r11)?;
        self.a.shr(r10, 12)?;
        self.a.mov(r9d, r10d)?;
        self.a.and(r9d, (TLB_SIZE - 1) as i32)?;
        self.a.imul_3(r9d, r9d, entry)?;
        self.a.cmp(qword_ptr(rbx + r9 + (set + page)), r10)?;
        self.a.jne(slow)?;
        self.a.movzx(r10d, byte_ptr(rbx + r9 + (set + perm_off)))?;
        self.a.and(r10d, i32::from(need))?;
        self.a.cmp(r10d, i32::from(need))?;
        self.a.jne(slow)?;
        if size > 1 {
            self.a.mov(r10d, r11d)?;
            self.a.and(r10d, 0xfff)?;
            self.a.cmp(r10d, 0x1000 - size)?;
            self.a.ja(slow)?;
        }
        self.a.and(r11d, 0xfff)?;
        self.a.add(r11, qword_ptr(rbx + r9 + (set + host)))
    }

    /// Out-of-line code: TLB misses and the exits after a handler.
    pub(super) fn stubs(&mut self) -> Res<()> {
        let slow = std::mem::take(&mut self.slow);
        for s in slow {
            let mut label = s.label;
            self.bind(&mut label)?;
            self.pend = s.pend;
            self.flush()?;
            self.call_helper(s.k)?;
            // The handler wrote RFLAGS itself: make the pending copy agree with it.
            self.a.mov(r15, qword_ptr(rbx + self.l.flags))?;
            self.a.jmp(s.resume)?;
        }
        let outs = std::mem::take(&mut self.outs);
        for (k, mut label) in outs {
            let x: &Insn = &self.b.insns[k];
            self.bind(&mut label)?;
            let mut fault = self.a.create_label();
            self.a.cmp(eax, 2)?;
            self.a.je(fault)?;
            self.a.lea(rax, qword_ptr(r13 + (k + 1) as i32))?;
            self.a.jmp(self.epilogue)?;
            self.bind(&mut fault)?;
            self.set_rip(x.i.ip())?;
            self.a.lea(rax, qword_ptr(r13 + k as i32))?;
            self.a.bts(rax, 63)?;
            self.a.jmp(self.epilogue)?;
        }
        Ok(())
    }
}
