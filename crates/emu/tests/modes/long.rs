//! Targeted guests: long mode.

use super::*;

pub(crate) const EFER_SCE: u32 = 0x1;
pub(crate) const EFER_LME: u32 = 0x100;
pub(crate) const EFER_NXE: u32 = 0x800;

impl Guest {
    /// Real mode -> 32-bit protected mode -> long mode (4-level paging over [`Guest::paging64`]'s
    /// tables, EFER |= `efer`) -> 64-bit code at [`LM64`].
    pub(crate) fn boot_long(&self, efer_bits: u32) {
        self.boot_pm32();
        self.paging64();
        self.code(32, PM32, &|a| {
            pm32_init(a, false)?;
            a.mov(eax, cr4)?;
            a.or(eax, 0x20)?;
            a.mov(cr4, eax)?;
            a.mov(eax, PML4 as u32)?;
            a.mov(cr3, eax)?;
            a.mov(ecx, EFER)?;
            a.rdmsr()?;
            a.or(eax, (EFER_LME | efer_bits) as i32)?;
            a.wrmsr()?;
            a.mov(eax, cr0)?;
            a.or(eax, CR0_PG as i32)?;
            a.mov(cr0, eax)?;
            a.jmp_far(KCODE64, LM64 as u32)
        });
    }
}

/// 64-bit kernel prologue: data segments, stack, IDT, and (when `tss`) TR.
pub(crate) fn lm64_init(a: &mut Asm, tss: bool) -> AsmResult {
    a.mov(ax, u32::from(KDATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(rsp, KSTACK)?;
    a.lidt(ptr(IDTR))?;
    if tss {
        a.mov(ax, u32::from(TSS_SEL))?;
        a.ltr(ax)?;
    }
    Ok(())
}

/// Long mode: 64-bit operands and pushes, EFER.LMA, a far jump to compatibility mode (32-bit
/// code, 4-byte pushes) and back, an interrupt from compatibility mode through the 64-bit IDT
/// and IRETQ back, IST and same-level 16-byte stack alignment, non-canonical addresses, and
/// leaving long mode by clearing CR0.PG in compatibility mode.
#[test]
pub(crate) fn long_mode_64bit_and_compatibility() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    let (c1, c2) = (CODE2 as u32, CODE2 as u32 + 0x400);
    let k = g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.shr(rax, 32)?;
        a.rep_eax()?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(ecx, EFER)?;
        a.rdmsr()?;
        a.and(eax, 0x500)?;
        a.rep_eax()?;
        a.mov(rcx, rsp)?;
        a.push(rax)?;
        a.sub(rcx, rsp)?;
        a.mov(eax, ecx)?;
        a.rep_eax()?;
        a.pop(rax)?;
        // To compatibility mode through a far pointer in memory (m16:32).
        a.mov(dword_ptr(VARS), c1)?;
        a.mov(word_ptr(VARS + 4), u32::from(KCODE32))?;
        a.jmp(fword_ptr(VARS))?;
        // Back in 64-bit mode.
        a.here("back64")?;
        a.val(0x64)?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.probe64(|a| {
            a.mov(rax, 0x0000_8000_0000_0000u64)?;
            a.mov(rax, qword_ptr(rax))
        })?;
        a.probe64(|a| a.ud2())?;
        // IST 1, and a same-level interrupt on a misaligned stack.
        a.int(0x41)?;
        a.sub(rsp, 8)?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.int(0x42)?;
        a.add(rsp, 8)?;
        a.mov(dword_ptr(VARS), c2)?;
        a.mov(word_ptr(VARS + 4), u32::from(KCODE32))?;
        a.jmp(fword_ptr(VARS))?;
        a.here("h40")?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.rep_eax()?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.iretq()?;
        a.here("h41")?;
        a.mov(rax, rsp)?;
        a.rep_eax()?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.rep_eax()?;
        a.iretq()
    });
    let back64 = k["back64"] as u32;
    g.code(32, u64::from(c1), &|a| {
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.mov(ecx, esp)?;
        a.push(eax)?;
        a.sub(ecx, esp)?;
        a.mov(eax, ecx)?;
        a.rep_eax()?;
        a.pop(eax)?;
        a.int(0x40)?;
        a.val(0xc0)?;
        a.jmp_far(KCODE64, back64)
    });
    // Leave long mode: paging off in compatibility mode clears EFER.LMA.
    g.code(32, u64::from(c2), &|a| {
        a.mov(eax, cr0)?;
        a.and(eax, !CR0_PG as i32)?;
        a.mov(cr0, eax)?;
        a.mov(ecx, EFER)?;
        a.rdmsr()?;
        a.and(eax, 0x500)?;
        a.rep_eax()?;
        a.mov(eax, cs)?;
        a.rep_eax()?;
        a.hlt()
    });
    g.set_gate64(0x40, gate64(KCODE64, k["h40"], 0xe, 0, 0));
    g.set_gate64(0x41, gate64(KCODE64, k["h41"], 0xe, 0, 1));
    g.set_gate64(0x42, gate64(KCODE64, k["h41"], 0xe, 0, 0));
    let out = run(&g);
    let misaligned = KSTACK - 8;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x1234_5678),
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(0x500),
            Ev::Val(8),
            // Compatibility mode.
            Ev::Val(u64::from(KCODE32)),
            Ev::Val(4),
            Ev::Val(u64::from(KCODE32)),
            Ev::Val(u64::from(KCODE64)),
            Ev::Val(0xc0),
            // 64-bit mode again.
            Ev::Val(0x64),
            Ev::Val(u64::from(KCODE64)),
            exc(13, Some(0), KCODE64),
            exc(6, None, KCODE64),
            // IST 1 stack: 0x4f00 minus the 5-quadword frame.
            Ev::Val(0x4f00 - 40),
            Ev::Val(KSTACK),
            Ev::Val(misaligned),
            // Same level, no IST: RSP aligned down to 16 before the frame.
            Ev::Val((misaligned & !0xf) - 40),
            Ev::Val(misaligned),
            // Out of long mode.
            Ev::Val(0x100),
            Ev::Val(u64::from(KCODE32)),
        ]
    );
}

