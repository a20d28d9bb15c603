//! Targeted guests: privilege transitions.

use super::*;

pub(crate) const EFLAGS_IOPL3: u32 = 0x3002;
pub(crate) const EFLAGS_IOPL0: u32 = 0x0002;

/// CPL/DPL/RPL: data-segment loads at CPL 0 and 3, IRET to ring 3 (DS/ES with DPL 0 become
/// null), INT n through a DPL-3 interrupt gate with the stack switch to the TSS's SS0:ESP0
/// and back with IRET, INT n through a DPL-0 gate, and the instructions ring 3 may not use.
#[test]
pub(crate) fn privilege_levels_and_tss_stack_switch() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    g.w32(DATA, 0x5a5a);
    let user = g.code(32, CODE2, &|a| {
        a.here("u1")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.mov(eax, ds)?;
        a.rep_eax()?;
        a.mov(eax, dword_ptr(DATA as u32))?; // DS is null: #GP(0)
        a.here("u2")?;
        a.int(0x31)?;
        a.val(0x31)?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.int(0x30)?;
        a.here("u3")?;
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ds, ax)?;
        a.here("u4")?;
        a.mov(ax, u32::from(UDATA | 3))?;
        a.mov(ds, ax)?;
        a.mov(eax, dword_ptr(DATA as u32))?;
        a.rep_eax()?;
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ss, ax)?;
        a.here("u5")?;
        a.mov(eax, cr0)?;
        a.here("u6")?;
        a.hlt()?;
        a.here("u7")?;
        a.cli()?;
        a.here("u8")?;
        a.call_far(KCODE32, PM32 as u32)
    });
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        // LTR marked the TSS busy: loading it again is #GP(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(TSS_SEL))?;
            a.ltr(ax)
        })?;
        // Ring 0 may load a DPL-3 segment with RPL 3, but not a DPL-0 one with RPL 3.
        a.probe32(|a| {
            a.mov(ax, u32::from(UDATA | 3))?;
            a.mov(ds, ax)?;
            a.mov(eax, ds)?;
            a.rep_eax()?;
            a.mov(ax, u32::from(KDATA | 3))?;
            a.mov(ds, ax)
        })?;
        let u1 = user["u1"] as u32;
        a.probe32(|a| a.iret_user32(u1, EFLAGS_IOPL3))?;
        for u in ["u2", "u3", "u4", "u5", "u6"] {
            let entry = user[u] as u32;
            a.probe32(|a| a.enter_user32(entry, EFLAGS_IOPL3))?;
        }
        // With IOPL 0, CLI is privileged too.
        let (u7, u8_) = (user["u7"] as u32, user["u8"] as u32);
        a.probe32(|a| a.enter_user32(u7, EFLAGS_IOPL0))?;
        a.probe32(|a| a.enter_user32(u8_, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()?;
        // INT 0x31 handler (DPL 3 interrupt gate): report the frame and the new stack.
        a.here("h31")?;
        for off in [4, 12, 16] {
            a.mov(eax, dword_ptr(esp + off))?;
            a.rep_eax()?;
        }
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.and(eax, 0x200)?;
        a.rep_eax()?;
        a.iretd()
    });
    let h31 = k["h31"] as u32;
    g.set_gate32(0x31, gate(KCODE32, h31, 0xe, 3, 0));
    g.set_gate32(0x30, gate(KCODE32, h31, 0xe, 0, 0));
    let out = run(&g);
    let (uc, us) = (u64::from(UCODE32 | 3), u64::from(UDATA | 3));
    let ucs = UCODE32 | 3;
    assert_eq!(
        out.events,
        vec![
            exc(13, Some(u32::from(TSS_SEL)), KCODE32),
            Ev::Val(us),
            exc(13, Some(u32::from(KDATA)), KCODE32),
            // u1: ring 3 with the stack IRET gave it; DS (DPL 0) was nulled by the IRET.
            Ev::Val(uc),
            Ev::Val(us),
            Ev::Val(USTACK),
            Ev::Val(0),
            exc(13, Some(0), ucs),
            // u2: INT 0x31 switches to SS0:ESP0 and pushes SS, ESP, EFLAGS, CS, EIP.
            Ev::Val(uc),
            Ev::Val(USTACK),
            Ev::Val(us),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(STACK0 - 20),
            Ev::Val(0),
            Ev::Val(0x31),
            Ev::Val(USTACK),
            // INT 0x30's gate has DPL 0: #GP(vector * 8 + 2).
            exc(13, Some(0x30 * 8 + 2), ucs),
            // u3: ring 3 loading a DPL-0 data segment.
            exc(13, Some(u32::from(KDATA)), ucs),
            // u4: its own data segment is fine; a DPL-0 SS is not.
            Ev::Val(0x5a5a),
            exc(13, Some(u32::from(KDATA)), ucs),
            // u5-u8: MOV from CR0, HLT, CLI with IOPL 0, a far call to a DPL-0 segment.
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(u32::from(KCODE32)), ucs),
            Ev::Val(0xd0e),
        ]
    );
    assert_eq!(
        g.r64(GDT + u64::from(TSS_SEL)) >> 40 & 0xf,
        0xb,
        "the TSS is busy"
    );
    assert_eq!(
        g.r64(GDT + u64::from(UDATA)) >> 40 & 1,
        1,
        "DS loads set the accessed bit"
    );
    assert_eq!(
        g.r64(GDT + u64::from(UCODE32)) >> 40 & 1,
        1,
        "IRET sets CS's accessed bit"
    );
}

