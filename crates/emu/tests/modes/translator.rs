//! The block translator against the interpreter: one 64-bit guest with loops that keep
//! flags pending across memory operands, read them with ADC/SBB/SETcc/CMOVcc, shift by a
//! CL count that is sometimes 0, keep CF across INC, use 8/16-bit registers, PUSH/POP and
//! CALL/RET and JMP/CALL through a register (one leaf returning to two call sites, so
//! chained RETs must check their target), loop inside one block, patch an instruction of a translated and linked block,
//! and page-fault in the middle of a translated block. Both engines must report the same
//! values and the same fault.

use super::long::lm64_init;
use super::*;

/// A page the identity map does not cover.
const UNMAPPED: u64 = 0x30_0000;

fn guest() -> Guest {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        let mut top = a.create_label();
        let mut inner = a.create_label();
        let mut leaf = a.create_label();
        let mut skip_fault = a.create_label();
        let mut after_leaf = a.create_label();
        let mut patch = a.create_label();
        let mut after_jmp = a.create_label();
        let mut skip_patch = a.create_label();
        a.mov(rbx, 0x1234_5678_9abc_def1u64)?;
        a.mov(rdx, 0x0f0f_1234_8765_4321u64)?;
        a.mov(rsi, 1u64)?;
        a.mov(rdi, 2u64)?;
        a.mov(r8, 3u64)?;
        a.mov(r9, 0xffff_ffff_0000_0005u64)?;
        a.mov(r10, 7u64)?;
        a.mov(r11, 0u64)?;
        a.mov(r12, 150u64)?;
        a.mov(r14, 0u64)?;
        a.mov(r15, DATA)?;
        a.set_label(&mut top)?;
        // Flags from ADD stay pending across a store, then ADC reads CF from memory.
        a.mov(rax, r12)?;
        a.imul_3(rax, rax, 0x1e37_79b9)?;
        a.add(rax, rdx)?;
        a.mov(qword_ptr(r15 + 8), rax)?;
        a.adc(rbx, qword_ptr(r15 + 8))?;
        // CMP, then SETcc / CMOVcc / SBB.
        a.cmp(eax, edx)?;
        a.setb(cl)?;
        a.cmovl(rsi, rdi)?;
        a.sbb(r8d, r9d)?;
        a.movzx(ecx, cl)?;
        a.add(rbx, rcx)?;
        // Shift by CL, 0 every fourth iteration (flags must survive), then ADC reads CF.
        a.mov(ecx, r12d)?;
        a.and(ecx, 3)?;
        a.add(rdx, rbx)?;
        a.shl(rdx, cl)?;
        a.adc(rbx, 0)?;
        // CF across INC.
        a.add(r9, r10)?;
        a.inc(r11)?;
        a.adc(rbx, 0)?;
        // A second call site of the same leaf (CALL r64): its RET goes to two places. The
        // ADD after it is patched by the guest at iteration 100.
        a.lea(rax, ptr(leaf))?;
        a.call(rax)?;
        a.set_label(&mut patch)?;
        a.add(rbx, 5)?;
        // Partial registers through memory.
        a.add(al, dl)?;
        a.mov(byte_ptr(r15 + 16), al)?;
        a.movzx(r10d, word_ptr(r15 + 16))?;
        a.xchg(r10, r11)?;
        a.add(rbx, r10)?;
        // PUSH/POP and CALL/RET.
        a.push(rbx)?;
        a.push(rdx)?;
        a.pop(rax)?;
        a.pop(rcx)?;
        a.xor(rbx, rax)?;
        a.call(leaf)?;
        a.jmp(after_leaf)?;
        a.set_label(&mut leaf)?;
        a.ror(rbx, 7)?;
        a.ret()?;
        a.set_label(&mut after_leaf)?;
        a.lea(rcx, ptr(after_jmp))?;
        a.jmp(rcx)?;
        a.set_label(&mut after_jmp)?;
        // A loop inside one block.
        a.mov(r13, 20u64)?;
        a.set_label(&mut inner)?;
        a.add(r14, r13)?;
        a.rol(r14, 3)?;
        a.dec(r13)?;
        a.jnz(inner)?;
        // At iteration 75, a load from an unmapped page right after a CMP.
        a.cmp(r12, 75)?;
        a.jne(skip_fault)?;
        a.probe64(|a| {
            a.mov(rax, UNMAPPED)?;
            a.cmp(rax, rbx)?;
            a.add(rbx, qword_ptr(rax))?;
            Ok(())
        })?;
        // (AF is left out: the handler's SHR leaves it undefined, and the translator takes
        // the host CPU's value where the interpreter picks its own.)
        a.pushfq()?;
        a.pop(rax)?;
        a.and(eax, 0x8c5)?;
        a.rep_eax()?;
        a.set_label(&mut skip_fault)?;
        // Self-modifying code: the ADD's imm8 (REX.W 83 /0 ib) becomes 9.
        a.cmp(r12, 100)?;
        a.jne(skip_patch)?;
        a.lea(rax, ptr(patch))?;
        a.mov(byte_ptr(rax + 3), 9)?;
        a.set_label(&mut skip_patch)?;
        a.dec(r12)?;
        a.jnz(top)?;
        for r in [rbx, rdx, rsi, r8, r9, r11, r14] {
            a.mov(rax, r)?;
            a.rep_eax()?;
            a.shr(rax, 32)?;
            a.rep_eax()?;
        }
        a.add(rax, rbx)?;
        a.pushfq()?;
        a.pop(rax)?;
        a.and(eax, 0x8d5)?;
        a.rep_eax()?;
        a.hlt()
    });
    g
}

