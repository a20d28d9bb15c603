//! instruction forms.

use super::*;

#[derive(Clone)]
pub(crate) enum Form {
    /// Operands from the opcode table.
    Code { code: Code, bits: u32 },
    /// A string instruction in an address size (a32: 67h in 64-bit code) with a repeat prefix.
    Str {
        code: Code,
        a32: bool,
        rep: RepPrefixKind,
        bits: u32,
    },
    /// Fixed bytes (branches over an increment, XLAT).
    Raw {
        name: String,
        bytes: Vec<u8>,
        kind: RawKind,
        bits: u32,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawKind {
    /// Conditional branch or loop over an instruction: small RCX sometimes.
    Branch,
    /// XLAT: RBX (EBX with 67h or in 32-bit code) points into the buffer.
    Xlat,
}

impl Form {
    pub(crate) fn bits(&self) -> u32 {
        match self {
            Form::Code { bits, .. } | Form::Str { bits, .. } | Form::Raw { bits, .. } => *bits,
        }
    }

    pub(crate) fn name(&self) -> String {
        let n = match self {
            Form::Code { code, .. } => format!("{code:?}"),
            Form::Str { code, a32, rep, .. } => {
                let r = match rep {
                    RepPrefixKind::None => "",
                    RepPrefixKind::Repe => "rep ",
                    RepPrefixKind::Repne => "repne ",
                    _ => "?",
                };
                format!("{r}{code:?}{}", if *a32 { " a32" } else { "" })
            }
            Form::Raw { name, .. } => name.clone(),
        };
        if self.bits() == 32 {
            format!("compat32 {n}")
        } else {
            n
        }
    }
}

/// Mnemonics whose table forms are tested.
pub(crate) fn tested(m: Mnemonic, bits: u32) -> bool {
    use Mnemonic::*;
    let common = matches!(
        m,
        Add | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shld
            | Shrd
            | Mul
            | Imul
            | Div
            | Idiv
            | Bt
            | Bts
            | Btr
            | Btc
            | Bsf
            | Bsr
            | Popcnt
            | Mov
            | Movzx
            | Movsx
            | Movsxd
            | Movbe
            | Xchg
            | Xadd
            | Cmpxchg
            | Cmpxchg8b
            | Cmpxchg16b
            | Bswap
            | Lea
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Lahf
            | Sahf
            | Clc
            | Stc
            | Cmc
            | Cld
            | Std
            | Push
            | Pop
            | Pushf
            | Pushfd
            | Pushfq
            | Popf
            | Popfd
            | Popfq
            | Enter
            | Leave
            | Nop
            | Pause
            | Lfence
            | Mfence
            | Sfence
            | Prefetchnta
            | Prefetcht0
            | Prefetcht1
            | Prefetcht2
            | Prefetchw
            | Clflush
            | Endbr64
            | Endbr32
            | Seto
            | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
            | Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
    );
    // Instructions that only 32-bit code has.
    let legacy = matches!(
        m,
        Daa | Das | Aaa | Aas | Aam | Aad | Pusha | Pushad | Popa | Popad | Arpl | Bound
    );
    common || (bits == 32 && legacy)
}

/// Near control transfers, tested with targets that continue at the next instruction.
pub(crate) const BRANCH_CODES: [Code; 14] = [
    Code::Call_rel32_64,
    Code::Call_rm64,
    Code::Jmp_rel8_64,
    Code::Jmp_rel32_64,
    Code::Jmp_rm64,
    Code::Retnq,
    Code::Retnq_imm16,
    Code::Call_rel32_32,
    Code::Call_rm32,
    Code::Jmp_rel8_32,
    Code::Jmp_rel32_32,
    Code::Jmp_rm32,
    Code::Retnd,
    Code::Retnd_imm16,
];

pub(crate) fn supported_kind(k: K) -> bool {
    matches!(
        k,
        K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_rm
            | K::r16_opcode
            | K::r32_reg
            | K::r32_rm
            | K::r32_opcode
            | K::r64_reg
            | K::r64_rm
            | K::r64_opcode
            | K::mem
            | K::mem_offs
            | K::al
            | K::cl
            | K::ax
            | K::eax
            | K::rax
            | K::imm8
            | K::imm8_const_1
            | K::imm8sex16
            | K::imm8sex32
            | K::imm8sex64
            | K::imm16
            | K::imm32
            | K::imm32sex64
            | K::imm64
            | K::br32_1
            | K::br32_4
            | K::br64_1
            | K::br64_4
    )
}

/// All forms: 64-bit code, and 32-bit (compatibility-mode) code if `compat`.
pub(crate) fn forms(compat: bool) -> Vec<Form> {
    let mut v = Vec::new();
    for bits in [64u32, 32] {
        if bits == 32 && !compat {
            continue;
        }
        for code in Code::values() {
            let op = code.op_code();
            let mode = if bits == 64 { op.mode64() } else { op.mode32() };
            if !op.is_instruction() || !mode || op.encoding() != EncodingKind::Legacy {
                continue;
            }
            let branch = BRANCH_CODES.contains(&code);
            if !branch && !tested(code.mnemonic(), bits) {
                continue;
            }
            if !op.op_kinds().iter().all(|&k| supported_kind(k)) {
                continue;
            }
            // The 486's early CMPXCHG opcodes (0F A6/A7) are no longer instructions.
            if matches!(
                code,
                Code::Cmpxchg486_rm8_r8 | Code::Cmpxchg486_rm16_r16 | Code::Cmpxchg486_rm32_r32
            ) {
                continue;
            }
            v.push(Form::Code { code, bits });
        }
        use Code::*;
        let strings = [
            Movsb_m8_m8,
            Movsw_m16_m16,
            Movsd_m32_m32,
            Movsq_m64_m64,
            Cmpsb_m8_m8,
            Cmpsw_m16_m16,
            Cmpsd_m32_m32,
            Cmpsq_m64_m64,
            Scasb_AL_m8,
            Scasw_AX_m16,
            Scasd_EAX_m32,
            Scasq_RAX_m64,
            Lodsb_AL_m8,
            Lodsw_AX_m16,
            Lodsd_EAX_m32,
            Lodsq_RAX_m64,
            Stosb_m8_AL,
            Stosw_m16_AX,
            Stosd_m32_EAX,
            Stosq_m64_RAX,
        ];
        for code in strings {
            if bits == 32 && code.op_code().operand_size() == 64 {
                continue;
            }
            // 32-bit code has no address size that reaches the buffer other than its own.
            let sizes: &[bool] = if bits == 64 { &[false, true] } else { &[false] };
            for &a32 in sizes {
                for rep in [
                    RepPrefixKind::None,
                    RepPrefixKind::Repe,
                    RepPrefixKind::Repne,
                ] {
                    v.push(Form::Str {
                        code,
                        a32,
                        rep,
                        bits,
                    });
                }
            }
        }
        // Conditional branches and loops over a 3-byte increment of the last register.
        let inc: &[u8] = if bits == 64 {
            &[0x49, 0xff, 0xc7] // inc r15
        } else {
            &[0x8d, 0x7f, 0x01] // lea edi, [edi+1]
        };
        const CC: [&str; 16] = [
            "o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g",
        ];
        for (cc, name) in CC.iter().enumerate() {
            let mut b = vec![0x70 | cc as u8, 3];
            b.extend_from_slice(inc);
            v.push(Form::Raw {
                name: format!("j{name} rel8 over inc"),
                bytes: b,
                kind: RawKind::Branch,
                bits,
            });
            let mut b = vec![0x0f, 0x80 | cc as u8, 3, 0, 0, 0];
            b.extend_from_slice(inc);
            v.push(Form::Raw {
                name: format!("j{name} rel32 over inc"),
                bytes: b,
                kind: RawKind::Branch,
                bits,
            });
        }
        for (op, name) in [
            (0xe0u8, "loopne"),
            (0xe1, "loope"),
            (0xe2, "loop"),
            (0xe3, "jcxz"),
        ] {
            // The address-size prefix selects the count register: ECX in 64-bit code, CX
            // in 32-bit code.
            for prefixed in [false, true] {
                let mut b = if prefixed { vec![0x67] } else { vec![] };
                b.extend_from_slice(&[op, 3]);
                b.extend_from_slice(inc);
                let counter = match (bits, prefixed) {
                    (64, false) => "rcx",
                    (64, true) | (32, false) => "ecx",
                    _ => "cx",
                };
                v.push(Form::Raw {
                    name: format!("{name} {counter} over inc"),
                    bytes: b,
                    kind: RawKind::Branch,
                    bits,
                });
            }
        }
        v.push(Form::Raw {
            name: "xlatb".into(),
            bytes: vec![0xd7],
            kind: RawKind::Xlat,
            bits,
        });
        if bits == 64 {
            v.push(Form::Raw {
                name: "rex.w xlatb".into(),
                bytes: vec![0x48, 0xd7],
                kind: RawKind::Xlat,
                bits,
            });
            v.push(Form::Raw {
                name: "xlatb a32".into(),
                bytes: vec![0x67, 0xd7],
                kind: RawKind::Xlat,
                bits,
            });
        }
    }
    v
}
