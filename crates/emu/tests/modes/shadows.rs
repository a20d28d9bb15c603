//! Targeted guests: interrupt shadows, self-modifying code, restartable string instructions.

use super::*;

/// A reported value on which the harness requests an interrupt window.
pub(crate) const ASK_WINDOW: u32 = 0xabcd_0001;

/// The interrupt shadow: after STI (with IF=0 before) an interrupt window opens only after
/// the next instruction; after MOV SS and POP SS, the single-step trap of the next
/// instruction is folded into one #DB after it.
#[test]
pub(crate) fn interrupt_shadow_after_sti_and_mov_ss() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.val(ASK_WINDOW)?; // the harness asks for an interrupt window now
        a.nop()?;
        a.sti()?;
        a.here("after_sti")?;
        a.nop()?;
        a.here("after_nop")?;
        a.nop()?;
        a.cli()?;
        a.val(2)?;
        // Single-step across MOV SS and POP SS.
        a.mov(ax, u32::from(KDATA))?;
        a.push(eax)?;
        a.pushfd()?;
        a.or(dword_ptr(esp), 0x100)?;
        a.popfd()?;
        a.here("s0")?;
        a.nop()?;
        a.here("s1")?;
        a.mov(ss, ax)?;
        a.here("s2")?;
        a.nop()?;
        a.here("s3")?;
        a.pop(ss)?;
        a.here("s4")?;
        a.nop()?;
        a.here("s5")?;
        a.nop()?;
        a.here("stop")?;
        a.val(3)?;
        a.hlt()?;
        a.here("h_irq")?;
        a.push(eax)?;
        a.mov(eax, dword_ptr(esp + 4))?;
        a.rep_eax()?;
        a.pop(eax)?;
        a.iretd()?;
        // #DB: report EIP and DR6.BS; clear TF at "stop".
        a.here("h_db")?;
        a.push(eax)?;
        a.mov(eax, dword_ptr(esp + 4))?;
        a.rep_eax()?;
        a.mov(eax, dr6)?;
        a.and(eax, 0x4000)?;
        a.rep_eax()?;
        a.mov(eax, 0u32)?;
        a.mov(dr6, eax)?;
        let stop = a.addr("stop");
        let mut go = a.create_label();
        a.cmp(dword_ptr(esp + 4), stop as i32)?;
        a.jne(go)?;
        a.and(dword_ptr(esp + 12), !0x100)?;
        a.set_label(&mut go)?;
        a.pop(eax)?;
        a.iretd()
    });
    g.set_gate32(0x40, gate(KCODE32, k["h_irq"] as u32, 0xe, 0, 0));
    g.set_gate32(1, gate(KCODE32, k["h_db"] as u32, 0xe, 0, 0));
    let out = run_with(
        &g,
        Hooks {
            on_val: Some(&|v, vcpu| {
                if v == u64::from(ASK_WINDOW) {
                    vcpu.request_interrupt_window(true);
                }
            }),
            on_window: Some(0x40),
            ..Default::default()
        },
    );
    let bs = 0x4000;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(ASK_WINDOW.into()),
            Ev::Val(k["after_nop"]),
            Ev::Val(2),
            Ev::Val(k["s1"]),
            Ev::Val(bs),
            Ev::Val(k["s3"]),
            Ev::Val(bs),
            Ev::Val(k["s5"]),
            Ev::Val(bs),
            Ev::Val(k["stop"]),
            Ev::Val(bs),
            Ev::Val(3),
        ]
    );
}

