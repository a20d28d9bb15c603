//! Targeted guests: real mode and unreal mode.

use super::*;

/// Real-mode setup: flat real segments at 0, the kernel stack.
pub(crate) fn real_init(a: &mut Asm) -> AsmResult {
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, KSTACK as u32)
}

/// Real mode: INT n through the IVT, exceptions through the IVT (no error codes), and the
/// 64 KiB segment limits real mode still checks (#GP for data, #SS for the stack segment).
#[test]
pub(crate) fn real_mode_ivt_and_segment_limits() {
    let g = Guest::new();
    g.ivt();
    // INT 0x21 handler: report the FLAGS image it got and return.
    let h = g.code(16, CODE2, &|a| {
        a.mov(bp, sp)?;
        a.mov(ax, word_ptr(bp + 4))?; // FLAGS
        a.and(ax, 0x0001)?; // CF as set by the caller
        a.or(ax, 0x2100)?;
        a.out(u32::from(P_VAL), ax)?;
        a.iret()
    });
    g.w16(0x21 * 4, h.ip as u16);
    g.w16(0x21 * 4 + 2, 0);
    g.code(16, REAL, &|a| {
        real_init(a)?;
        a.val(0x1111)?;
        a.stc()?;
        a.int(0x21)?;
        a.val(0x2222)?;
        // #DE
        a.probe16(|a| {
            a.xor(dx, dx)?;
            a.mov(ax, 1u32)?;
            a.xor(cx, cx)?;
            a.div(cx)
        })?;
        // A 32-bit address past DS's 64 KiB limit: #GP (vector 13, no error code in real mode).
        a.probe16(|a| {
            a.mov(ebx, 0xfffeu32)?;
            a.mov(eax, dword_ptr(ebx))
        })?;
        // A word at 0xffff straddles the limit.
        a.probe16(|a| a.mov(ax, word_ptr(0xffffu16)))?;
        // Through BP the default segment is SS: #SS.
        a.probe16(|a| {
            a.mov(bp, 0xffffu32)?;
            a.mov(ax, word_ptr(bp))
        })?;
        a.probe16(|a| a.ud2())?;
        a.val(0x3333)?;
        a.hlt()
    });
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            Ev::Val(0x1111),
            Ev::Val(0x2101),
            Ev::Val(0x2222),
            exc(0, None, 0),
            exc(13, None, 0),
            exc(13, None, 0),
            exc(12, None, 0),
            exc(6, None, 0),
            Ev::Val(0x3333),
        ]
    );
}

/// Real -> 16-bit protected mode (load a 4 GiB DS) -> real mode: DS keeps its 4 GiB limit
/// ("unreal mode") even after a real-mode reload of the selector; ES keeps its 64 KiB.
#[test]
pub(crate) fn unreal_mode() {
    let g = Guest::new();
    g.ivt();
    g.code(16, REAL, &|a| {
        real_init(a)?;
        a.probe16(|a| {
            a.mov(ebx, 0x10_0000u32)?;
            a.mov(eax, dword_ptr(ebx))
        })?;
        a.lgdt(ptr(GDTR as u16))?;
        a.mov(eax, cr0)?;
        a.or(al, 1)?;
        a.mov(cr0, eax)?;
        a.jmp_far_to(CODE16, "pm16")?;
        a.here("pm16")?;
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ds, ax)?;
        // Report CS of 16-bit protected mode.
        a.mov(ax, cs)?;
        a.out(u32::from(P_VAL), ax)?;
        a.mov(eax, cr0)?;
        a.and(al, 0xfe)?;
        a.mov(cr0, eax)?;
        a.jmp_far_to(0, "real2")?;
        a.here("real2")?;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(ebx, 0x10_0000u32)?;
        a.mov(dword_ptr(ebx), 0xcafe_babeu32)?;
        a.mov(eax, dword_ptr(ebx + 4))?;
        a.out(u32::from(P_VAL), eax)?;
        a.mov(eax, dword_ptr(ebx))?;
        a.out(u32::from(P_VAL), eax)?;
        a.mov(eax, cr0)?;
        a.and(eax, 1)?;
        a.out(u32::from(P_VAL), eax)?;
        a.probe16(|a| a.mov(eax, dword_ptr(ebx).es()))?;
        a.hlt()
    });
    g.w32(0x10_0004, 0x1234_5678);
    let out = run(&g);
    assert_eq!(
        out.events,
        vec![
            exc(13, None, 0),
            Ev::Val(u64::from(CODE16)),
            Ev::Val(0x1234_5678),
            Ev::Val(0xcafe_babe),
            Ev::Val(0),
            exc(13, None, 0),
        ]
    );
    assert_eq!(g.r32(0x10_0000), 0xcafe_babe);
}