/// 4-level paging in long mode: A bits on every level, CR0.WP, ring-3 faults (supervisor
/// page, read-only page, NX page and fetch from a supervisor page: error codes with U and
/// I), a PS bit in a PML4E (reserved) and a non-canonical address from ring 3 (#GP(0)).
#[test]
pub(crate) fn paging_4level_user_faults() {
    let g = Guest::new();
    g.boot_long(EFER_NXE);
    g.idt64();
    g.tss64(0x4f00);
    let pte = |page: u64, flags: u64| g.w64(pte64(page), page | flags);
    pte(DATA + 0x3000, P | RW);
    pte(DATA + 0x4000, P | US);
    pte(DATA + 0x7000, P | RW | US | NX);
    g.write(DATA + 0x3000, &[0xc3]);
    g.write(DATA + 0x7000, &[0xc3]);
    // PML4 entry 1 (512 GiB) with the PS bit, which is reserved there.
    g.w64(PML4 + 8, PDPT | P | RW | US | PS);
    let user = g.code(64, CODE2, &|a| {
        a.here("u1")?;
        a.mov(rax, qword_ptr(DATA + 0x3000))?;
        a.here("u2")?;
        a.mov(dword_ptr(DATA + 0x4000), 1)?;
        a.here("u3")?;
        a.mov(rax, DATA + 0x7000)?;
        a.call(rax)?;
        a.here("u4")?;
        a.mov(rax, DATA + 0x3000)?;
        a.jmp(rax)?;
        a.here("u5")?;
        a.mov(rax, 0xffff_7000_0000_0000u64)?;
        a.mov(rax, qword_ptr(rax))?;
        a.here("u6")?;
        a.mov(rax, 0x80_0000_0000u64)?;
        a.mov(rax, qword_ptr(rax))
    });
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        for table in [PML4, PDPT, PD, pte64(DATA + 0x3000)] {
            report_mem(a, table, 0x20)?;
        }
        report_mem(a, DATA + 0x3000, 0xff)?;
        report_mem(a, pte64(DATA + 0x3000), 0x20)?;
        a.mov(dword_ptr(DATA + 0x4000), 5)?;
        a.mov(rax, cr0)?;
        a.or(eax, CR0_WP as i32)?;
        a.mov(cr0, rax)?;
        a.probe64(|a| a.mov(dword_ptr(DATA + 0x4000), 6))?;
        for u in ["u1", "u2", "u3", "u4", "u5", "u6"] {
            let entry = user[u] as u32;
            a.probe64(|a| a.enter_user64(entry, EFLAGS_IOPL3))?;
        }
        a.probe64(|a| {
            a.mov(rax, 0x80_0000_0000u64)?;
            a.mov(rax, qword_ptr(rax))
        })?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let u = UCODE64 | 3;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x20),
            Ev::Val(0x20),
            Ev::Val(0x20),
            Ev::Val(0),
            Ev::Val(0xc3),
            Ev::Val(0x20),
            pf(3, DATA + 0x4000, KCODE64),
            pf(5, DATA + 0x3000, u),
            pf(7, DATA + 0x4000, u),
            pf(0x15, DATA + 0x7000, u),
            pf(0x15, DATA + 0x3000, u),
            exc(13, Some(0), u),
            pf(0xd, 0x80_0000_0000, u),
            pf(9, 0x80_0000_0000, KCODE64),
            Ev::Val(0xd0e),
        ]
    );
    assert_eq!(g.r32(DATA + 0x4000), 5);
}

