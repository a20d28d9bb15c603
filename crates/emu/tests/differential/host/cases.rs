//! case generation.

use super::*;

pub(crate) struct Case {
    pub(crate) bytes: Vec<u8>,
    pub(crate) ins: Instruction,
    pub(crate) st: State,
    pub(crate) data: Vec<u8>,
}

pub(crate) enum Op {
    R(Register),
    M(MemoryOperand),
    I(i64),
}

pub(crate) fn build(code: Code, ops: &[Op]) -> Result<Instruction, IcedError> {
    use Op::*;
    match ops {
        [] => Ok(Instruction::with(code)),
        [R(a)] => Instruction::with1(code, *a),
        [M(a)] => Instruction::with1(code, *a),
        [I(a)] => Instruction::with1(code, *a as i32),
        [R(a), R(b)] => Instruction::with2(code, *a, *b),
        [R(a), M(b)] => Instruction::with2(code, *a, *b),
        [M(a), R(b)] => Instruction::with2(code, *a, *b),
        [R(a), I(b)] => Instruction::with2(code, *a, *b),
        [M(a), I(b)] => Instruction::with2(code, *a, *b as i32),
        [I(a), I(b)] => Instruction::with2(code, *a as i32, *b as i32),
        [R(a), R(b), R(c)] => Instruction::with3(code, *a, *b, *c),
        [R(a), R(b), I(c)] => Instruction::with3(code, *a, *b, *c as i32),
        [R(a), M(b), I(c)] => Instruction::with3(code, *a, *b, *c as i32),
        [M(a), R(b), R(c)] => Instruction::with3(code, *a, *b, *c),
        [M(a), R(b), I(c)] => Instruction::with3(code, *a, *b, *c as i32),
        _ => panic!("{code:?}: unexpected operand combination"),
    }
}

pub(crate) fn encode(bits: u32, ins: &Instruction, ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut e = Encoder::new(bits);
    e.encode(ins, ip)?;
    Ok(e.take_buffer())
}

pub(crate) fn decode_one(bits: u32, bytes: &[u8], ip: u64) -> Instruction {
    Decoder::with_ip(bits, bytes, ip, DecoderOptions::NONE).decode()
}

/// Where a memory operand lands and how it is formed.
pub(crate) struct MemPlan {
    pub(crate) target: u64,
    pub(crate) size: u64,
}

pub(crate) fn lockable(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Add | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Inc
            | Dec
            | Neg
            | Not
            | Bts
            | Btr
            | Btc
            | Xadd
            | Cmpxchg
            | Cmpxchg8b
            | Cmpxchg16b
            | Xchg
    )
}

pub(crate) fn uses_stack(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Push | Pop
            | Pushf
            | Pushfd
            | Pushfq
            | Popf
            | Popfd
            | Popfq
            | Enter
            | Leave
            | Call
            | Ret
            | Pusha
            | Pushad
            | Popa
            | Popad
    )
}

pub(crate) fn is_shift(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd
    )
}

pub(crate) struct Gen<'a> {
    pub(crate) rng: &'a mut Rng,
    pub(crate) base: u64,
    pub(crate) ip: u64,
    /// 64: 64-bit code; 32: 32-bit code in compatibility mode (8 registers, no RIP).
    pub(crate) bits: u32,
}

