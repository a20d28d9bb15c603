//! Targeted guests: debug registers and single-step (SDM Vol. 3 ch. 17).

use super::syscalls::{FMASK, LSTAR, STAR, wrmsr};
use super::*;

/// DR7 enable bits and R/W + LEN fields.
const L: [u64; 4] = [1, 4, 0x10, 0x40];
fn field(n: u32, rw: u64, len: u64) -> u64 {
    ((len << 2) | rw) << (16 + 4 * n)
}

/// One #DB as the handlers report it: DR6 (B0–B3, BD, BS), the pushed RIP and RF.
fn db(status: u64, rip: u64, rf: u64) -> Vec<Ev> {
    vec![Ev::Val(0xdb_0000 | status), Ev::Val(rip), Ev::Val(rf)]
}

/// Instruction, write, read/write and I/O breakpoints set their DR6 bits; an instruction
/// breakpoint is a fault (RIP at the instruction, RF clear in the frame) that comes again
/// while the handler does not set RF, and the instruction runs once it does; data and I/O
/// breakpoints are traps after the access (a read does not meet a write breakpoint; other
/// bytes of a watched page meet nothing; one met by MOV SS is reported after the next
/// instruction); DR7.GD makes a debug-register access a #DB fault
/// with DR6.BD and is clear in the handler; ICEBP is a #DB trap that sets no DR6 bit.
#[test]
pub(crate) fn breakpoints_dr6_general_detect_and_icebp() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    // #DB handler: report, clear DR6, count; return without RF while VARS+0x30 says so.
    let h = g.code(64, CODE3, &|a| {
        a.here("db")?;
        a.push(rax)?;
        a.mov(rax, dr6)?;
        a.and(eax, 0x600f)?;
        a.or(eax, 0xdb_0000)?;
        a.rep_eax()?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.rep_eax()?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.shr(rax, 16)?;
        a.and(eax, 1)?;
        a.rep_eax()?;
        a.xor(eax, eax)?;
        a.mov(dr6, rax)?;
        a.inc(qword_ptr(VARS + 0x28))?;
        let mut set_rf = a.create_label();
        let mut done = a.create_label();
        a.cmp(qword_ptr(VARS + 0x30), 0)?;
        a.je(set_rf)?;
        a.dec(qword_ptr(VARS + 0x30))?;
        a.jmp(done)?;
        a.set_label(&mut set_rf)?;
        a.or(qword_ptr(rsp + 24), 0x10000)?;
        a.set_label(&mut done)?;
        a.pop(rax)?;
        a.iretq()
    });
    g.set_gate64(1, gate64(KCODE64, h["db"], 0xe, 0, 0));
    let enable = 0x400
        | L[0]
        | L[1]
        | L[2]
        | L[3]
        | field(1, 0b01, 0b11) // DR1: writes, 4 bytes
        | field(2, 0b11, 0b10) // DR2: reads and writes, 8 bytes
        | field(3, 0b10, 0b00); // DR3: port, 1 byte
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.mov(qword_ptr(VARS + 0x28), 0)?;
        a.mov(qword_ptr(VARS + 0x30), 0)?;
        a.mov(qword_ptr(VARS + 0x50), 0)?;
        a.mov(qword_ptr(VARS + 0x48), i32::from(KDATA))?;
        let t = u64::from(a.addr("target"));
        a.mov(rax, t)?;
        a.mov(dr0, rax)?;
        a.mov(rax, VARS + 0x41)?; // aligned down to VARS+0x40 by the length
        a.mov(dr1, rax)?;
        a.mov(rax, VARS + 0x48)?;
        a.mov(dr2, rax)?;
        a.mov(rax, 0x80u64)?;
        a.mov(dr3, rax)?;
        a.mov(rax, cr4)?;
        a.or(rax, 8)?; // CR4.DE: I/O breakpoints
        a.mov(cr4, rax)?;
        a.mov(rax, enable)?;
        a.mov(dr7, rax)?;
        a.here("target")?;
        a.inc(qword_ptr(VARS + 0x50))?;
        a.mov(eax, dword_ptr(VARS + 0x40))?; // a read: DR1 watches writes only
        a.mov(dword_ptr(VARS + 0x42), 1)?;
        a.here("w1")?;
        a.mov(rax, qword_ptr(VARS + 0x48))?;
        a.here("r1")?;
        a.mov(byte_ptr(VARS + 0x4f), al)?;
        a.here("r2")?;
        a.mov(eax, dword_ptr(VARS + 0x60))?; // same page, not watched
        a.mov(dword_ptr(VARS + 0x3c), eax)?; // ends right before DR1's bytes
        // A breakpoint met by MOV SS waits for the next instruction, as a single step does.
        a.mov(ss, word_ptr(VARS + 0x48))?;
        a.nop()?;
        a.here("ss1")?;
        a.out(0x81, al)?; // the next port
        a.out(0x80, al)?;
        a.here("io1")?;
        // The instruction breakpoint again, on an instruction the handler lets re-trigger
        // twice before it sets RF.
        a.mov(qword_ptr(VARS + 0x30), 2)?;
        let t2 = u64::from(a.addr("target2"));
        a.mov(rax, t2)?;
        a.mov(dr0, rax)?;
        a.here("target2")?;
        a.inc(qword_ptr(VARS + 0x50))?;
        // Everything off: nothing fires.
        a.mov(eax, 0x400)?;
        a.mov(dr7, rax)?;
        a.mov(dword_ptr(VARS + 0x40), 5)?;
        // General detect.
        a.mov(eax, 0x2400)?;
        a.mov(dr7, rax)?;
        a.here("gd")?;
        a.mov(rax, dr0)?;
        a.mov(rax, dr7)?;
        a.rep_eax()?; // GD was cleared by the #DB
        a.int1()?;
        a.here("i1")?;
        a.mov(rax, qword_ptr(VARS + 0x50))?;
        a.rep_eax()?;
        a.mov(rax, qword_ptr(VARS + 0x28))?;
        a.rep_eax()?;
        a.hlt()
    });
    let out = run(&g);
    let mut want = Vec::new();
    want.extend(db(0x1, k["target"], 0));
    want.extend(db(0x2, k["w1"], 0));
    want.extend(db(0x4, k["r1"], 0));
    want.extend(db(0x4, k["r2"], 0));
    want.extend(db(0x4, k["ss1"], 0));
    want.push(Ev::Out(0x81, 0));
    want.push(Ev::Out(0x80, 0));
    want.extend(db(0x8, k["io1"], 0));
    for _ in 0..3 {
        want.extend(db(0x1, k["target2"], 0));
    }
    want.extend(db(0x2000, k["gd"], 0));
    want.push(Ev::Val(0x400));
    want.extend(db(0, k["i1"], 0));
    want.push(Ev::Val(2)); // each INC ran once
    want.push(Ev::Val(11)); // #DBs
    // The port writes carry AL: fill in what the guest had there (the read of VARS+0x60).
    let out_ev: Vec<Ev> = out
        .events
        .iter()
        .map(|e| match e {
            Ev::Out(p, _) => Ev::Out(*p, 0),
            e => e.clone(),
        })
        .collect();
    assert_eq!(out_ev, want);
}