/// Execution reaching a non-canonical RIP raises #GP(0), not a page fault at the
/// non-canonical address (and nothing non-canonical reaches the TLB): by a branch (the fault
/// comes on the branch) and by running off the end of the lower canonical half.
#[test]
pub(crate) fn non_canonical_rip_raises_gp() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    // Map the last page of the lower half (PML4[255], PDPT[511], PD[511], PT[511]) to a
    // frame ending in 16 NOPs.
    let (pdpt2, pd2, pt2, frame) = (0x30000u64, 0x31000u64, 0x32000u64, 0x40000u64);
    g.write(pdpt2, &[0; 0x3000]);
    g.w64(PML4 + 255 * 8, pdpt2 | P | RW);
    g.w64(pdpt2 + 511 * 8, pd2 | P | RW);
    g.w64(pd2 + 511 * 8, pt2 | P | RW);
    g.w64(pt2 + 511 * 8, frame | P | RW);
    g.write(frame + 0xff0, &[0x90; 16]);
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.probe64(|a| {
            a.mov(rax, 0x0000_8000_0000_0000u64)?;
            a.jmp(rax)
        })?;
        a.probe64(|a| {
            a.mov(rax, 0xffff_7fff_ffff_f000u64)?;
            a.call(rax)
        })?;
        // Running off the end of the lower half: NOPs in its last page, then 0x8000_0000_0000.
        a.probe64(|a| {
            a.mov(rax, 0x7fff_ffff_fff0u64)?;
            a.jmp(rax)
        })?;
        // An instruction straddling into the hole (MOV EAX, imm32 at the last two bytes).
        a.mov(rax, 0x7fff_ffff_fffeu64)?;
        a.mov(word_ptr(rax), 0x01b8)?;
        a.probe64(|a| a.jmp(rax))?;
        a.val(0x64)?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            exc(13, Some(0), KCODE64),
            exc(13, Some(0), KCODE64),
            exc(13, Some(0), KCODE64),
            exc(13, Some(0), KCODE64),
            Ev::Val(0x64)
        ]
    );
}

/// LTR and LLDT in IA-32e mode check that the 64-bit descriptor's base is canonical: #GP with
/// the selector when it is not; a canonical upper-half base loads.
#[test]
pub(crate) fn ltr_lldt_refuse_non_canonical_bases() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    let (tss2, ldt_bad, ldt_ok) = (0x60u16, 0x70u16, 0x80u16);
    g.set_desc(tss2, desc(0x9000, 0x67, 0x89, 0));
    g.w64(GDT + u64::from(tss2) + 8, 0x8000); // base 0x0000_8000_0000_9000
    g.set_desc(ldt_bad, desc(0x9000, 0xff, 0x82, 0));
    g.w64(GDT + u64::from(ldt_bad) + 8, 0x8000);
    g.set_desc(ldt_ok, desc(0x9000, 0xff, 0x82, 0));
    g.w64(GDT + u64::from(ldt_ok) + 8, 0xffff_ffff); // base 0xffff_ffff_0000_9000
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.probe64(|a| {
            a.mov(ax, u32::from(tss2))?;
            a.ltr(ax)
        })?;
        a.probe64(|a| {
            a.mov(ax, u32::from(ldt_bad))?;
            a.lldt(ax)
        })?;
        a.mov(ax, u32::from(ldt_ok))?;
        a.lldt(ax)?;
        a.sldt(eax)?;
        a.rep_eax()?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            exc(13, Some(u32::from(tss2)), KCODE64),
            exc(13, Some(u32::from(ldt_bad)), KCODE64),
            Ev::Val(u64::from(ldt_ok)),
        ]
    );
}

