//! Targeted guests: fast system calls.

use super::*;

pub(crate) const STAR: u32 = 0xc000_0081;
pub(crate) const LSTAR: u32 = 0xc000_0082;
pub(crate) const FMASK: u32 = 0xc000_0084;
pub(crate) const SYSENTER_CS: u32 = 0x174;
pub(crate) const SYSENTER_ESP: u32 = 0x175;
pub(crate) const SYSENTER_EIP: u32 = 0x176;

pub(crate) fn wrmsr(a: &mut Asm, index: u32, value: u64) -> AsmResult {
    a.mov(ecx, index)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()
}

/// SYSCALL/SYSRET in long mode: CS/SS from STAR, RIP from LSTAR, RCX/R11 = return RIP and
/// RFLAGS, FMASK clears flags; SYSRETQ returns to 64-bit ring 3, SYSRETD to compatibility
/// mode; SYSRET from ring 3 is #GP(0); SYSCALL without EFER.SCE is #UD.
#[test]
pub(crate) fn syscall_sysret() {
    let g = Guest::new();
    g.boot_long(EFER_SCE);
    g.idt64();
    g.tss64(0x4f00);
    g.code(32, CODE3, &|a| {
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.hlt() // ring 3: #GP(0)
    });
    let user = g.code(64, CODE2, &|a| {
        a.here("u1")?;
        a.std()?;
        a.mov(eax, 42)?;
        a.syscall()?;
        a.here("ret1")?;
        a.mov(ebx, eax)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, ebx)?;
        a.rep_eax()?;
        a.pushfq()?;
        a.pop(rax)?;
        a.and(eax, 0x400)?;
        a.rep_eax()?;
        a.cld()?;
        // Second call: the kernel returns with SYSRETD to compatibility mode.
        a.mov(eax, 43)?;
        a.syscall()?;
        a.here("u2")?;
        a.sysretq()
    });
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        wrmsr(
            a,
            STAR,
            (u64::from(UCODE32) << 48) | (u64::from(KCODE64) << 32),
        )?;
        wrmsr(a, LSTAR, LM64 + 0x800)?;
        wrmsr(a, FMASK, 0x400)?;
        let (u1, u2) = (user["u1"] as u32, user["u2"] as u32);
        a.probe64(|a| a.enter_user64(u1, EFLAGS_IOPL3))?;
        a.probe64(|a| a.enter_user64(u2, EFLAGS_IOPL3))?;
        // Without SCE.
        wrmsr(a, EFER, u64::from(EFER_LME | 0x400))?;
        a.probe64(|a| a.syscall())?;
        a.val(0xd0e)?;
        a.hlt()
    });
    assert!(k.bytes.len() < 0x800);
    let entry = assemble(64, LM64 + 0x800, &|a| {
        a.mov(r12, rax)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(rax, rcx)?;
        a.rep_eax()?;
        a.mov(rax, r11)?;
        a.and(eax, 0x3600)?;
        a.rep_eax()?;
        a.pushfq()?;
        a.pop(rax)?;
        a.and(eax, 0x400)?;
        a.rep_eax()?;
        a.mov(rax, r12)?;
        a.add(eax, 1)?;
        let mut second = a.create_label();
        a.cmp(eax, 44)?;
        a.je(second)?;
        a.sysretq()?;
        a.set_label(&mut second)?;
        a.mov(ecx, CODE3 as u32)?;
        a.mov(esp, (USTACK - 0x100) as u32)?;
        a.sysret()
    });
    g.write(entry.ip, &entry.bytes);
    let out = run(&g);
    let ret1 = user["ret1"];
    assert_eq!(
        out.events,
        vec![
            // Kernel side of the first SYSCALL.
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(ret1),
            Ev::Val(0x3400),
            Ev::Val(0),
            // Back in ring 3 with SYSRETQ.
            Ev::Val(u64::from(UCODE64 | 3)),
            Ev::Val(u64::from(UDATA | 3)),
            Ev::Val(43),
            Ev::Val(0x400),
            // Second SYSCALL, SYSRETD to compatibility mode.
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(u64::from(KDATA)),
            Ev::Val(user["u2"]),
            Ev::Val(0x3000),
            Ev::Val(0),
            Ev::Val(u64::from(UCODE32 | 3)),
            Ev::Val(u64::from(UDATA | 3)),
            Ev::Val(USTACK - 0x100),
            exc(13, Some(0), UCODE32 | 3),
            // SYSRETQ at ring 3.
            exc(13, Some(0), UCODE64 | 3),
            exc(6, None, KCODE64),
            Ev::Val(0xd0e),
        ]
    );
}