/// Self-modifying code: a loop that patches the immediate of an instruction it already ran
/// (same block), a store to the very next instruction, code rewritten with REP MOVSB and run
/// again, and code rewritten through another linear alias of its physical page.
#[test]
pub(crate) fn self_modifying_code() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let root = g.paging32();
    // DATA+0x5000 is a second linear view of the CODE3 page.
    g.w32(pte32(DATA + 0x5000), (CODE3 | P | RW | US) as u32);
    // mov eax, 1; ret
    g.write(CODE3, &[0xb8, 1, 0, 0, 0, 0xc3]);
    // Replacement templates: mov eax, 2; ret and mov eax, 3; ret.
    g.write(DATA, &[0xb8, 2, 0, 0, 0, 0xc3]);
    g.write(DATA + 0x10, &[0xb8, 3, 0, 0, 0, 0xc3]);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        enable_paging32(a, root)?;
        a.xor(esi, esi)?;
        a.mov(ecx, 3u32)?;
        let top = a.here("loop")?;
        a.mov(eax, 0x100u32)?;
        a.add(esi, eax)?;
        let imm = a.addr("loop") + 1;
        a.add(dword_ptr(imm), 1)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(eax, esi)?;
        a.rep_eax()?;
        // Patch the next instruction: NOP becomes INC EAX.
        a.xor(eax, eax)?;
        let next = a.addr("next");
        a.mov(byte_ptr(next), 0x40)?;
        a.here("next")?;
        a.nop()?;
        a.rep_eax()?;
        // Run, rewrite with REP MOVSB, run again.
        a.mov(eax, CODE3 as u32)?;
        a.call(eax)?;
        a.rep_eax()?;
        a.mov(esi, DATA as u32)?;
        a.mov(edi, CODE3 as u32)?;
        a.mov(ecx, 6u32)?;
        a.rep().movsb()?;
        a.mov(eax, CODE3 as u32)?;
        a.call(eax)?;
        a.rep_eax()?;
        // Rewrite through the alias.
        a.mov(esi, (DATA + 0x10) as u32)?;
        a.mov(edi, (DATA + 0x5000) as u32)?;
        a.mov(ecx, 6u32)?;
        a.rep().movsb()?;
        a.mov(eax, CODE3 as u32)?;
        a.call(eax)?;
        a.rep_eax()?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(out.events, vals(&[0x100 + 0x101 + 0x102, 1, 1, 2, 3]));
}

/// REP MOVS that page-faults midway: the #PF reports the registers of the faulting
/// iteration (completed iterations stay done), the handler maps the page and IRETs, and the
/// instruction resumes and finishes. Forward MOVSB faulting on the destination, backward
/// MOVSD faulting on the source, and a MOVSD whose destination straddles into a missing page
/// (nothing of it is written before the fault).
#[test]
pub(crate) fn rep_movs_page_fault_resumes() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let root = g.paging32();
    for page in [DATA + 0x2000, DATA + 0x4000, DATA + 0x8000] {
        g.w32(pte32(page), page as u32);
    }
    let src: Vec<u8> = (0..0x40u8).map(|i| i ^ 0x5a).collect();
    g.write(DATA, &src);
    let back: Vec<u8> = (0..0x40u8).collect();
    g.write(DATA + 0x4fe0, &back[..0x20]);
    g.write(DATA + 0x5000, &back[0x20..]);
    g.w32(DATA + 0x7ffc, 0xeeee_eeee);
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        enable_paging32(a, root)?;
        let regs = |a: &mut Asm| -> AsmResult {
            a.mov(eax, ecx)?;
            a.rep_eax()?;
            a.mov(eax, esi)?;
            a.rep_eax()?;
            a.mov(eax, edi)?;
            a.rep_eax()
        };
        a.cld()?;
        a.mov(esi, DATA as u32)?;
        a.mov(edi, (DATA + 0x1ff0) as u32)?;
        a.mov(ecx, 0x40u32)?;
        a.rep().movsb()?;
        regs(a)?;
        a.std()?;
        a.mov(esi, (DATA + 0x5008) as u32)?;
        a.mov(edi, (DATA + 0x6100) as u32)?;
        a.mov(ecx, 8u32)?;
        a.rep().movsd()?;
        a.cld()?;
        regs(a)?;
        a.mov(esi, DATA as u32)?;
        a.mov(edi, (DATA + 0x7ffe) as u32)?;
        a.mov(ecx, 2u32)?;
        a.rep().movsd()?;
        regs(a)?;
        a.val(0xd0e)?;
        a.hlt()?;
        // #PF: report CR2, the error code, ECX/ESI/EDI at the fault and the dword at
        // DATA+0x7ffc; map the page at CR2 and return to the instruction.
        a.here("h_pf")?;
        a.pushad()?;
        a.mov(eax, cr2)?;
        a.rep_eax()?;
        a.mov(eax, dword_ptr(esp + 32))?;
        a.rep_eax()?;
        for off in [24, 4, 0] {
            a.mov(eax, dword_ptr(esp + off))?;
            a.rep_eax()?;
        }
        a.mov(eax, dword_ptr((DATA + 0x7ffc) as u32))?;
        a.rep_eax()?;
        a.mov(eax, cr2)?;
        a.mov(ebx, eax)?;
        a.and(eax, 0xffff_f000u32 as i32)?;
        a.or(eax, 7)?;
        a.shr(ebx, 12)?;
        a.mov(dword_ptr(ebx * 4 + PT32 as i32), eax)?;
        a.popad()?;
        a.add(esp, 4)?;
        a.iretd()
    });
    g.set_gate32(14, gate(KCODE32, k["h_pf"] as u32, 0xe, 0, 0));
    let out = run(&g);
    let e = 0xeeee_eeee;
    assert_eq!(
        out.events,
        vals(&[
            // Forward MOVSB: 16 bytes done, the 17th faults on the destination.
            DATA + 0x2000,
            2,
            0x30,
            DATA + 0x10,
            DATA + 0x2000,
            e,
            0,
            DATA + 0x40,
            DATA + 0x2030,
            // Backward MOVSD: 3 dwords done, the 4th faults on the source.
            DATA + 0x4ffc,
            0,
            5,
            DATA + 0x4ffc,
            DATA + 0x60f4,
            e,
            0,
            DATA + 0x4fe8,
            DATA + 0x60e0,
            // A straddling destination: nothing written before the fault.
            DATA + 0x8000,
            2,
            2,
            DATA,
            DATA + 0x7ffe,
            e,
            0,
            DATA + 8,
            DATA + 0x8006,
            0xd0e,
        ])
    );
    let mut buf = [0u8; 0x40];
    g.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1ff0))
        .unwrap();
    assert_eq!(&buf[..], &src[..]);
    for k in 0..8u64 {
        assert_eq!(g.r32(DATA + 0x6100 - 4 * k), g.r32(DATA + 0x5008 - 4 * k));
    }
    assert_eq!(
        g.r64(DATA + 0x7ffe),
        u64::from_le_bytes(src[..8].try_into().unwrap())
    );
}

