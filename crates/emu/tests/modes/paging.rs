//! Targeted guests: paging.

use super::*;

pub(crate) const CR0_PG: u32 = 0x8000_0000;
pub(crate) const CR0_WP: u32 = 0x1_0000;
pub(crate) const EFER: u32 = 0xc000_0080;

pub(crate) fn enable_paging32(a: &mut Asm, root: u32) -> AsmResult {
    a.mov(eax, root)?;
    a.mov(cr3, eax)?;
    a.mov(eax, cr0)?;
    a.or(eax, CR0_PG as i32)?;
    a.mov(cr0, eax)
}

/// Report the dword at `addr`, masked.
pub(crate) fn report_mem(a: &mut Asm, addr: u64, mask: u32) -> AsmResult {
    a.mov(eax, dword_ptr(addr as u32))?;
    a.and(eax, mask as i32)?;
    a.rep_eax()
}

/// 32-bit paging: accessed and dirty bits in the PDE/PTE, not-present/write/user faults with
/// their error codes and CR2, CR0.WP, a remapping made visible with INVLPG, a 4 MiB PSE page
/// (with its own A/D bits) and a reserved bit in a PSE PDE.
#[test]
pub(crate) fn paging_32bit() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let root = g.paging32();
    let pte = |page: u64, flags: u64| g.w32(pte32(page), (page | flags) as u32);
    pte(DATA, P | RW | US);
    pte(DATA + 0x1000, 0);
    pte(DATA + 0x2000, P | US);
    pte(DATA + 0x3000, P | RW);
    pte(DATA + 0x4000, P | US);
    pte(DATA + 0x7000, P | RW);
    g.w32(DATA, 0x1111);
    g.w32(DATA + 0x4000, 0x4444);
    g.w32(DATA + 0x5000, 0x5555);
    g.w32(DATA + 0x6000, 0x6666);
    g.write(DATA + 0x7000, &[0xc3]);
    let user = g.code(32, CODE2, &|a| {
        a.here("u1")?;
        a.mov(eax, dword_ptr((DATA + 0x3000) as u32))?;
        a.here("u2")?;
        a.mov(dword_ptr((DATA + 0x4000) as u32), 1)?;
        a.here("u3")?;
        a.mov(eax, dword_ptr((DATA + 0x1000) as u32))?;
        a.here("u4")?;
        a.mov(eax, dword_ptr((DATA + 0x4000) as u32))?;
        a.rep_eax()?;
        a.mov(eax, (DATA + 0x7000) as u32)?;
        a.jmp(eax)
    });
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        enable_paging32(a, root)?;
        report_mem(a, pte32(DATA), 0xffff_ffff)?;
        report_mem(a, DATA, 0xffff_ffff)?;
        report_mem(a, pte32(DATA), 0xffff_ffff)?;
        report_mem(a, PD32, 0x60)?;
        a.mov(dword_ptr(DATA as u32), 0x2222)?;
        report_mem(a, pte32(DATA), 0xffff_ffff)?;
        // Not present: read, then write.
        a.probe32(|a| a.mov(eax, dword_ptr((DATA + 0x1004) as u32)))?;
        a.probe32(|a| a.mov(dword_ptr((DATA + 0x1008) as u32), 1))?;
        // A read-only page: supervisor writes pass with WP=0 and fault with WP=1.
        a.mov(dword_ptr((DATA + 0x2000) as u32), 5)?;
        report_mem(a, DATA + 0x2000, 0xffff_ffff)?;
        a.mov(eax, cr0)?;
        a.or(eax, CR0_WP as i32)?;
        a.mov(cr0, eax)?;
        a.probe32(|a| a.mov(dword_ptr((DATA + 0x2010) as u32), 6))?;
        // Ring 3: a supervisor page, a read-only page, a not-present page, a fetch from a
        // supervisor page.
        for u in ["u1", "u2", "u3", "u4"] {
            let entry = user[u] as u32;
            a.probe32(|a| a.enter_user32(entry, EFLAGS_IOPL3))?;
        }
        // Remap DATA+0x5000 to DATA+0x6000; INVLPG makes it visible.
        report_mem(a, DATA + 0x5000, 0xffff_ffff)?;
        a.mov(
            dword_ptr(pte32(DATA + 0x5000) as u32),
            ((DATA + 0x6000) | P | RW | US) as u32,
        )?;
        a.invlpg(ptr((DATA + 0x5000) as u32))?;
        report_mem(a, DATA + 0x5000, 0xffff_ffff)?;
        // PSE: PDE 1 maps 4-8 MiB onto 0-4 MiB; PDE 2 has reserved bit 21 set.
        a.mov(eax, cr4)?;
        a.or(eax, 0x10)?;
        a.mov(cr4, eax)?;
        a.mov(dword_ptr((PD32 + 4) as u32), (P | RW | US | PS) as u32)?;
        a.mov(
            dword_ptr((PD32 + 8) as u32),
            (0x80_0000 | (1 << 21) | P | RW | US | PS) as u32,
        )?;
        report_mem(a, 0x40_0000 + DATA, 0xffff_ffff)?;
        report_mem(a, PD32 + 4, 0xffff_ffff)?;
        a.mov(dword_ptr((0x40_0000 + DATA + 8) as u32), 8)?;
        report_mem(a, PD32 + 4, 0xffff_ffff)?;
        a.probe32(|a| a.mov(eax, dword_ptr(0x80_0010u32)))?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let ucs = UCODE32 | 3;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(DATA | 7),
            Ev::Val(0x1111),
            Ev::Val(DATA | 0x27),
            Ev::Val(0x20),
            Ev::Val(DATA | 0x67),
            pf(0, DATA + 0x1004, KCODE32),
            pf(2, DATA + 0x1008, KCODE32),
            Ev::Val(5),
            pf(3, DATA + 0x2010, KCODE32),
            pf(5, DATA + 0x3000, ucs),
            pf(7, DATA + 0x4000, ucs),
            pf(4, DATA + 0x1000, ucs),
            Ev::Val(0x4444),
            pf(5, DATA + 0x7000, ucs),
            Ev::Val(0x5555),
            Ev::Val(0x6666),
            Ev::Val(0x2222),
            Ev::Val(0xa7),
            Ev::Val(0xe7),
            pf(9, 0x80_0010, KCODE32),
            Ev::Val(0xd0e),
        ]
    );
    // The host sees the same bits.
    assert_eq!(g.r32(pte32(DATA + 0x2000)) & 0x60, 0x60);
    assert_eq!(
        g.r32(pte32(DATA + 0x1000)),
        (DATA + 0x1000) as u32,
        "a not-present PTE is left alone"
    );
}