impl Gen<'_> {
    pub(crate) fn random_state(&mut self) -> (State, Vec<u8>) {
        let mut st = State {
            gpr: [0; 16],
            flags: 0,
        };
        for v in st.gpr.iter_mut() {
            *v = self.rng.value();
        }
        st.gpr[RSP] = self.stack_ptr();
        st.flags = (self.rng.next() & COMPARED) | IF | 2;
        let mut data = vec![0u8; DATA_LEN];
        if self.rng.chance(4) {
            // Few distinct bytes: REPE/REPNE comparisons find equal elements.
            let choices = [0u8, 0xff, 1, 0x80];
            let n = 1 + self.rng.below(4) as usize;
            for b in data.iter_mut() {
                *b = choices[self.rng.below(n as u64) as usize];
            }
        } else {
            for c in data.chunks_mut(8) {
                c.copy_from_slice(&self.rng.next().to_le_bytes());
            }
        }
        (st, data)
    }

    pub(crate) fn stack_ptr(&mut self) -> u64 {
        let mut sp = self.base + 0x1a00 + self.rng.below(64) * 8;
        if self.rng.chance(8) {
            sp += self.rng.below(8);
        }
        sp
    }

    /// A buffer address for `size` bytes: anywhere, or across the page boundary.
    pub(crate) fn target(&mut self, size: u64, align: u64) -> u64 {
        let off = if self.rng.chance(4) {
            0x1000 - self.rng.below(size.max(2) + 4)
        } else {
            0x200 + self.rng.below(0x1c00 - 0x200 - 64)
        };
        (self.base + off) & !(align - 1)
    }

    pub(crate) fn small_signed(&mut self) -> i64 {
        self.rng.below(128) as i64 - 64
    }

    /// Number of general-purpose registers the code can name.
    pub(crate) fn nregs(&self) -> usize {
        if self.bits == 32 { 8 } else { 16 }
    }

    /// Choose a memory operand for `size` bytes at `target` and set the registers it uses.
    /// `avoid`: registers whose values are constrained otherwise.
    pub(crate) fn memory(
        &mut self,
        st: &mut State,
        target: u64,
        avoid: &[usize],
        rsp_fixed: bool,
        rip_ok: bool,
        offs: bool,
    ) -> (MemoryOperand, Vec<usize>) {
        // In 32-bit code the buffer is reachable with 32-bit addresses only.
        let a32 = self.bits == 32 || self.rng.chance(6);
        if offs {
            // MOV AL/AX/EAX/RAX, moffs: an absolute 64-bit (or 32-bit) address.
            return (
                MemoryOperand::new(
                    G::None,
                    G::None,
                    1,
                    target as i64,
                    if a32 { 4 } else { 8 },
                    false,
                    G::None,
                ),
                vec![],
            );
        }
        let regs = if a32 { &R32 } else { &R64 };
        let shape = self.rng.below(16);
        if rip_ok && self.bits == 64 && shape == 0 {
            let b = if a32 { G::EIP } else { G::RIP };
            return (
                MemoryOperand::new(b, G::None, 1, target as i64, 4, false, G::None),
                vec![],
            );
        }
        let pool: Vec<usize> = (0..self.nregs()).filter(|i| !avoid.contains(i)).collect();
        let base = if shape == 1 {
            None
        } else if rsp_fixed && shape == 2 && !avoid.contains(&RSP) {
            Some(RSP)
        } else {
            let p: Vec<usize> = pool.iter().copied().filter(|&i| i != RSP).collect();
            Some(self.rng.pick(&p))
        };
        let index = if self.rng.chance(2) || (base.is_none() && self.rng.chance(2)) {
            let p: Vec<usize> = pool
                .iter()
                .copied()
                .filter(|&i| i != RSP && Some(i) != base)
                .collect();
            Some(self.rng.pick(&p))
        } else {
            None
        };
        let scale = self.rng.pick(&[1u64, 2, 4, 8]);
        let am = if a32 { 0xffff_ffffu64 } else { u64::MAX };
        let mut used = Vec::new();
        let mut idx_part = 0u64;
        if let Some(x) = index {
            let v = self.small_signed() as u64;
            st.gpr[x] = if a32 {
                (self.rng.next() << 32) | (v & 0xffff_ffff)
            } else {
                v
            };
            idx_part = v.wrapping_mul(scale);
            used.push(x);
        }
        let (disp, size) = match base {
            Some(b) if b == RSP => {
                let d = target.wrapping_sub(st.gpr[RSP]).wrapping_sub(idx_part) & am;
                let d = if a32 {
                    d as u32 as i32 as i64
                } else {
                    d as i64
                };
                (d, 4)
            }
            Some(b) => {
                let d: i64 = match self.rng.below(4) {
                    0 => 0,
                    1 => self.rng.below(256) as i64 - 128,
                    2 => self.rng.next() as i32 as i64,
                    _ => self.rng.below(0x20000) as i64 - 0x10000,
                };
                let v = target.wrapping_sub(idx_part).wrapping_sub(d as u64);
                st.gpr[b] = if a32 {
                    (self.rng.next() << 32) | (v & 0xffff_ffff)
                } else {
                    v
                };
                used.push(b);
                (d, if d == 0 { 0 } else { 1 })
            }
            None => {
                let d = target.wrapping_sub(idx_part) & am;
                let d = if a32 { d as u32 as i64 } else { d as i64 };
                (
                    d,
                    if index.is_some() {
                        1
                    } else if a32 {
                        4
                    } else {
                        8
                    },
                )
            }
        };
        let br = base.map(|b| regs[b]).unwrap_or(G::None);
        let xr = index.map(|x| regs[x]).unwrap_or(G::None);
        // Sometimes a segment override: all these segments are flat (64-bit code ignores
        // CS, DS, ES and SS overrides; CS would be read-only in 32-bit code).
        let seg = if self.rng.chance(12) {
            if self.bits == 64 {
                self.rng.pick(&[G::ES, G::CS, G::SS, G::DS])
            } else {
                self.rng.pick(&[G::ES, G::SS, G::DS])
            }
        } else {
            G::None
        };
        (
            MemoryOperand::new(br, xr, scale as u32, disp, size, false, seg),
            used,
        )
    }

    pub(crate) fn case(&mut self, form: &Form) -> Option<Case> {
        match form {
            Form::Code { code, .. } => self.code_case(*code),
            Form::Str { code, a32, rep, .. } => self.string_case(*code, *a32, *rep),
            Form::Raw { bytes, kind, .. } => self.raw_case(bytes, *kind),
        }
    }

    pub(crate) fn raw_case(&mut self, bytes: &[u8], kind: RawKind) -> Option<Case> {
        let (mut st, data) = self.random_state();
        match kind {
            RawKind::Branch => {
                if self.rng.chance(2) {
                    st.gpr[RCX] = (self.rng.next() << 32) | self.rng.below(3);
                    if self.rng.chance(2) {
                        st.gpr[RCX] &= 0xffff_ffff;
                    }
                }
            }
            RawKind::Xlat => {
                let t = self.base + 0x200 + self.rng.below(0x1800);
                let a32 = self.bits == 32 || bytes[0] == 0x67;
                st.gpr[RBX] = if a32 { (self.rng.next() << 32) | t } else { t };
            }
        }
        let ins = decode_one(self.bits, bytes, self.ip);
        Some(Case {
            bytes: bytes.to_vec(),
            ins,
            st,
            data,
        })
    }

    pub(crate) fn string_case(
        &mut self,
        code: Code,
        a32: bool,
        rep: RepPrefixKind,
    ) -> Option<Case> {
        use Mnemonic::*;
        let a32 = a32 || self.bits == 32;
        let asz = if a32 { 32 } else { 64 };
        let n = G::None;
        let ins = match code {
            Code::Movsb_m8_m8 => Instruction::with_movsb(asz, n, rep),
            Code::Movsw_m16_m16 => Instruction::with_movsw(asz, n, rep),
            Code::Movsd_m32_m32 => Instruction::with_movsd(asz, n, rep),
            Code::Movsq_m64_m64 => Instruction::with_movsq(asz, n, rep),
            Code::Cmpsb_m8_m8 => Instruction::with_cmpsb(asz, n, rep),
            Code::Cmpsw_m16_m16 => Instruction::with_cmpsw(asz, n, rep),
            Code::Cmpsd_m32_m32 => Instruction::with_cmpsd(asz, n, rep),
            Code::Cmpsq_m64_m64 => Instruction::with_cmpsq(asz, n, rep),
            Code::Scasb_AL_m8 => Instruction::with_scasb(asz, rep),
            Code::Scasw_AX_m16 => Instruction::with_scasw(asz, rep),
            Code::Scasd_EAX_m32 => Instruction::with_scasd(asz, rep),
            Code::Scasq_RAX_m64 => Instruction::with_scasq(asz, rep),
            Code::Lodsb_AL_m8 => Instruction::with_lodsb(asz, n, rep),
            Code::Lodsw_AX_m16 => Instruction::with_lodsw(asz, n, rep),
            Code::Lodsd_EAX_m32 => Instruction::with_lodsd(asz, n, rep),
            Code::Lodsq_RAX_m64 => Instruction::with_lodsq(asz, n, rep),
            Code::Stosb_m8_AL => Instruction::with_stosb(asz, rep),
            Code::Stosw_m16_AX => Instruction::with_stosw(asz, rep),
            Code::Stosd_m32_EAX => Instruction::with_stosd(asz, rep),
            Code::Stosq_m64_RAX => Instruction::with_stosq(asz, rep),
            _ => unreachable!(),
        }
        .ok()?;
        let (mut st, mut data) = self.random_state();
        let size = ins.memory_size().size() as u64;
        let repeated = rep != RepPrefixKind::None;
        let count = if repeated { self.rng.below(20) } else { 0 };
        let upper = |rng: &mut Rng| if a32 { rng.next() << 32 } else { 0 };
        if repeated {
            st.gpr[RCX] = upper(self.rng) | count;
        }
        let ptr = |g: &mut Self| {
            let off = if g.rng.chance(4) {
                0x1000 - 32 + g.rng.below(64)
            } else {
                0x400 + g.rng.below(0x1400)
            };
            g.base + off
        };
        let si = ptr(self);
        let di = ptr(self);
        st.gpr[RSI] = upper(self.rng) | si;
        st.gpr[RDI] = upper(self.rng) | di;
        let m = ins.mnemonic();
        if matches!(m, Scasb | Scasw | Scasd | Scasq) && self.rng.chance(2) {
            // Look for an element that is there.
            let v = rd(
                &data,
                self.base,
                di + size * self.rng.below(count + 1),
                size,
            );
            st.gpr[RAX] = (st.gpr[RAX] & !mask(size)) | v;
        }
        if matches!(m, Cmpsb | Cmpsw | Cmpsd | Cmpsq) && self.rng.chance(2) {
            // Equal runs, differing somewhere.
            let dir_down = st.flags & DF != 0;
            for k in 0..count.max(1) {
                let (s, d) = if dir_down {
                    (si.wrapping_sub(k * size), di.wrapping_sub(k * size))
                } else {
                    (si + k * size, di + k * size)
                };
                if self.rng.chance(6) {
                    continue;
                }
                let v = rd(&data, self.base, s, size);
                wr(&mut data, self.base, d, size, v);
            }
        }
        let bytes = encode(self.bits, &ins, self.ip).ok()?;
        let ins = decode_one(self.bits, &bytes, self.ip);
        Some(Case {
            bytes,
            ins,
            st,
            data,
        })
    }

    pub(crate) fn code_case(&mut self, code: Code) -> Option<Case> {
        use Mnemonic::*;
        let op = code.op_code();
        let mn = code.mnemonic();
        let (mut st, mut data) = self.random_state();
        let stack = uses_stack(mn);
        let branch = BRANCH_CODES.contains(&code);
        let mut rsp_fixed = true;
        if !stack && self.rng.chance(8) {
            st.gpr[RSP] = self.rng.value();
            rsp_fixed = false;
        }
        let kinds = op.op_kinds().to_vec();
        // Which operand (if any) is memory.
        let mem_n = kinds.iter().position(|&k| {
            matches!(k, K::mem | K::mem_offs)
                || (matches!(
                    k,
                    K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem
                ) && self.rng.chance(2))
        });
        let size_of = |k: K| -> u64 {
            match k {
                K::r8_or_mem | K::r8_reg | K::r8_opcode | K::al | K::cl => 1,
                K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode | K::ax => 2,
                K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode | K::eax => 4,
                _ => 8,
            }
        };
        // Registers for register operands.
        let mut regs = vec![G::None; kinds.len()];
        for (n, &k) in kinds.iter().enumerate() {
            if Some(n) == mem_n {
                continue;
            }
            regs[n] = match k {
                K::al => G::AL,
                K::cl => G::CL,
                K::ax => G::AX,
                K::eax => G::EAX,
                K::rax => G::RAX,
                K::r8_or_mem | K::r8_reg | K::r8_opcode if self.bits == 32 => {
                    self.rng
                        .pick(&[G::AL, G::CL, G::DL, G::BL, G::AH, G::CH, G::DH, G::BH])
                }
                K::r8_or_mem | K::r8_reg | K::r8_opcode => self.rng.pick(&R8),
                K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode => {
                    self.rng.pick(&R16[..self.nregs()])
                }
                K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode if branch => {
                    // CALL/JMP through ESP would run the stack.
                    self.rng
                        .pick(&[G::EAX, G::ECX, G::EDX, G::EBX, G::EBP, G::ESI, G::EDI])
                }
                K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode => {
                    self.rng.pick(&R32[..self.nregs()])
                }
                K::r64_or_mem | K::r64_reg | K::r64_rm | K::r64_opcode => {
                    if branch {
                        // CALL/JMP through RSP would run the stack.
                        self.rng.pick(&[
                            G::RAX,
                            G::RCX,
                            G::RDX,
                            G::RBX,
                            G::RBP,
                            G::RSI,
                            G::RDI,
                            G::R8,
                            G::R13,
                            G::R15,
                        ])
                    } else {
                        self.rng.pick(&R64)
                    }
                }
                _ => G::None,
            };
        }
        // BT* with a register bit offset into memory: a bounded offset.
        let bt_mem_reg = matches!(mn, Bt | Bts | Btr | Btc)
            && mem_n == Some(0)
            && kinds.get(1).is_some_and(|&k| k != K::imm8);
        let mut avoid = Vec::new();
        if bt_mem_reg {
            avoid.push(gpr_index(regs[1]));
        }
        if matches!(mn, Enter | Leave) {
            avoid.push(RBP);
        }
        // The memory operand.
        let mut plan = None;
        let mut addr_regs = Vec::new();
        let mut mem_op = None;
        if let Some(n) = mem_n {
            let size = match kinds[n] {
                K::mem => match mn {
                    Cmpxchg8b => 8,
                    Cmpxchg16b => 16,
                    Bound => 2 * regs[0].size() as u64,
                    _ => 8, // LEA: nothing is accessed
                },
                K::mem_offs => size_of(kinds[1 - n]),
                k => size_of(k),
            };
            let align = if mn == Cmpxchg16b { 16 } else { 1 };
            let target = if bt_mem_reg {
                self.base + 0x500 + self.rng.below(0x1500)
            } else {
                self.target(size, align)
            };
            let (m, used) = if mn == Lea {
                self.lea_operand()
            } else {
                self.memory(
                    &mut st,
                    target,
                    &avoid,
                    rsp_fixed,
                    true,
                    kinds[n] == K::mem_offs,
                )
            };
            addr_regs = used;
            mem_op = Some(m);
            if mn != Lea {
                plan = Some(MemPlan { target, size });
                if self.rng.chance(8) {
                    let v = self.rng.pick(&SPECIAL);
                    wr(&mut data, self.base, target, size.min(8), v);
                }
            }
        }
        let free = |r: usize| !addr_regs.contains(&r);
        // Immediates and the operand list.
        let width = plan
            .as_ref()
            .map(|p| p.size)
            .unwrap_or_else(|| regs.first().map(|r| r.size() as u64).unwrap_or(8).max(1));
        let mut ops = Vec::new();
        for (n, &k) in kinds.iter().enumerate() {
            let o = match k {
                K::imm8 => {
                    let v = if is_shift(mn) {
                        self.rng.count(width * 8)
                    } else if mn == Enter {
                        if self.rng.chance(4) {
                            self.rng.below(256)
                        } else {
                            self.rng.below(5)
                        }
                    } else {
                        self.rng.below(256)
                    };
                    Op::I(v as i64)
                }
                K::imm8_const_1 => Op::I(1),
                K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => Op::I(self.rng.next() as i8 as i64),
                // ENTER probes the final stack pointer: its frame stays in the buffer.
                K::imm16 if mn == Enter => Op::I(if self.rng.chance(2) {
                    self.rng.below(64) as i64
                } else {
                    self.rng.below(0x1000) as i64
                }),
                K::imm16 => Op::I(if self.rng.chance(2) {
                    self.rng.below(64) as i64
                } else {
                    self.rng.next() as u16 as i64
                }),
                K::imm32 | K::imm32sex64 => Op::I(self.rng.value() as i32 as i64),
                K::imm64 => Op::I(self.rng.value() as i64),
                K::br64_1 | K::br64_4 | K::br32_1 | K::br32_4 => Op::I(0),
                _ if Some(n) == mem_n => Op::M(mem_op.unwrap()),
                _ => Op::R(regs[n]),
            };
            ops.push(o);
        }
        // Register constraints.
        if bt_mem_reg {
            let r = regs[1];
            let bits = (r.size() * 8) as u64;
            let off = self.rng.below(0x400 * 8 * 2) as i64 - 0x400 * 8;
            let upper = if bits == 64 {
                0
            } else {
                self.rng.next() & !mask(bits / 8)
            };
            st.gpr[gpr_index(r)] = upper | (off as u64 & mask(bits / 8));
        }
        if is_shift(mn) && kinds.last() == Some(&K::cl) && free(RCX) {
            let c = self.rng.count(width * 8);
            st.set_low(G::CL, c);
        }
        if matches!(mn, Div | Idiv) && self.rng.below(8) != 0 {
            let lo_r = if width == 1 { G::AL } else { R64[RAX] };
            if free(RDX) && free(RAX) {
                let lo = st.get(lo_r) & mask(width);
                let hi = if mn == Idiv {
                    if (lo >> (width * 8 - 1)) & 1 == 1 {
                        mask(width)
                    } else {
                        0
                    }
                } else {
                    self.rng.below(4)
                };
                if width == 1 {
                    st.set_low(G::AH, hi);
                } else {
                    st.gpr[RDX] = (st.gpr[RDX] & !mask(width)) | hi;
                }
            }
        }
        if matches!(mn, Enter | Leave) {
            st.gpr[RBP] = self.base + 0x1400 + self.rng.below(0x20) * 8;
            if mn == Enter && self.rng.chance(4) {
                st.gpr[RBP] = self.rng.value();
                // Only a level of 0 or 1 does not read the old frame.
                if let Some(Op::I(level)) = ops.get_mut(1) {
                    *level &= 0xe1;
                }
            }
        }
        if matches!(mn, Popf | Popfd | Popfq) {
            let size = match code {
                Code::Popfw => 2,
                Code::Popfd => 4,
                _ => 8,
            };
            let v = (self.rng.next() & (ARITH | DF | 0x8028)) | IF | 2;
            wr(&mut data, self.base, st.gpr[RSP], size, v);
        }
        if mn == Cmpxchg && self.rng.chance(2) {
            // The comparison succeeds.
            let size = width;
            match &plan {
                Some(p) => {
                    let v = st.gpr[RAX] & mask(size);
                    wr(&mut data, self.base, p.target, size, v);
                }
                None => {
                    let d = regs[0];
                    if free(RAX) && free(gpr_index(d)) {
                        let v = st.get(d);
                        st.gpr[RAX] = (st.gpr[RAX] & !mask(size)) | v;
                    }
                }
            }
        }
        if mn == Bound {
            // In range (BOUND raises #BR otherwise): lower <= index <= upper, signed.
            let p = plan.as_ref().unwrap();
            let w = p.size / 2;
            let idx = sext(st.get(regs[0]), w);
            let (min, max) = (-(1i64 << (w * 8 - 1)), (1i64 << (w * 8 - 1)) - 1);
            let lo = idx
                .saturating_sub(self.rng.below(4) as i64 * self.rng.below(1000) as i64)
                .max(min);
            let hi = idx
                .saturating_add(self.rng.below(4) as i64 * self.rng.below(1000) as i64)
                .min(max);
            wr(&mut data, self.base, p.target, w, lo as u64);
            wr(&mut data, self.base, p.target + w, w, hi as u64);
        }
        if matches!(mn, Cmpxchg8b | Cmpxchg16b) && self.rng.chance(2) {
            let p = plan.as_ref().unwrap();
            let h = p.size / 2;
            let (a, d) = (st.gpr[RAX] & mask(h), st.gpr[RDX] & mask(h));
            wr(&mut data, self.base, p.target, h, a);
            wr(&mut data, self.base, p.target + h, h, d);
        }

        // Encode (branch targets: the next instruction).
        let mut ins = if matches!(
            kinds.first(),
            Some(K::br64_1 | K::br64_4 | K::br32_1 | K::br32_4)
        ) {
            let len = if matches!(kinds[0], K::br64_1 | K::br32_1) {
                2
            } else {
                5
            };
            Instruction::with_branch(code, self.ip + len).ok()?
        } else {
            build(code, &ops).ok()?
        };
        if lockable(mn) && mem_n == Some(0) && self.rng.chance(2) {
            ins.set_has_lock_prefix(true);
        }
        let bytes = encode(self.bits, &ins, self.ip).ok()?;
        let ins = decode_one(self.bits, &bytes, self.ip);
        if ins.len() != bytes.len() || ins.code() != code {
            return None;
        }
        let next = self.ip + bytes.len() as u64;
        // Indirect branches and returns go to the next instruction.
        let w = u64::from(self.bits / 8);
        match code {
            Code::Call_rm64 | Code::Jmp_rm64 | Code::Call_rm32 | Code::Jmp_rm32 => match &plan {
                Some(p) => wr(&mut data, self.base, p.target, w, next),
                None => {
                    if !free(gpr_index(regs[0])) {
                        return None;
                    }
                    st.gpr[gpr_index(regs[0])] = next;
                }
            },
            Code::Retnq | Code::Retnq_imm16 | Code::Retnd | Code::Retnd_imm16 => {
                wr(&mut data, self.base, st.gpr[RSP] & mask(w), w, next)
            }
            _ => {}
        }
        if !valid(&ins, &st, &data, self.base, plan.as_ref()) {
            return None;
        }
        Some(Case {
            bytes,
            ins,
            st,
            data,
        })
    }

    /// LEA's operand: any registers and displacement, any address size (16-bit in 32-bit
    /// code too: LEA does not access memory), RIP-relative too.
    pub(crate) fn lea_operand(&mut self) -> (MemoryOperand, Vec<usize>) {
        let disp = match self.rng.below(3) {
            0 => 0,
            1 => self.rng.below(256) as i64 - 128,
            _ => self.rng.next() as i32 as i64,
        };
        if self.bits == 32 && self.rng.chance(3) {
            let base = self.rng.pick(&[G::BX, G::BP, G::None]);
            let index = self.rng.pick(&[G::SI, G::DI, G::None]);
            let size = if base == G::None && index == G::None {
                2
            } else if disp as i16 as i64 == disp as i8 as i64 {
                1
            } else {
                2
            };
            return (
                MemoryOperand::new(base, index, 1, disp as u16 as i64, size, false, G::None),
                vec![],
            );
        }
        let a32 = self.bits == 32 || self.rng.chance(3);
        let regs = if a32 { &R32 } else { &R64 };
        if self.bits == 64 && self.rng.chance(10) {
            let b = if a32 { G::EIP } else { G::RIP };
            let t = self.ip.wrapping_add(disp as u64) & if a32 { 0xffff_ffff } else { u64::MAX };
            return (
                MemoryOperand::new(b, G::None, 1, t as i64, 4, false, G::None),
                vec![],
            );
        }
        let n = self.nregs() as u64;
        let base = if self.rng.chance(8) {
            None
        } else {
            Some(self.rng.below(n) as usize)
        };
        let index = if self.rng.chance(2) {
            let p: Vec<usize> = (0..n as usize)
                .filter(|&i| i != RSP && Some(i) != base)
                .collect();
            Some(self.rng.pick(&p))
        } else {
            None
        };
        let scale = self.rng.pick(&[1u32, 2, 4, 8]);
        let (disp, size) = match base {
            Some(_) => (disp, if disp == 0 { 0 } else { 1 }),
            None if index.is_some() => (if a32 { disp as u32 as i64 } else { disp }, 1),
            None if a32 => (disp as u32 as i64, 4),
            None => (disp, 8),
        };
        let br = base.map(|b| regs[b]).unwrap_or(G::None);
        let xr = index.map(|x| regs[x]).unwrap_or(G::None);
        (
            MemoryOperand::new(br, xr, scale, disp, size, false, G::None),
            vec![],
        )
    }
}

