//! Targeted guests: what the emulator does not implement.

use super::*;

/// Hardware task switches and virtual-8086 mode are not implemented: a guest that needs them
/// stops the vCPU with an error naming the feature (instead of running on with wrong state).
#[test]
pub(crate) fn unimplemented_task_switch_and_v86_fail_loudly() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    g.set_desc(FREE, desc(TSS as u32 + 0x100, 0x67, 0x89, 0));
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        a.val(1)?;
        a.jmp_far(FREE, 0)
    });
    let (out, err) = try_run(&g, Hooks::default());
    assert_eq!(out.events, vec![Ev::Val(1)]);
    let err = err.expect("a task switch stops the vCPU");
    assert!(err.contains("task switch"), "{err}");

    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        a.val(1)?;
        // IRET to virtual-8086 mode: GS, FS, DS, ES, SS, ESP, EFLAGS (VM), CS, EIP.
        for v in [0u32, 0, 0, 0, 0, 0x7000, 0x2_0002, 0, 0x8000] {
            a.push(v)?;
        }
        a.iretd()
    });
    let (out, err) = try_run(&g, Hooks::default());
    assert_eq!(out.events, vec![Ev::Val(1)]);
    let err = err.expect("virtual-8086 mode stops the vCPU");
    assert!(err.contains("virtual-8086"), "{err}");
}

/// A long REP STOSB is interruptible: an interrupt taken midway sees EIP at the REP
/// instruction with ECX/EDI partly advanced, and after IRET the instruction finishes.
#[test]
pub(crate) fn rep_stos_interrupted_and_resumed() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let count = 0x4_0000u32;
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.mov(edi, 0x10_0000u32)?;
        a.mov(ecx, count)?;
        a.mov(al, 0x77)?;
        a.cld()?;
        a.val(ASK_WINDOW)?; // the harness asks for an interrupt window now
        a.mov(al, 0x77)?;
        // The STI shadow covers the first run of REP STOSB: the window opens midway.
        a.sti()?;
        a.here("rep")?;
        a.rep().stosb()?;
        a.cli()?;
        a.mov(eax, ecx)?;
        a.rep_eax()?;
        a.mov(eax, edi)?;
        a.rep_eax()?;
        a.hlt()?;
        // The interrupt: report the return EIP, and whether ECX and EDI are midway and agree.
        a.here("h_irq")?;
        a.push(eax)?;
        a.mov(eax, dword_ptr(esp + 4))?;
        a.rep_eax()?;
        a.mov(eax, count)?;
        a.sub(eax, ecx)?;
        a.add(eax, 0x10_0000)?;
        a.sub(eax, edi)?;
        a.rep_eax()?;
        a.xor(eax, eax)?;
        a.cmp(ecx, 0)?;
        a.setne(al)?;
        a.cmp(ecx, count as i32)?;
        a.setb(ah)?;
        a.rep_eax()?;
        a.pop(eax)?;
        a.iretd()
    });
    g.set_gate32(0x40, gate(KCODE32, k["h_irq"] as u32, 0xe, 0, 0));
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
    assert_eq!(
        out.events,
        vals(&[
            ASK_WINDOW.into(),
            k["rep"],
            0,
            0x0101,
            0,
            0x10_0000 + u64::from(count)
        ])
    );
    let mut buf = vec![0u8; count as usize + 1];
    g.mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
    assert!(buf[..count as usize].iter().all(|&b| b == 0x77));
    assert_eq!(buf[count as usize], 0);
}

/// LAR, LSL, VERR and VERW from ring 3: visibility by DPL/RPL/CPL (conforming code is
/// visible at any level), the system descriptor types each accepts, and their results.
#[test]
pub(crate) fn descriptor_queries_from_ring3() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let conf0 = FREE;
    let small3 = FREE + 8;
    let cgate = FREE + 0x10;
    g.set_desc(conf0, desc(0, 0xfffff, 0x9e, 0xc));
    g.set_desc(small3, desc(DATA as u32, 0x123, 0xf2, 0x4));
    g.set_desc(cgate, gate(KCODE32, PM32 as u32, 0xc, 3, 0));
    // (instruction, selector): ZF and, when set, the result.
    let queries: [(u8, u16); 14] = [
        (0, UDATA | 3),
        (0, KDATA),
        (0, conf0 | 3),
        (0, cgate | 3),
        (0, TSS_SEL),
        (1, small3 | 3),
        (1, UCODE32 | 3),
        (1, cgate | 3),
        (2, UDATA | 3),
        (2, KDATA),
        (2, UCODE32 | 3),
        (3, UDATA | 3),
        (3, UCODE32 | 3),
        (3, 0),
    ];
    let user = g.code(32, CODE2, &|a| {
        for (op, sel) in queries {
            a.mov(ecx, u32::from(sel))?;
            a.mov(ebx, 0xffff_ffffu32)?;
            match op {
                0 => a.lar(ebx, ecx)?,
                1 => a.lsl(ebx, ecx)?,
                2 => a.verr(cx)?,
                _ => a.verw(cx)?,
            }
            a.setz(al)?;
            a.movzx(eax, al)?;
            a.rep_eax()?;
            if op < 2 {
                a.mov(eax, ebx)?;
                if op == 0 {
                    // Bits 19:16 of LAR's result are undefined.
                    a.cmp(eax, -1)?;
                    let mut keep = a.create_label();
                    a.je(keep)?;
                    a.and(eax, 0x00f0_ff00)?;
                    a.set_label(&mut keep)?;
                }
                a.rep_eax()?;
            }
        }
        a.hlt()
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        let u = user.ip as u32;
        a.probe32(|a| a.enter_user32(u, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let unchanged = 0xffff_ffff;
    assert_eq!(
        out.events,
        vec![
            // LAR: access rights of a visible data segment; DPL 0 data is not visible from
            // ring 3; conforming code is; a call gate is a valid LAR type; so is a busy TSS
            // (but it has DPL 0: not visible).
            Ev::Val(1),
            Ev::Val(0x00c0_f300),
            Ev::Val(0),
            Ev::Val(unchanged),
            Ev::Val(1),
            Ev::Val(0x00c0_9e00),
            Ev::Val(1),
            Ev::Val(0x0000_ec00),
            Ev::Val(0),
            Ev::Val(unchanged),
            // LSL: byte-granular and page-granular limits; not for call gates.
            Ev::Val(1),
            Ev::Val(0x123),
            Ev::Val(1),
            Ev::Val(0xffff_ffff),
            Ev::Val(0),
            Ev::Val(unchanged),
            // VERR: data yes, DPL-0 data no, readable code yes.
            Ev::Val(1),
            Ev::Val(0),
            Ev::Val(1),
            // VERW: writable data yes, code no, null no.
            Ev::Val(1),
            Ev::Val(0),
            Ev::Val(0),
            exc(13, Some(0), UCODE32 | 3),
            Ev::Val(0xd0e),
        ]
    );
}
