//! Targeted guests: 32- and 16-bit protected mode.

use super::*;

pub(crate) fn insn(a: &mut Asm, code: iced_x86::Code) -> AsmResult {
    a.add_instruction(iced_x86::Instruction::with(code))
}

/// Protected-mode segmentation: byte-granular limits, expand-down segments, type checks
/// (read-only data, execute-only code, writes to code), null selectors, not-present
/// descriptors, selectors past the GDT limit, SS loads and #SS, and the CS limit.
#[test]
pub(crate) fn protected_mode_segment_limits_and_types() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    let small = FREE; // base DATA, limit 0xfff, byte granular
    let down = FREE + 8; // expand-down, limit 0x1fff, B=1
    let ro = FREE + 0x10; // read-only data
    let xo = FREE + 0x18; // execute-only code
    let absent = FREE + 0x20; // not present
    let stack = FREE + 0x28; // stack, base DATA, limit 0xfff
    let tiny_code = FREE + 0x30; // code at CODE3, limit 0xf
    let absent_stack = FREE + 0x38; // writable data, not present
    let down16 = FREE + 0x40; // expand-down, limit 0xfff, B=0: offsets 0x1000-0xffff
    g.set_desc(small, desc(DATA as u32, 0xfff, 0x92, 0x4));
    g.set_desc(down, desc(0, 0x1fff, 0x96, 0x4));
    g.set_desc(ro, desc(0, 0xfffff, 0x90, 0xc));
    g.set_desc(xo, desc(0, 0xfffff, 0x98, 0xc));
    g.set_desc(absent, desc(0, 0xfffff, 0x12, 0xc));
    g.set_desc(stack, desc(DATA as u32, 0xfff, 0x92, 0x4));
    g.set_desc(tiny_code, desc(CODE3 as u32, 0xf, 0x9a, 0x4));
    g.set_desc(absent_stack, desc(0, 0xfffff, 0x12, 0xc));
    g.set_desc(down16, desc(0, 0xfff, 0x96, 0));
    g.w32(DATA + 0xffc, 0xaabb_ccdd);
    g.w32(DATA + 0x1000, 0x600d);
    g.write(CODE3, &[0x90; 64]);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.val(1)?;
        a.mov(ax, u32::from(small))?;
        a.mov(ds, ax)?;
        a.mov(eax, dword_ptr(0xffcu32))?;
        a.rep_eax()?;
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ds, ax)?;
        // The last dword of a 4 KiB segment is fine; one byte further is not.
        a.probe32(|a| {
            a.mov(ax, u32::from(small))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr(0xffdu32))
        })?;
        // Expand-down: offsets at or below the limit fault, above it they are fine.
        a.probe32(|a| {
            a.mov(ax, u32::from(down))?;
            a.mov(es, ax)?;
            a.mov(eax, dword_ptr(0x1ffcu32).es())
        })?;
        a.mov(ax, u32::from(down))?;
        a.mov(es, ax)?;
        a.mov(eax, dword_ptr((DATA + 0x1000) as u32).es())?;
        a.rep_eax()?;
        // Read-only data: reads work, writes #GP(0).
        a.probe32(|a| {
            a.mov(ax, u32::from(ro))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr((DATA + 0xffc) as u32))?;
            a.rep_eax()?;
            a.mov(dword_ptr(DATA as u32), eax)
        })?;
        // Execute-only code into DS: #GP(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(xo))?;
            a.mov(ds, ax)
        })?;
        // Not present: #NP(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(absent))?;
            a.mov(ds, ax)
        })?;
        // Past the GDT limit: #GP(selector).
        a.probe32(|a| {
            a.mov(ax, 0x400u32)?;
            a.mov(ds, ax)
        })?;
        // SS with RPL != CPL: #GP(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(KDATA | 3))?;
            a.mov(ss, ax)
        })?;
        // A stack reference past SS's limit: #SS(0) (the frame still fits the stack).
        a.probe32(|a| {
            a.mov(ax, u32::from(stack))?;
            a.mov(ss, ax)?;
            a.mov(esp, 0x800u32)?;
            a.mov(ebp, 0x2000u32)?;
            a.mov(eax, dword_ptr(ebp))
        })?;
        // A null DS: loading it is fine, using it is #GP(0).
        a.probe32(|a| {
            a.xor(eax, eax)?;
            a.mov(ds, ax)?;
            a.val(2)?;
            a.mov(eax, dword_ptr(DATA as u32))
        })?;
        // A readable code segment in DS: reads work, writes #GP(0).
        a.probe32(|a| {
            a.mov(ax, u32::from(KCODE32))?;
            a.mov(ds, ax)?;
            a.mov(eax, dword_ptr((DATA + 0xffc) as u32))?;
            a.rep_eax()?;
            a.mov(dword_ptr(DATA as u32), eax)
        })?;
        // A not-present stack segment: #SS(selector).
        a.probe32(|a| {
            a.mov(ax, u32::from(absent_stack))?;
            a.mov(ss, ax)
        })?;
        // A 16-bit expand-down segment ends at 0xffff.
        a.probe32(|a| {
            a.mov(ax, u32::from(down16))?;
            a.mov(es, ax)?;
            a.mov(eax, dword_ptr(0xfffcu32).es())?;
            a.val(4)?;
            a.mov(eax, dword_ptr(0xfffeu32).es())
        })?;
        // Running off the end of a 16-byte code segment: #GP(0) with CS = that segment.
        a.probe32(|a| a.jmp_far(tiny_code, 0))?;
        a.val(3)?;
        a.hlt()
    });
    let out = run(&g);
    let c = KCODE32;
    assert_eq!(
        out.events,
        vec![
            Ev::Val(1),
            Ev::Val(0xaabb_ccdd),
            exc(13, Some(0), c),
            exc(13, Some(0), c),
            Ev::Val(0x600d),
            Ev::Val(0xaabb_ccdd),
            exc(13, Some(0), c),
            exc(13, Some(u32::from(xo)), c),
            exc(11, Some(u32::from(absent)), c),
            exc(13, Some(0x400), c),
            exc(13, Some(u32::from(KDATA)), c),
            exc(12, Some(0), c),
            Ev::Val(2),
            exc(13, Some(0), c),
            Ev::Val(0xaabb_ccdd),
            exc(13, Some(0), c),
            exc(12, Some(u32::from(absent_stack)), c),
            Ev::Val(4),
            exc(13, Some(0), c),
            exc(13, Some(0), tiny_code),
            Ev::Val(3),
        ]
    );
}