/// Whether the case is defined and does not fault natively.
pub(crate) fn valid(
    ins: &Instruction,
    st: &State,
    data: &[u8],
    base: u64,
    plan: Option<&MemPlan>,
) -> bool {
    use Mnemonic::*;
    match ins.mnemonic() {
        Div | Idiv => {
            let (size, d) = match ins.op0_kind() {
                OpKind::Register => {
                    let r = ins.op0_register();
                    (r.size() as u64, st.get(r))
                }
                _ => {
                    let p = plan.unwrap();
                    (p.size, rd(data, base, p.target, p.size))
                }
            };
            if d == 0 {
                return false;
            }
            let bits = size * 8;
            let (lo, hi) = if size == 1 {
                (st.gpr[RAX] & 0xff, (st.gpr[RAX] >> 8) & 0xff)
            } else {
                (st.gpr[RAX] & mask(size), st.gpr[RDX] & mask(size))
            };
            let n = (u128::from(hi) << bits) | u128::from(lo);
            if ins.mnemonic() == Div {
                n / u128::from(d) <= u128::from(mask(size))
            } else {
                let sh = 128 - 2 * bits;
                let n = ((n << sh) as i128) >> sh;
                let ds = 64 - bits;
                let d = i128::from(((d << ds) as i64) >> ds);
                let q = n / d;
                q >= -(1i128 << (bits - 1)) && q < (1i128 << (bits - 1))
            }
        }
        // AAM 0 divides by zero.
        Aam => ins.immediate8() != 0,
        Shld | Shrd => {
            // A 16-bit count above 16 leaves the result undefined.
            let size = op_size(ins);
            size != 2 || shift_count(ins, st) & 31 <= 16
        }
        _ => true,
    }
}