/// Conforming code segments: ring 3 calls into a DPL-0 conforming segment and keeps CPL 3
/// (CS.RPL = 3, no stack switch); a readable conforming segment may be loaded into DS at
/// any privilege; a DPL-3 conforming segment cannot be entered from ring 0; a
/// non-conforming DPL-0 segment cannot be jumped to from ring 3.
#[test]
pub(crate) fn conforming_code_segments() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let conf0 = FREE;
    let conf3 = FREE + 8;
    g.set_desc(conf0, desc(0, 0xfffff, 0x9e, 0xc));
    g.set_desc(conf3, desc(0, 0xfffff, 0xfe, 0xc));
    g.w32(DATA, 0x1234);
    let f = g.code(32, CODE3, &|a| {
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.retf()
    });
    let user = g.code(32, CODE2, &|a| {
        a.call_far(conf0, f.ip as u32)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(ax, u32::from(conf0))?;
        a.mov(ds, ax)?;
        a.mov(eax, dword_ptr(DATA as u32))?;
        a.rep_eax()?;
        a.jmp_far(KCODE32, PM32 as u32)
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        let u = user.ip as u32;
        a.probe32(|a| a.enter_user32(u, EFLAGS_IOPL3))?;
        let fip = f.ip as u32;
        a.probe32(|a| a.call_far(conf3, fip))?;
        // Ring 0 calling its own conforming segment: CPL stays 0.
        a.call_far(conf0, fip)?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let (uc, us) = (u64::from(UCODE32 | 3), u64::from(UDATA | 3));
    assert_eq!(
        out.events,
        vec![
            Ev::Val(u64::from(conf0 | 3)),
            Ev::Val(us),
            Ev::Val(USTACK - 8),
            Ev::Val(uc),
            Ev::Val(0x1234),
            exc(13, Some(u32::from(KCODE32)), UCODE32 | 3),
            exc(13, Some(u32::from(conf3)), KCODE32),
            Ev::Val(u64::from(conf0)),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(KSTACK - 8),
            Ev::Val(0xd0e),
        ]
    );
}

/// A call gate from ring 3 to ring 0: the stack switches to the TSS's SS0:ESP0, the old
/// SS:ESP and the gate's parameter count of dwords are copied, RETF n returns to ring 3 and
/// releases the parameters; a DPL-0 gate is #GP(gate selector) from ring 3.
#[test]
pub(crate) fn call_gate_with_parameters_and_stack_switch() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let gate3 = FREE;
    let gate0 = FREE + 8;
    let user = g.code(32, CODE2, &|a| {
        a.push(0x1111u32)?;
        a.push(0x2222u32)?;
        a.mov(ebx, esp)?;
        a.call_far(gate3 | 3, 0xdead)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.sub(eax, ebx)?;
        a.rep_eax()?;
        a.call_far(gate0 | 3, 0)
    });
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        let u = user.ip as u32;
        a.probe32(|a| a.enter_user32(u, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("gate_fn")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        for off in [8, 12, 16, 20] {
            a.mov(eax, dword_ptr(esp + off))?;
            a.rep_eax()?;
        }
        a.retf_1(8)
    });
    g.set_desc(gate3, gate(KCODE32, k["gate_fn"] as u32, 0xc, 3, 2));
    g.set_desc(gate0, gate(KCODE32, k["gate_fn"] as u32, 0xc, 0, 2));
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(u64::from(KCODE32)),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(STACK0 - 24),
            Ev::Val(0x2222),
            Ev::Val(0x1111),
            Ev::Val(USTACK - 8),
            Ev::Val(u64::from(UDATA | 3)),
            Ev::Val(u64::from(UCODE32 | 3)),
            Ev::Val(u64::from(UDATA | 3)),
            Ev::Val(8),
            exc(13, Some(u32::from(gate0)), UCODE32 | 3),
            Ev::Val(0xd0e),
        ]
    );
}

/// Interrupt gates clear IF, trap gates keep it; IRET restores it. INT n past the IDT limit
/// is #GP(vector * 8 + 2); a not-present gate is #NP(vector * 8 + 2); an exception whose
/// gate is not present reports EXT (bit 0) in the #NP error code.
#[test]
pub(crate) fn interrupt_and_trap_gates() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let k = g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.sti()?;
        a.int(0x32)?;
        a.int(0x33)?;
        a.pushfd()?;
        a.pop(eax)?;
        a.and(eax, 0x200)?;
        a.rep_eax()?;
        a.cli()?;
        a.probe32(|a| a.int(0x34))?;
        // Shrink the IDT to 0x40 entries: INT 0x50 is past its limit.
        a.mov(word_ptr(VARS as u32), 0x40 * 8 - 1)?;
        a.mov(dword_ptr((VARS + 2) as u32), IDT as u32)?;
        a.lidt(ptr(VARS as u32))?;
        a.probe32(|a| a.int(0x50))?;
        // #UD's gate is not present: #NP(6 * 8 + 2 + EXT).
        a.mov(byte_ptr((IDT + 6 * 8 + 5) as u32), 0x0e)?;
        a.probe32(|a| a.ud2())?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("h")?;
        a.pushfd()?;
        a.pop(eax)?;
        a.and(eax, 0x200)?;
        a.rep_eax()?;
        a.iretd()
    });
    let h = k["h"] as u32;
    g.set_gate32(0x32, gate(KCODE32, h, 0xf, 0, 0));
    g.set_gate32(0x33, gate(KCODE32, h, 0xe, 0, 0));
    g.set_gate32(0x34, gate(KCODE32, h, 0xe, 0, 0) & !(1 << 47));
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x200),
            Ev::Val(0),
            Ev::Val(0x200),
            exc(11, Some(0x34 * 8 + 2), KCODE32),
            exc(13, Some(0x50 * 8 + 2), KCODE32),
            exc(11, Some(6 * 8 + 2 + 1), KCODE32),
            Ev::Val(0xd0e),
        ]
    );
}