#[test]
fn translator_matches_the_interpreter() {
    // A fresh guest for each engine: a run changes its memory (TSS busy bit, data).
    let engine = |translate: bool| {
        let out = run_with(
            &guest(),
            Hooks {
                options: Some(palacios_emu::EmuOptions {
                    no_jit: !translate,
                    jit_threshold: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let translated = out
            .vcpu
            .stats()
            .into_iter()
            .find(|(k, _)| k == "emu blocks translated")
            .map_or(0, |(_, v)| v);
        (out.events, translated)
    };
    let (interp, none) = engine(false);
    let (jit, translated) = engine(true);
    assert_eq!(none, 0, "the interpreter translated blocks");
    assert!(translated >= 5, "only {translated} blocks translated");
    assert!(
        interp.contains(&pf(0, UNMAPPED, KCODE64)),
        "no page fault reported: {interp:?}"
    );
    assert_eq!(interp.len(), 1 + 1 + 14 + 1, "{interp:?}");
    assert_eq!(jit, interp);
}

/// A guest that runs through many long blocks cannot make one core's block cache hold more
/// host memory than the limit: the cache is dropped instead, and `--stats` reports both.
#[test]
fn block_cache_is_bounded_by_memory() {
    let g = Guest::new();
    g.boot_pm32();
    // 12,000 blocks of 63 NOPs and a JMP to the next, from 1 MiB; then HLT.
    let n = 12_000u64;
    let base = 0x10_0000u64;
    let mut code = Vec::new();
    for _ in 0..n {
        code.extend_from_slice(&[0x90; 63]);
        code.extend_from_slice(&[0xe9, 0, 0, 0, 0]); // jmp +0: the next block
    }
    code.push(0xf4);
    g.write(base, &code);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.mov(eax, base as u32)?;
        a.jmp(eax)
    });
    let out = run(&g);
    let stats: std::collections::HashMap<String, u64> = out.vcpu.stats().into_iter().collect();
    let bytes = stats["emu block cache bytes"];
    let limit = stats["emu block cache bytes limit"];
    assert!(bytes <= limit, "{bytes} > {limit}");
    assert!(stats["emu block cache drops"] >= 1, "{stats:?}");
    assert!(stats["emu blocks decoded"] >= n, "{stats:?}");
}
