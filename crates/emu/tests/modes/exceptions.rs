//! Targeted guests: exceptions.

use super::*;

/// Exceptions and their priority: traps (INT3, INTO) return after the instruction, faults
/// (#DE, #UD for UD2, a LOCK on NOP and MOV to CS) report before it; #TS(SS selector) when the
/// TSS's stack for the target level is unusable; segmentation checks come before paging
/// (#GP, not #PF, for an offset past the limit on a not-present page); an instruction fetch
/// that runs into a not-present page reports the page start in CR2.
#[test]
pub(crate) fn exceptions_priority_and_error_codes() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let root = g.paging32();
    g.w32(pte32(DATA + 0x1000), (DATA + 0x1000) as u32);
    g.w32(pte32(DATA + 0x3000), (DATA + 0x3000) as u32);
    // mov eax, imm32 at the last two bytes of a page, running into the not-present next one.
    g.write(DATA + 0x2ffe, &[0xb8, 0x78]);
    let seg = FREE;
    g.set_desc(seg, desc((DATA + 0x1000) as u32, 0xfff, 0x92, 0x4));
    let code1 = FREE + 8;
    g.set_desc(code1, desc(0, 0xfffff, 0xba, 0xc));
    // Ring 1's stack in the TSS is a DPL-0 segment.
    g.w32(TSS + 0xc, 0x6800);
    g.w32(TSS + 0x10, u32::from(KDATA));
    let user = g.code(32, CODE2, &|a| a.int(0x35));
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        enable_paging32(a, root)?;
        a.int3()?;
        a.here("after_int3")?;
        a.mov(al, 0x7f)?;
        a.add(al, 1)?;
        a.db(&[0xce])?; // into
        a.here("after_into")?;
        a.probe32(|a| {
            a.xor(edx, edx)?;
            a.xor(ecx, ecx)?;
            a.mov(eax, 1u32)?;
            a.div(ecx)
        })?;
        a.probe32(|a| a.ud2())?;
        a.probe32(|a| a.db(&[0xf0, 0x90]))?; // lock nop
        a.probe32(|a| a.db(&[0x8e, 0xc8]))?; // mov cs, ax
        let u = user.ip as u32;
        a.probe32(|a| a.enter_user32(u, EFLAGS_IOPL3))?;
        // Limit before paging: both offsets are on the not-present page.
        a.probe32(|a| {
            a.mov(ax, u32::from(seg))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr(0xffeu32))
        })?;
        a.probe32(|a| {
            a.mov(ax, u32::from(seg))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr(0x10u32))
        })?;
        a.probe32(|a| {
            a.mov(eax, (DATA + 0x2ffe) as u32)?;
            a.call(eax)
        })?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("h_eip")?;
        a.mov(eax, dword_ptr(esp))?;
        a.rep_eax()?;
        a.iretd()
    });
    let h = k["h_eip"] as u32;
    g.set_gate32(3, gate(KCODE32, h, 0xe, 0, 0));
    g.set_gate32(4, gate(KCODE32, h, 0xe, 0, 0));
    g.set_gate32(0x35, gate(code1, h, 0xe, 3, 0));
    let out = run(&g);
    let kc = KCODE32;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(k["after_int3"]),
            Ev::Val(k["after_into"]),
            exc(0, None, kc),
            exc(6, None, kc),
            exc(6, None, kc),
            exc(6, None, kc),
            exc(10, Some(u32::from(KDATA)), UCODE32 | 3),
            exc(13, Some(0), kc),
            pf(0, DATA + 0x1010, kc),
            pf(0, DATA + 0x3000, kc),
            Ev::Val(0xd0e),
        ]
    );
}