/// SYSENTER/SYSEXIT in 32-bit protected mode: CS/SS derived from IA32_SYSENTER_CS (+8 for
/// SS, +16/+24 with RPL 3 for SYSEXIT), ESP/EIP from the MSRs, IF cleared; SYSEXIT from ring 3
/// and SYSENTER with a null IA32_SYSENTER_CS are #GP(0).
#[test]
pub(crate) fn sysenter_sysexit() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let base = FREE;
    g.set_desc(base, desc(0, 0xfffff, 0x9a, 0xc));
    g.set_desc(base + 8, desc(0, 0xfffff, 0x92, 0xc));
    g.set_desc(base + 16, desc(0, 0xfffff, 0xfa, 0xc));
    g.set_desc(base + 24, desc(0, 0xfffff, 0xf2, 0xc));
    let user = g.code(32, CODE2, &|a| {
        a.here("u1")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.sti()?;
        a.sysenter()?;
        a.here("u1_ret")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.hlt()?;
        a.here("u2")?;
        a.sysexit()?;
        a.here("u3")?;
        a.sysenter()
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        wrmsr(a, SYSENTER_CS, u64::from(base))?;
        wrmsr(a, SYSENTER_ESP, STACK0 - 0x100)?;
        let entry = a.addr("entry");
        wrmsr(a, SYSENTER_EIP, u64::from(entry))?;
        // IOPL 3 for ring 3's reports (SYSEXIT leaves EFLAGS alone).
        a.pushfd()?;
        a.or(dword_ptr(esp), 0x3000)?;
        a.popfd()?;
        let (u1, u2, u3) = (user["u1"] as u32, user["u2"] as u32, user["u3"] as u32);
        a.probe32(|a| {
            a.mov(edx, u1)?;
            a.mov(ecx, USTACK as u32)?;
            a.sysexit()
        })?;
        a.probe32(|a| {
            a.mov(edx, u2)?;
            a.mov(ecx, USTACK as u32)?;
            a.sysexit()
        })?;
        wrmsr(a, SYSENTER_CS, 0)?;
        a.probe32(|a| a.enter_user32(u3, EFLAGS_IOPL3))?;
        a.val(0xd0e)?;
        a.hlt()?;
        a.here("entry")?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(eax, ss)?;
        a.rep_eax()?;
        a.mov(eax, esp)?;
        a.rep_eax()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.and(eax, 0x3200)?;
        a.rep_eax()?;
        let ret = user["u1_ret"] as u32;
        a.mov(edx, ret)?;
        a.mov(ecx, (USTACK - 0x10) as u32)?;
        a.sysexit()
    });
    let out = run(&g);
    let ucs = base + 16 + 3;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(u64::from(ucs)),
            Ev::Val(u64::from(base + 24 + 3)),
            Ev::Val(USTACK),
            Ev::Val(u64::from(base)),
            Ev::Val(u64::from(base + 8)),
            Ev::Val(STACK0 - 0x100),
            Ev::Val(0x3000),
            Ev::Val(u64::from(ucs)),
            Ev::Val(USTACK - 0x10),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(0), UCODE32 | 3),
            Ev::Val(0xd0e),
        ]
    );
}

/// The TSS I/O permission bitmap at CPL 3 > IOPL: allowed ports reach the VMM (OUT, IN,
/// OUTS), a denied port or any denied byte of a wider access is #GP(0), ports past the
/// bitmap's end are #GP(0); IOPL 3 bypasses the bitmap.
#[test]
pub(crate) fn io_permission_bitmap() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[0x81, 0x83, 0x3f8]);
    g.write(DATA, &[0xa1, 0xa2, 0xa3]);
    g.write(DATA + 0x10, &[0xee; 4]);
    let user = g.code(32, CODE2, &|a| {
        a.here("u1")?;
        a.mov(al, 0x11)?;
        a.out(0x80u32, al)?;
        a.in_(al, 0x80u32)?;
        a.out(u32::from(P_VAL), al)?;
        a.mov(dx, 0x84u32)?;
        a.mov(eax, 0x1234_5678u32)?;
        a.out(dx, eax)?;
        a.mov(esi, DATA as u32)?;
        a.mov(ecx, 2u32)?;
        a.mov(dx, 0x80u32)?;
        a.rep().outsb()?;
        a.mov(edi, (DATA + 0x10) as u32)?;
        a.mov(ecx, 2u32)?;
        a.rep().insb()?;
        a.mov(dx, 0x81u32)?;
        a.outsb()?;
        a.here("u2")?;
        a.mov(dx, 0x82u32)?;
        a.out(dx, ax)?;
        a.here("u3")?;
        a.mov(dx, 0x3f8u32)?;
        a.in_(al, dx)?;
        a.here("u4")?;
        a.mov(dx, 0x400u32)?;
        a.out(dx, al)?;
        a.here("u5")?;
        a.mov(al, 0x22)?;
        a.out(0x81u32, al)?;
        a.hlt()
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        for u in ["u1", "u2", "u3", "u4"] {
            let entry = user[u] as u32;
            a.probe32(|a| a.enter_user32(entry, EFLAGS_IOPL0))?;
        }
        let u5 = user["u5"] as u32;
        a.probe32(|a| a.enter_user32(u5, EFLAGS_IOPL3))?;
        // Ring 0 with IOPL 0: CPL <= IOPL, no bitmap check.
        a.mov(al, 0x33)?;
        a.out(0x81u32, al)?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run_with(
        &g,
        Hooks {
            input: Some(&|port| if port == 0x80 { 0x5a } else { 0 }),
            ..Default::default()
        },
    );
    let ucs = UCODE32 | 3;
    assert_eq!(
        out.events,
        vec![
            Ev::Out(0x80, 0x11),
            Ev::In(0x80),
            Ev::Val(0x5a),
            Ev::Out(0x84, 0x1234_5678),
            Ev::Out(0x80, 0xa1),
            Ev::Out(0x80, 0xa2),
            Ev::In(0x80),
            Ev::In(0x80),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            exc(13, Some(0), ucs),
            Ev::Out(0x81, 0x22),
            exc(13, Some(0), ucs),
            Ev::Out(0x81, 0x33),
            Ev::Val(0xd0e),
        ]
    );
    assert_eq!(g.r32(DATA + 0x10), 0xeeee_5a5a, "REP INSB stores bytes");
}