/// Privilege changes in long mode: INT n from 64-bit ring 3 switches to RSP0 with a null SS
/// and IRETQ returns; a 64-bit call gate (16-byte descriptor) switches stacks and RETFQ
/// returns; INT n from compatibility-mode ring 3 goes through the same 64-bit IDT.
#[test]
pub(crate) fn long_mode_privilege_changes() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    let cgate = FREE;
    let user32 = g.code(32, CODE3, &|a| {
        a.int(0x80)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.hlt()
    });
    let user = g.code(64, CODE2, &|a| {
        a.int(0x80)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(dword_ptr(VARS), 0)?;
        a.mov(word_ptr(VARS + 8), u32::from(cgate | 3))?;
        // call far m16:64 through the gate (the offset is ignored)
        a.call(tword_ptr(VARS))?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.hlt()
    });
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        let u = user.ip as u32;
        a.probe64(|a| a.enter_user64(u, EFLAGS_IOPL3))?;
        let u32_ = user32.ip as u32;
        a.probe64(|a| {
            a.push(i32::from(UDATA | 3))?;
            a.push(USTACK as i32)?;
            a.push(EFLAGS_IOPL3 as i32)?;
            a.push(i32::from(UCODE32 | 3))?;
            a.push(u32_ as i32)?;
            a.iretq()
        })?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("h80")?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        for off in [8, 24, 32] {
            a.mov(rax, qword_ptr(rsp + off))?;
            a.rep_eax()?;
        }
        a.iretq()?;
        a.here("gate_fn")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.mov(rax, qword_ptr(rsp + 16))?;
        a.rep_eax()?;
        a.retf()
    });
    g.set_gate64(0x80, gate64(KCODE64, k["h80"], 0xe, 3, 0));
    let gf = k["gate_fn"];
    g.w64(GDT + u64::from(cgate), gate(KCODE64, gf as u32, 0xc, 3, 0));
    g.w64(GDT + u64::from(cgate) + 8, gf >> 32);
    let out = run(&g);
    let (u64cs, u32cs, uds) = (
        u64::from(UCODE64 | 3),
        u64::from(UCODE32 | 3),
        u64::from(UDATA | 3),
    );
    assert_eq!(
        out.events,
        vec![
            // INT 0x80 from 64-bit ring 3: RSP0, SS = null, frame CS/RSP/SS.
            Ev::Val(STACK0 - 40),
            Ev::Val(0),
            Ev::Val(u64cs),
            Ev::Val(USTACK),
            Ev::Val(uds),
            Ev::Val(u64cs),
            // The call gate: CPL 0 on RSP0 with SS, RSP, CS, RIP pushed.
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(STACK0 - 32),
            Ev::Val(USTACK),
            Ev::Val(u64cs),
            Ev::Val(USTACK),
            exc(13, Some(0), UCODE64 | 3),
            // From compatibility mode.
            Ev::Val(STACK0 - 40),
            Ev::Val(0),
            Ev::Val(u32cs),
            Ev::Val(USTACK),
            Ev::Val(uds),
            Ev::Val(u32cs),
            exc(13, Some(0), UCODE32 | 3),
            Ev::Val(0xd0e),
        ]
    );
}