pub(crate) fn op_size(ins: &Instruction) -> u64 {
    match ins.op0_kind() {
        OpKind::Register => ins.op0_register().size() as u64,
        _ => ins.memory_size().size() as u64,
    }
}

/// The raw shift count of a shift, rotate or double shift.
pub(crate) fn shift_count(ins: &Instruction, st: &State) -> u64 {
    let n = if matches!(ins.mnemonic(), Mnemonic::Shld | Mnemonic::Shrd) {
        2
    } else {
        1
    };
    if ins.op_count() <= n {
        return 1;
    }
    match ins.op_kind(n) {
        OpKind::Register => st.get(ins.op_register(n)),
        _ => ins.immediate(n) & 0xff,
    }
}

/// Arithmetic flags the Intel SDM leaves undefined after `ins` with inputs `st`.
pub(crate) fn undefined_flags(ins: &Instruction, st: &State) -> u64 {
    use Mnemonic::*;
    let mn = ins.mnemonic();
    match mn {
        And | Or | Xor | Test => AF,
        Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd => {
            let size = op_size(ins);
            let c = shift_count(ins, st) & if size == 8 { 63 } else { 31 };
            if c == 0 {
                return 0;
            }
            let mut u = if c != 1 { OF } else { 0 };
            if matches!(mn, Shl | Sal | Shr | Sar | Shld | Shrd) {
                u |= AF;
            }
            if matches!(mn, Shl | Sal | Shr) && c >= size * 8 {
                u |= CF;
            }
            u
        }
        Mul | Imul => SF | ZF | AF | PF,
        Div | Idiv => ARITH,
        Bt | Bts | Btr | Btc => OF | SF | AF | PF,
        Bsf | Bsr => CF | OF | SF | AF | PF,
        Daa | Das => OF,
        Aaa | Aas => OF | SF | ZF | PF,
        Aam | Aad => OF | AF | CF,
        _ => 0,
    }
}