/// PAE paging with EFER.NXE: an instruction fetch from an NX page (error code with I), a
/// reserved physical-address bit in a PTE (RSVD, for reads and writes), a 2 MiB page with its
/// A/D bits, and NX becoming a reserved bit once NXE is cleared.
#[test]
pub(crate) fn paging_pae_nx_and_reserved_bits() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.paging64();
    g.pae_pdpt();
    let pte = |page: u64, flags: u64| g.w64(pte64(page), page | flags);
    pte(DATA + 0x7000, P | RW | NX);
    pte(DATA + 0x8000, P | RW | (1 << 45));
    g.write(DATA + 0x7000, &[0xc3]);
    g.w32(DATA, 0x77);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(ecx, EFER)?;
        a.rdmsr()?;
        a.or(eax, 0x800)?;
        a.wrmsr()?;
        enable_paging32(a, PDPT as u32)?;
        report_mem(a, DATA + 0x7000, 0xff)?;
        a.probe32(|a| {
            a.mov(eax, (DATA + 0x7000) as u32)?;
            a.call(eax)
        })?;
        a.probe32(|a| a.mov(eax, dword_ptr((DATA + 0x8004) as u32)))?;
        a.probe32(|a| a.mov(dword_ptr((DATA + 0x8008) as u32), 1))?;
        // PDE 1: a 2 MiB page mapping 2-4 MiB onto 0-2 MiB.
        a.mov(dword_ptr((PD + 8) as u32), (P | RW | PS) as u32)?;
        report_mem(a, 0x20_0000 + DATA, 0xffff_ffff)?;
        report_mem(a, PD + 8, 0xfff)?;
        a.mov(dword_ptr((0x20_0000 + DATA + 4) as u32), 1)?;
        report_mem(a, PD + 8, 0xfff)?;
        report_mem(a, pte64(DATA), 0xfff)?;
        report_mem(a, DATA, 0xffff_ffff)?;
        report_mem(a, pte64(DATA), 0xfff)?;
        report_mem(a, pte64(DATA) + 4, 0xffff_ffff)?;
        // Without NXE, bit 63 is reserved.
        a.mov(ecx, EFER)?;
        a.rdmsr()?;
        a.and(eax, !0x800)?;
        a.wrmsr()?;
        a.probe32(|a| a.mov(eax, dword_ptr((DATA + 0x7000) as u32)))?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    let k = KCODE32;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0xc3),
            pf(0x11, DATA + 0x7000, k),
            pf(0x9, DATA + 0x8004, k),
            pf(0xb, DATA + 0x8008, k),
            Ev::Val(0x77),
            Ev::Val(0xa3),
            Ev::Val(0xe3),
            Ev::Val(0x07),
            Ev::Val(0x77),
            Ev::Val(0x27),
            Ev::Val(0),
            pf(0x9, DATA + 0x7000, k),
            Ev::Val(0xd0e),
        ]
    );
}