/// Double faults: a contributory exception while delivering a contributory one (#NP for the
/// #GP handler's code segment), a #GP while delivering a #PF; and a benign exception
/// followed by a contributory one is delivered serially (no #DF).
#[test]
pub(crate) fn double_faults() {
    let g = Guest::new();
    g.boot_pm32();
    let rt = g.idt32();
    let root = g.paging32();
    g.w32(pte32(DATA + 0x1000), (DATA + 0x1000) as u32);
    let absent = FREE;
    g.set_desc(absent, desc(0, 0xfffff, 0x1a, 0xc));
    let gp_gate = gate(KCODE32, rt["v13"] as u32, 0xe, 0, 0);
    let pf_gate = gate(KCODE32, rt["v14"] as u32, 0xe, 0, 0);
    let ud_gate = gate(KCODE32, rt["v6"] as u32, 0xe, 0, 0);
    let sel_field = |raw: u64, sel: u16| (raw & !0xffff_0000) | (u64::from(sel) << 16);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        enable_paging32(a, root)?;
        let set = |a: &mut Asm, v: u64, raw: u64| -> AsmResult {
            a.mov(dword_ptr((IDT + v * 8) as u32), raw as u32)?;
            a.mov(dword_ptr((IDT + v * 8 + 4) as u32), (raw >> 32) as u32)
        };
        // #GP whose handler's segment is not present: #NP -> #DF.
        set(a, 13, sel_field(gp_gate, absent))?;
        a.probe32(|a| {
            a.mov(ax, 0x400u32)?;
            a.mov(ds, ax)
        })?;
        set(a, 13, gp_gate)?;
        // #PF whose handler's selector is past the GDT: #GP -> #DF.
        set(a, 14, sel_field(pf_gate, 0x400))?;
        a.probe32(|a| a.mov(eax, dword_ptr((DATA + 0x1000) as u32)))?;
        set(a, 14, pf_gate)?;
        // #UD (benign) whose handler's segment is not present: just #NP (with EXT).
        set(a, 6, sel_field(ud_gate, absent))?;
        a.probe32(|a| a.ud2())?;
        set(a, 6, ud_gate)?;
        a.probe32(|a| a.ud2())?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let kc = KCODE32;
    assert_eq!(
        out.events,
        vec![
            exc(8, Some(0), kc),
            exc(8, Some(0), kc),
            exc(11, Some(u32::from(absent) + 1), kc),
            exc(6, None, kc),
            Ev::Val(0xd0e),
        ]
    );
}

/// A #PF while delivering a #PF (the stack is on a not-present page) in long mode: #DF on
/// the IST 1 stack, with CR2 holding the stack address that faulted.
#[test]
pub(crate) fn double_fault_on_ist_stack_in_long_mode() {
    let g = Guest::new();
    g.boot_long(0);
    let rt = g.idt64();
    g.tss64(0x4f00);
    g.w64(pte64(DATA + 0x1000), DATA + 0x1000);
    let v8 = rt["v8"];
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.probe64(|a| {
            a.mov(rsp, DATA + 0x1800)?;
            a.ud2()
        })?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("h_df")?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.mov(rax, cr2)?;
        a.rep_eax()?;
        a.mov(rax, v8)?;
        a.jmp(rax)
    });
    g.set_gate64(8, gate64(KCODE64, k["h_df"], 0xe, 0, 1));
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x4f00 - 48),
            Ev::Val(DATA + 0x1800 - 8),
            exc(8, Some(0), KCODE64),
            Ev::Val(0xd0e),
        ]
    );
}

/// Triple faults end the run with `Exit::Shutdown`: an exception with an IDT too small for
/// every handler (protected mode), an IVT too small (real mode), and a #PF whose frame and
/// #DF frame both land on a not-present stack page.
#[test]
pub(crate) fn triple_faults_shut_down() {
    // Protected mode, IDT limit 0.
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.val(1)?;
        a.mov(word_ptr(VARS as u32), 0)?;
        a.lidt(ptr(VARS as u32))?;
        a.int3()?;
        a.val(2)
    });
    assert_eq!(run(&g).events, vec![Ev::Val(1), Ev::Shutdown]);

    // Real mode, IVT limit 0.
    let g = Guest::new();
    g.code(16, REAL, &|a| {
        real_init(a)?;
        a.val(1)?;
        a.mov(word_ptr(VARS as u16), 0)?;
        a.lidt(ptr(VARS as u16))?;
        a.ud2()?;
        a.val(2)
    });
    assert_eq!(run(&g).events, vec![Ev::Val(1), Ev::Shutdown]);

    // #PF -> #PF pushing the frame -> #DF -> #PF pushing its frame: shutdown.
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let root = g.paging32();
    g.w32(pte32(DATA + 0x1000), (DATA + 0x1000) as u32);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        enable_paging32(a, root)?;
        a.val(1)?;
        a.mov(esp, (DATA + 0x1800) as u32)?;
        a.mov(eax, dword_ptr((DATA + 0x1000) as u32))?;
        a.val(2)
    });
    let out = run(&g);
    assert_eq!(out.events, vec![Ev::Val(1), Ev::Shutdown]);
    let s = out.vcpu.sregs().unwrap();
    assert_eq!(s.cr2, DATA + 0x1800 - 4, "CR2 is the last faulting address");
}