/// Register bits the SDM leaves undefined after `ins`: (register, bits not compared).
pub(crate) fn undefined_reg_bits(
    ins: &Instruction,
    st: &State,
    data: &[u8],
    base: u64,
) -> Vec<(usize, u64)> {
    use Mnemonic::*;
    match ins.mnemonic() {
        // BSWAP of a 16-bit register (Intel and AMD clear it, but the SDM says undefined).
        Bswap if ins.op0_register().size() == 2 => vec![(gpr_index(ins.op0_register()), 0xffff)],
        // BSF/BSR of zero: the destination is undefined. Cores keep it, but Intel's clear the
        // upper half of a 32-bit destination and AMD's do not: the low 32 bits are compared.
        Bsf | Bsr if ins.op0_register().size() == 4 => {
            let size = 4;
            let src = match ins.op1_kind() {
                OpKind::Register => st.get(ins.op1_register()),
                _ => rd(data, base, mem_addr(ins, st), size),
            };
            (src & mask(size) == 0)
                .then(|| (gpr_index(ins.op0_register()), !0xffff_ffffu64))
                .into_iter()
                .collect()
        }
        // REP/REPNE string instruction, 32-bit addressing, ECX = 0: no iteration runs, and
        // whether the upper halves of RCX, RSI and RDI are cleared is implementation-specific
        // (some Intel cores clear them, as if ECX/ESI/EDI had been written; others leave them).
        _ if (ins.has_rep_prefix() || ins.has_repne_prefix())
            && string_a32(ins)
            && st.get(G::RCX) & 0xffff_ffff == 0 =>
        {
            [G::RCX, G::RSI, G::RDI]
                .into_iter()
                .map(|r| (gpr_index(r), !0xffff_ffffu64))
                .collect()
        }
        _ => Vec::new(),
    }
}

/// A string instruction with 32-bit addressing (ESI/EDI operands: an 0x67 prefix in 64-bit code).
fn string_a32(ins: &Instruction) -> bool {
    (0..ins.op_count())
        .any(|i| matches!(ins.op_kind(i), OpKind::MemorySegESI | OpKind::MemoryESEDI))
}

/// The address of a (non-RIP-relative or RIP-relative) memory operand.
pub(crate) fn mem_addr(ins: &Instruction, st: &State) -> u64 {
    let mut a = ins.memory_displacement64();
    let b = ins.memory_base();
    let mut am = u64::MAX;
    if b != G::None && b != G::RIP && b != G::EIP {
        a = a.wrapping_add(st.get(b));
        if b.size() == 4 {
            am = 0xffff_ffff;
        }
    }
    let x = ins.memory_index();
    if x != G::None {
        a = a.wrapping_add(st.get(x).wrapping_mul(u64::from(ins.memory_index_scale())));
        if x.size() == 4 {
            am = 0xffff_ffff;
        }
    }
    if b == G::EIP || (b == G::None && x == G::None && ins.memory_displ_size() == 4) {
        am = 0xffff_ffff;
    }
    a & am
}