/// Single-step around fast system calls (QEMU's rule, which hardware follows: SYSCALL and
/// SYSRET trap on the TF they leave): with FMASK clearing TF the kernel runs untrapped and the
/// trap comes right after SYSRET, in user mode; with FMASK leaving TF the trap comes at the
/// kernel's entry point. A trap follows STI too (its shadow holds back interrupts, not #DB).
/// SYSRETD to compatibility mode with TF in R11 traps at its target. SYSCALL from
/// compatibility mode is #UD (the model is an Intel CPU).
#[test]
pub(crate) fn single_step_across_syscall_sysret_and_sti() {
    let g = Guest::new();
    g.boot_long(EFER_SCE);
    g.idt64();
    g.tss64(0x4f00);
    // #DB: report RIP and CS + DR6.BS; a trap in the kernel clears TF in the frame.
    let h = g.code(64, CODE3, &|a| {
        a.here("db")?;
        a.push(rax)?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.rep_eax()?;
        a.mov(rax, dr6)?;
        a.and(eax, 0x4000)?;
        a.add(rax, qword_ptr(rsp + 16))?;
        a.rep_eax()?;
        a.xor(eax, eax)?;
        a.mov(dr6, rax)?;
        let mut user = a.create_label();
        a.test(byte_ptr(rsp + 16), 3)?;
        a.jnz(user)?;
        a.and(qword_ptr(rsp + 24), !0x100)?;
        a.set_label(&mut user)?;
        a.pop(rax)?;
        a.iretq()?;
        // SYSCALL entry: report, then SYSRETQ, or for call 7 SYSRETD to compatibility mode.
        a.here("entry")?;
        a.mov(r12, rax)?;
        a.mov(eax, 0x5c)?;
        a.rep_eax()?;
        let mut compat = a.create_label();
        a.cmp(r12, 7)?;
        a.je(compat)?;
        a.mov(rax, r12)?;
        a.sysretq()?;
        a.set_label(&mut compat)?;
        let target = a.addr("compat_user");
        a.mov(ecx, target)?;
        a.mov(esp, (USTACK - 0x100) as u32)?;
        a.sysret()?;
        // Ring-3 compatibility-mode code (32-bit): one instruction, then HLT (#GP).
        a.here("compat_user")?;
        a.nop()?;
        a.here("compat_user1")?;
        a.hlt()
    });
    g.set_gate64(1, gate64(KCODE64, h["db"], 0xe, 0, 0));
    let u = g.code(64, CODE2, &|a| {
        a.here("u")?;
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?; // TF from the next instruction on
        a.nop()?;
        a.here("u1")?;
        a.sti()?;
        a.here("u2")?;
        a.cli()?;
        a.here("u3")?;
        a.syscall()?;
        a.here("ret")?;
        a.nop()?;
        a.here("u4")?;
        a.pushfq()?;
        a.here("u5")?;
        a.and(qword_ptr(rsp), !0x100)?;
        a.here("u6")?;
        a.popfq()?;
        a.here("stop")?;
        a.hlt()?; // ring 3: #GP, back to the probe
        // With TF: SYSCALL 7 returns with SYSRETD to compatibility mode, which traps at once.
        a.here("v")?;
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        a.mov(eax, 7)?;
        a.here("v1")?;
        a.syscall()
    });
    let c = g.code(32, CODE2 + 0x800, &|a| {
        a.here("compat")?;
        a.syscall()
    });
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        wrmsr(
            a,
            STAR,
            (u64::from(UCODE32) << 48) | (u64::from(KCODE64) << 32),
        )?;
        wrmsr(a, LSTAR, h["entry"])?;
        let entry = u["u"] as u32;
        wrmsr(a, FMASK, 0x100)?;
        a.probe64(|a| a.enter_user64(entry, EFLAGS_IOPL3))?;
        wrmsr(a, FMASK, 0)?;
        a.probe64(|a| a.enter_user64(entry, EFLAGS_IOPL3))?;
        wrmsr(a, FMASK, 0x100)?;
        let v = u["v"] as u32;
        a.probe64(|a| a.enter_user64(v, EFLAGS_IOPL3))?;
        // SYSCALL in compatibility mode (ring 0 here).
        let compat = c["compat"] as u32;
        a.probe64(|a| {
            a.mov(dword_ptr(VARS), compat)?;
            a.mov(word_ptr(VARS + 4), u32::from(KCODE32))?;
            a.jmp(fword_ptr(VARS))
        })?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let user = u64::from(UCODE64 | 3);
    let step = |rip: &str, sel: u64| [Ev::Val(u[rip]), Ev::Val(0x4000 + sel)];
    let mut want = Vec::new();
    for fmask_clears_tf in [true, false] {
        for l in ["u1", "u2", "u3"] {
            want.extend(step(l, user));
        }
        if !fmask_clears_tf {
            want.extend([Ev::Val(h["entry"]), Ev::Val(0x4000 + u64::from(KCODE64))]);
        }
        want.push(Ev::Val(0x5c));
        for l in ["ret", "u4", "u5", "u6", "stop"] {
            want.extend(step(l, user));
        }
        want.push(exc(13, Some(0), UCODE64 | 3));
    }
    // SYSRETD with TF: the trap comes at the compatibility-mode target, then after its NOP.
    let compat_user = u64::from(UCODE32 | 3);
    want.extend(step("v1", user)); // after MOV EAX, 7
    want.push(Ev::Val(0x5c));
    want.extend([Ev::Val(h["compat_user"]), Ev::Val(0x4000 + compat_user)]);
    want.extend([Ev::Val(h["compat_user1"]), Ev::Val(0x4000 + compat_user)]);
    want.push(exc(13, Some(0), UCODE32 | 3));
    want.push(exc(6, None, KCODE32));
    want.push(Ev::Val(0xd0e));
    assert_eq!(out.events, want);
}