/// PAE paging loads the four PDPTEs when CR0.PG is set and on every CR3 load: a present PDPTE
/// with a reserved bit (here RW, which PAE PDPTEs do not have) makes that MOV #GP(0) and leaves
/// the register unchanged.
#[test]
pub(crate) fn paging_pae_pdpte_reserved_bits() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.paging64();
    g.pae_pdpt();
    let bad = PT_AREA + 0x6000;
    g.w64(bad, PD | P);
    g.w64(bad + 8, PD | P | RW);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, bad as u32)?;
        a.mov(cr3, eax)?;
        a.probe32(|a| {
            a.mov(eax, cr0)?;
            a.or(eax, CR0_PG as i32)?;
            a.mov(cr0, eax)
        })?;
        a.mov(eax, cr0)?;
        a.shr(eax, 31)?;
        a.rep_eax()?;
        enable_paging32(a, PDPT as u32)?;
        a.val(0x9a6e)?;
        a.probe32(|a| {
            a.mov(eax, bad as u32)?;
            a.mov(cr3, eax)
        })?;
        a.mov(eax, cr3)?;
        a.rep_eax()?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            exc(13, Some(0), KCODE32),
            Ev::Val(0),
            Ev::Val(0x9a6e),
            exc(13, Some(0), KCODE32),
            Ev::Val(PDPT),
        ]
    );
}

/// INVLPG of one address inside a 4 MiB page drops the translation of the whole page: after
/// the PDE is pointed elsewhere, another 4 KiB piece of the page that was used before the
/// INVLPG reads the new frame, not the old one (SDM 4.10.4.1).
#[test]
pub(crate) fn invlpg_drops_every_piece_of_a_large_page() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let root = g.paging32();
    for (base, a, b) in [
        (0x80_0000u64, 0x1111u32, 0xaaaa),
        (0xc0_0000, 0x2222, 0xbbbb),
    ] {
        g.w32(base, a);
        g.w32(base + 0x1000, b);
    }
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        enable_paging32(a, root)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x10)?;
        a.mov(cr4, eax)?;
        a.mov(
            dword_ptr((PD32 + 4) as u32),
            (0x80_0000 | P | RW | PS) as u32,
        )?;
        report_mem(a, 0x40_0000, 0xffff_ffff)?;
        report_mem(a, 0x40_1000, 0xffff_ffff)?;
        a.mov(
            dword_ptr((PD32 + 4) as u32),
            (0xc0_0000 | P | RW | PS) as u32,
        )?;
        a.invlpg(ptr(0x40_0000u32))?;
        report_mem(a, 0x40_1000, 0xffff_ffff)?;
        report_mem(a, 0x40_0000, 0xffff_ffff)?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(out.events, vals(&[0x1111, 0xaaaa, 0xbbbb, 0x2222]));
}

/// An instruction straddling two pages is re-checked against the second page's current
/// mapping: after that page is remapped the new bytes are used, and after it is unmapped the
/// fetch faults at that instruction (CR2 at the second page).
#[test]
pub(crate) fn straddling_instruction_follows_the_second_page() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.tss32(&[]);
    let root = g.paging32();
    let (code, second, other) = (0x20_0000u64, 0x20_1000u64, 0x20_2000u64);
    // mov eax, imm32 across the boundary; ret on the second page.
    g.write(code + 0xffe, &[0xb8, 0x11]);
    g.write(second, &[0x22, 0x33, 0x44, 0xc3]);
    g.write(other, &[0x55, 0x66, 0x77, 0xc3]);
    g.code(32, PM32, &|a| {
        pm32_init(a, true)?;
        enable_paging32(a, root)?;
        a.mov(ebx, (code + 0xffe) as u32)?;
        a.call(ebx)?;
        a.rep_eax()?;
        a.mov(
            dword_ptr(pte32(second) as u32),
            (other | P | RW | US) as u32,
        )?;
        a.invlpg(ptr(second as u32))?;
        a.call(ebx)?;
        a.rep_eax()?;
        a.mov(dword_ptr(pte32(second) as u32), 0)?;
        a.invlpg(ptr(second as u32))?;
        a.probe32(|a| a.call(ebx))?;
        a.val(0xd0e)?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x4433_2211),
            Ev::Val(0x7766_5511),
            pf(0, second, KCODE32),
            Ev::Val(0xd0e),
        ]
    );
}