/// 16-bit protected mode: a 16-bit code segment called from 32-bit code (2-byte pushes),
/// a 286 interrupt gate (16-bit frame, 16-bit IRET), a 16-bit data segment's limit, and an
/// exception in 16-bit code delivered to a 32-bit handler.
#[test]
pub(crate) fn protected_mode_16bit_code() {
    let g = Guest::new();
    g.boot_pm32();
    g.idt32();
    g.w16(0xfffe, 0xbeef);
    let c16 = g.code(16, CODE2, &|a| {
        a.here("entry")?;
        a.mov(ecx, esp)?;
        a.push(ax)?;
        a.sub(ecx, esp)?;
        a.mov(eax, ecx)?;
        a.rep_eax()?;
        a.pop(ax)?;
        a.int(0x40)?;
        a.here("after_int")?;
        a.mov(ax, u32::from(DATA16))?;
        a.mov(ds, ax)?;
        a.mov(ax, word_ptr(0xfffeu16))?;
        a.out(u32::from(P_VAL), ax)?;
        insn(a, iced_x86::Code::Retfd)?;
        // 16-bit interrupt handler: the frame is IP, CS, FLAGS as words.
        a.here("h16")?;
        a.mov(bp, sp)?;
        a.mov(ax, word_ptr(bp + 2))?;
        a.out(u32::from(P_VAL), ax)?;
        a.mov(ax, word_ptr(bp))?;
        a.out(u32::from(P_VAL), ax)?;
        a.iret()?;
        a.here("fault")?;
        a.mov(ax, u32::from(DATA16))?;
        a.mov(ds, ax)?;
        a.mov(ax, word_ptr(0xffffu16))
    });
    g.set_gate32(0x40, gate(CODE16, c16["h16"] as u32, 0x6, 0, 0));
    let (entry, fault) = (c16["entry"] as u32, c16["fault"] as u32);
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.call_far(CODE16, entry)?;
        a.val(0x32)?;
        a.probe32(|a| a.call_far(CODE16, fault))?;
        a.hlt()
    });
    let out = run(&g);
    let int_ret = c16["after_int"];
    assert_eq!(
        out.events,
        vec![
            Ev::Val(2),
            Ev::Val(u64::from(CODE16)),
            Ev::Val(int_ret),
            Ev::Val(0xbeef),
            Ev::Val(0x32),
            exc(13, Some(0), CODE16),
        ]
    );
}