/// SYSENTER/SYSEXITQ in long mode (Intel): SYSENTER enters 64-bit ring 0 with CS from the
/// MSR and SS = CS + 8; SYSEXITQ returns to 64-bit ring 3 with CS + 32 and SS + 40.
#[test]
pub(crate) fn sysenter_sysexit_long_mode() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    let user = g.code(64, CODE2, &|a| {
        a.sysenter()?;
        a.here("back")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.hlt()
    });
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        wrmsr(a, SYSENTER_CS, u64::from(KCODE64))?;
        wrmsr(a, SYSENTER_ESP, STACK0 - 0x80)?;
        let entry = a.addr("entry");
        wrmsr(a, SYSENTER_EIP, u64::from(entry))?;
        let u = user.ip as u32;
        a.probe64(|a| a.enter_user64(u, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("entry")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        // The return RIP: the user code's label, stored by the harness.
        a.mov(rdx, qword_ptr(VARS))?;
        a.mov(rcx, USTACK - 0x40)?;
        a.sysexitq()
    });
    g.w64(VARS, user["back"]);
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(u64::from(KCODE64 + 8)),
            Ev::Val(STACK0 - 0x80),
            Ev::Val(u64::from((KCODE64 + 32) | 3)),
            Ev::Val(u64::from((KCODE64 + 40) | 3)),
            Ev::Val(USTACK - 0x40),
            exc(13, Some(0), (KCODE64 + 32) | 3),
            Ev::Val(0xd0e),
        ]
    );
}

/// NMIs: one injected right after STI (while interrupts are still shadowed) is delivered;
/// two more injected while the handler runs stay pending as one, delivered exactly once
/// after the handler's IRET (NMIs are blocked until then, and latch only one).
#[test]
pub(crate) fn nmi_after_sti_and_while_handling() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let k = g.code(32, CODE2, &|a| {
        a.here("h_nmi")?;
        a.inc(dword_ptr(VARS as u32))?;
        a.mov(eax, dword_ptr(VARS as u32))?;
        a.or(eax, 0x100)?;
        a.rep_eax()?; // the hook injects two NMIs on the first entry
        a.iretd()
    });
    g.set_gate32(2, gate(KCODE32, k["h_nmi"] as u32, 0xe, 0, 0));
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        a.mov(dword_ptr(VARS as u32), 0)?;
        a.cli()?;
        a.val(0x55)?; // the hook injects an NMI here
        a.sti()?;
        a.nop()?;
        a.nop()?;
        a.mov(eax, dword_ptr(VARS as u32))?;
        a.rep_eax()?;
        a.cli()?;
        a.hlt()
    });
    let out = run_with(
        &g,
        Hooks {
            on_val: Some(&|v, vcpu| {
                if v == 0x55 || v == 0x101 {
                    vcpu.inject_nmi().unwrap();
                }
                if v == 0x101 {
                    vcpu.inject_nmi().unwrap();
                }
            }),
            ..Default::default()
        },
    );
    assert_eq!(out.events, vals(&[0x55, 0x101, 0x102, 2]));
}