/// Machine check: CPUID advertises MCE and MCA; MCG_CAP reports 4 banks with MCG_CTL; the
/// registers read their reset values, take what the SDM allows, and refuse the rest with #GP.
#[test]
pub(crate) fn machine_check_msrs() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(eax, edx)?;
        a.and(eax, (1 << 7) | (1 << 14))?;
        a.rep_eax()?;
        for msr in [0x179u32, 0x17a, 0x17b, 0x400, 0x401, 0x40f] {
            a.mov(ecx, msr)?;
            a.rdmsr()?;
            a.rep_eax()?;
        }
        // MCG_CTL all ones; bank 0's CTL anything; then read back.
        a.mov(ecx, 0x17bu32)?;
        a.mov(eax, 0xffff_ffffu32)?;
        a.mov(edx, 0xffff_ffffu32)?;
        a.wrmsr()?;
        a.rdmsr()?;
        a.rep_eax()?;
        a.mov(ecx, 0x400u32)?;
        a.mov(eax, 0x1234u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdmsr()?;
        a.rep_eax()?;
        // Refused: MCG_CAP, a non-zero STATUS, MCG_CTL neither 0 nor all ones, bank 4.
        for (msr, v) in [(0x179u32, 0u32), (0x401, 1), (0x17b, 5), (0x410, 0)] {
            a.probe64(|a| {
                a.mov(ecx, msr)?;
                a.mov(eax, v)?;
                a.xor(edx, edx)?;
                a.wrmsr()
            })?;
        }
        a.probe64(|a| {
            a.mov(ecx, 0x410u32)?;
            a.rdmsr()
        })?;
        a.hlt()
    });
    let out = run(&g);
    let gp0 = exc(13, Some(0), KCODE64);
    assert_eq!(
        out.events,
        vec![
            Ev::Val((1 << 7) | (1 << 14)),
            Ev::Val(0x104),
            Ev::Val(0),
            Ev::Val(0),
            Ev::Val(0),
            Ev::Val(0),
            Ev::Val(0),
            Ev::Val(0xffff_ffff),
            Ev::Val(0x1234),
            gp0.clone(),
            gp0.clone(),
            gp0.clone(),
            gp0.clone(),
            gp0,
        ]
    );
}

/// The APIC's CPUID and IA32_APIC_BASE rules: CPUID.1:EDX.APIC clears while the APIC is
/// globally disabled; reserved bits of IA32_APIC_BASE (0-7, 9, above MAXPHYADDR) raise #GP;
/// leaf 0xB reports the x2APIC ID (the initial APIC ID of leaf 1) and the topology levels.
#[test]
pub(crate) fn apic_base_and_cpuid_agree() {
    let g = Guest::new();
    g.boot_long(0);
    g.idt64();
    g.tss64(0x4f00);
    let apic_bit = |a: &mut Asm| -> AsmResult {
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(eax, edx)?;
        a.shr(eax, 9)?;
        a.and(eax, 1)?;
        a.rep_eax()
    };
    g.code(64, LM64, &|a| {
        lm64_init(a, true)?;
        apic_bit(a)?;
        a.mov(ecx, 0x1bu32)?;
        a.mov(eax, 0xfee0_0000u32)?; // EN clear: globally disabled
        a.xor(edx, edx)?;
        a.wrmsr()?;
        apic_bit(a)?;
        for (lo, hi) in [
            (0xfee0_0801u32, 0u32),
            (0xfee0_0a00, 0),
            (0xfee0_0800, 1 << 18),
        ] {
            a.probe64(|a| {
                a.mov(ecx, 0x1bu32)?;
                a.mov(eax, lo)?;
                a.mov(edx, hi)?;
                a.wrmsr()
            })?;
        }
        a.mov(ecx, 0x1bu32)?;
        a.mov(eax, 0xfee0_0900u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        apic_bit(a)?;
        for sub in [0u32, 1, 2] {
            a.mov(eax, 0xbu32)?;
            a.mov(ecx, sub)?;
            a.cpuid()?;
            a.mov(eax, ecx)?;
            a.rep_eax()?;
            a.mov(eax, edx)?;
            a.rep_eax()?;
        }
        a.hlt()
    });
    let out = run(&g);
    let gp0 = exc(13, Some(0), KCODE64);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(1),
            Ev::Val(0),
            gp0.clone(),
            gp0.clone(),
            gp0,
            Ev::Val(1),
            Ev::Val(0x100),
            Ev::Val(0),
            Ev::Val(0x201),
            Ev::Val(0),
            Ev::Val(2),
            Ev::Val(0),
        ]
    );
}