/// Fault-class exceptions push RFLAGS with RF set (SDM Vol. 3 17.3.1.1); a trap (INT3) does
/// not, and RF does not outlive the instruction after the handler's IRET.
#[test]
pub(crate) fn faults_push_rflags_with_rf() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    // Handlers: report the pushed RFLAGS' RF bit, skip the faulting instruction, return.
    let h = g.code(64, CODE3, &|a| {
        a.here("ud")?;
        a.mov(rax, qword_ptr(rsp + 16))?;
        a.shr(rax, 16)?;
        a.and(eax, 1)?;
        a.rep_eax()?;
        a.add(qword_ptr(rsp), 2)?;
        a.iretq()?;
        a.here("gp")?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.shr(rax, 16)?;
        a.and(eax, 1)?;
        a.rep_eax()?;
        a.add(rsp, 8)?;
        a.add(qword_ptr(rsp), 3)?; // MOV CR4, RAX
        a.iretq()?;
        a.here("bp")?;
        a.mov(rax, qword_ptr(rsp + 16))?;
        a.shr(rax, 16)?;
        a.and(eax, 1)?;
        a.or(eax, 0x30)?;
        a.rep_eax()?;
        a.iretq()
    });
    g.set_gate64(6, gate64(KCODE64, h["ud"], 0xe, 0, 0));
    g.set_gate64(13, gate64(KCODE64, h["gp"], 0xe, 0, 0));
    g.set_gate64(3, gate64(KCODE64, h["bp"], 0xe, 0, 0));
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.ud2()?;
        // #GP: a CR4 write setting a reserved bit.
        a.mov(rax, 1u64 << 40)?;
        a.mov(cr4, rax)?;
        a.int3()?;
        // RF is gone after the instruction that followed the handler's IRET.
        a.pushfq()?;
        a.pop(rax)?;
        a.shr(rax, 16)?;
        a.and(eax, 1)?;
        a.or(eax, 0x40)?;
        a.rep_eax()?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(out.events, vals(&[1, 1, 0x30, 0x40]));
}

/// INT3 and INT n with TF set: the handler is entered without a single-step #DB at its first
/// instruction (the gate cleared TF); the trap resumes after the handler's IRET.
#[test]
pub(crate) fn int_with_tf_gives_no_trap_in_the_handler() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    // #DB: count at VARS+0x20 and return; #BP and vector 0x40: return.
    let h = g.code(64, CODE3, &|a| {
        a.here("db")?;
        a.inc(qword_ptr(VARS + 0x20))?;
        a.iretq()?;
        a.here("ret")?;
        a.iretq()
    });
    g.set_gate64(1, gate64(KCODE64, h["db"], 0xe, 0, 0));
    g.set_gate64(3, gate64(KCODE64, h["ret"], 0xe, 0, 0));
    g.set_gate64(0x40, gate64(KCODE64, h["ret"], 0xe, 0, 0));
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.mov(qword_ptr(VARS + 0x20), 0)?;
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?; // TF on from the next instruction
        a.int3()?; // no #DB in the handler; one after the handler returns, at NOP
        a.nop()?;
        a.int(0x40)?; // the same for INT n
        a.nop()?;
        a.pushfq()?;
        a.and(qword_ptr(rsp), !0x100)?;
        a.popfq()?;
        a.mov(rax, qword_ptr(VARS + 0x20))?;
        a.rep_eax()?;
        a.hlt()
    });
    let out = run(&g);
    // #DBs after each NOP (the handlers' IRETs restore TF), PUSHFQ, AND and the POPFQ that
    // clears TF: 5. Before the fix, each handler's first instruction added one (7).
    assert_eq!(out.events, vals(&[5]));
}

/// Code in memory that is not RAM: the guest gets #UD (the all-ones bytes of an open bus),
/// and the VM goes on, instead of the emulator ending the whole VM.
#[test]
pub(crate) fn fetch_from_non_ram_raises_ud() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.probe32(|a| {
            a.mov(eax, 0xfeb0_0000u32)?;
            a.jmp(eax)
        })?;
        a.val(0x600d)?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(out.events, vec![exc(6, None, KCODE32), Ev::Val(0x600d)]);
}
