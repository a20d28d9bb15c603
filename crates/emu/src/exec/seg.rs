//! Segment loading with the protection checks, far jumps and calls (through call gates with
//! stack switches), far returns and IRET.

use palacios_x86::Segment;
use palacios_x86::segment::decode;

use super::mask;
use crate::cpu::{CS, DS, ES, FS, GS, Mode, SS, fl};
use crate::machine::{Fault, Machine, NP, R, SSF, TS, gp};

/// Fault with a selector error code.
fn sel_fault(v: u8, sel: u16) -> Fault {
    Fault::Exc(v, Some(u32::from(sel & 0xfffc)))
}

/// Linear address of the descriptor for `sel` (GDT or LDT), checked against the table limit.
fn desc_addr(m: &Machine, sel: u16, size: u64) -> R<u64> {
    let index = u64::from(sel & 0xfff8);
    let (base, limit) = if sel & 4 != 0 {
        if m.cpu.ldtr.unusable || !m.cpu.ldtr.present {
            return Err(sel_fault(crate::machine::GP, sel));
        }
        (m.cpu.ldtr.base, u64::from(m.cpu.ldtr.limit))
    } else {
        (m.cpu.gdtr.base, u64::from(m.cpu.gdtr.limit))
    };
    if index + size - 1 > limit {
        return Err(sel_fault(crate::machine::GP, sel));
    }
    Ok(base.wrapping_add(index))
}

/// Read the 8-byte descriptor of `sel`.
pub fn read_desc(m: &mut Machine, sel: u16) -> R<(u64, u64)> {
    let a = desc_addr(m, sel, 8)?;
    Ok((a, m.read_sys(a, 8)?))
}

/// Read a 16-byte system descriptor (long mode gates, TSS and LDT descriptors).
pub fn read_desc16(m: &mut Machine, sel: u16) -> R<(u64, u64, u64)> {
    let a = desc_addr(m, sel, 16)?;
    let lo = m.read_sys(a, 8)?;
    let hi = m.read_sys(a + 8, 8)?;
    Ok((a, lo, hi))
}

/// Set the accessed bit of a code/data descriptor.
fn set_accessed(m: &mut Machine, addr: u64, raw: u64) -> R<()> {
    if raw & (1 << 40) == 0 {
        m.write_sys(addr + 5, 1, (raw >> 40) | 1)?;
    }
    Ok(())
}

fn real_seg(old: &Segment, sel: u16) -> Segment {
    Segment {
        selector: sel,
        base: u64::from(sel) << 4,
        ..*old
    }
}

/// Load DS, ES, FS, GS or SS with `sel`.
pub fn load_data_seg(m: &mut Machine, idx: usize, sel: u16) -> R<()> {
    match m.cpu.mode {
        Mode::Real => {
            m.cpu.seg[idx] = real_seg(&m.cpu.seg[idx], sel);
            return Ok(());
        }
        Mode::Virtual8086 => {
            m.cpu.seg[idx] = Segment {
                selector: sel,
                base: u64::from(sel) << 4,
                limit: 0xffff,
                type_: 3,
                present: true,
                s: true,
                dpl: 3,
                ..Default::default()
            };
            return Ok(());
        }
        _ => {}
    }
    let cpl = m.cpu.cpl;
    let rpl = (sel & 3) as u8;
    if sel & 0xfffc == 0 {
        if idx == SS && !(m.cpu.mode == Mode::Long64 && cpl < 3 && rpl == cpl) {
            return Err(gp(0));
        }
        let mut s = Segment {
            selector: sel,
            unusable: true,
            ..Default::default()
        };
        if idx == SS {
            s.dpl = cpl;
            s.db = true;
        }
        // 64-bit mode keeps the FS/GS base when a null selector is loaded.
        if m.cpu.mode == Mode::Long64 {
            s.base = m.cpu.seg[idx].base;
        }
        m.cpu.seg[idx] = s;
        return Ok(());
    }
    let (addr, raw) = read_desc(m, sel)?;
    let d = decode(sel, raw);
    if idx == SS {
        let writable_data = d.s && d.type_ & 0xa == 0x2;
        if rpl != cpl || d.dpl != cpl || !writable_data {
            return Err(sel_fault(crate::machine::GP, sel));
        }
        if !d.present {
            return Err(sel_fault(SSF, sel));
        }
    } else {
        let code = d.type_ & 8 != 0;
        let readable = !code || d.type_ & 2 != 0;
        let conforming_code = code && d.type_ & 4 != 0;
        if !d.s || !readable {
            return Err(sel_fault(crate::machine::GP, sel));
        }
        if !conforming_code && (d.dpl < cpl || d.dpl < rpl) {
            return Err(sel_fault(crate::machine::GP, sel));
        }
        if !d.present {
            return Err(sel_fault(NP, sel));
        }
    }
    set_accessed(m, addr, raw)?;
    let mut d = d;
    d.type_ |= 1;
    m.cpu.seg[idx] = d;
    if idx == SS {
        m.cpu.update_mode();
    }
    Ok(())
}

/// Load CS from a code descriptor (checks done by the caller) with CPL `cpl`.
fn set_cs(m: &mut Machine, sel: u16, mut d: Segment, cpl: u8) {
    d.selector = (sel & 0xfffc) | u16::from(cpl);
    d.type_ |= 1;
    m.cpu.seg[CS] = d;
    // CPL lives in SS.DPL for this emulator's mode cache; keep them consistent.
    m.cpu.seg[SS].dpl = cpl;
    m.cpu.update_mode();
}

fn check_target(m: &Machine, d: &Segment, off: u64) -> R<()> {
    if m.cpu.long_mode() && d.l {
        if !crate::machine::canonical(off) {
            return Err(gp(0));
        }
    } else if off > u64::from(d.limit) {
        return Err(gp(0));
    }
    Ok(())
}

/// Far JMP (`call` = None) or far CALL with operand size `call` = Some(size).
pub fn far_jump(m: &mut Machine, sel: u16, off: u64, call: Option<u64>) -> R<()> {
    if matches!(m.cpu.mode, Mode::Real | Mode::Virtual8086) {
        let size = call.unwrap_or(2);
        if let Some(size) = call {
            let old_cs = u64::from(m.cpu.seg[CS].selector);
            let ret = m.cpu.rip;
            let sp0 = m.cpu.gpr[4];
            m.push(old_cs, size)?;
            if let Err(e) = m.push(ret & mask(size), size) {
                m.cpu.gpr[4] = sp0;
                return Err(e);
            }
        }
        let _ = size;
        m.cpu.seg[CS] = real_seg(&m.cpu.seg[CS], sel);
        m.cpu.rip = off;
        m.cpu.update_mode();
        return Ok(());
    }
    if sel & 0xfffc == 0 {
        return Err(gp(0));
    }
    let cpl = m.cpu.cpl;
    let rpl = (sel & 3) as u8;
    let (addr, raw) = read_desc(m, sel)?;
    let d = decode(sel, raw);
    if d.s {
        if d.type_ & 8 == 0 {
            return Err(sel_fault(crate::machine::GP, sel));
        }
        let conforming = d.type_ & 4 != 0;
        if conforming {
            if d.dpl > cpl {
                return Err(sel_fault(crate::machine::GP, sel));
            }
        } else if rpl > cpl || d.dpl != cpl {
            return Err(sel_fault(crate::machine::GP, sel));
        }
        if !d.present {
            return Err(sel_fault(NP, sel));
        }
        let size = call.unwrap_or(4);
        let off = if m.cpu.long_mode() && d.l {
            off
        } else {
            off & mask(size.max(2))
        };
        check_target(m, &d, off)?;
        if let Some(size) = call {
            let old_cs = u64::from(m.cpu.seg[CS].selector);
            let ret = m.cpu.rip;
            let sp0 = m.cpu.gpr[4];
            m.push(old_cs, size)?;
            if let Err(e) = m.push(ret & mask(size), size) {
                m.cpu.gpr[4] = sp0;
                return Err(e);
            }
        }
        set_accessed(m, addr, raw)?;
        set_cs(m, sel, d, cpl);
        m.cpu.rip = off;
        return Ok(());
    }
    // System descriptor: only call gates are supported.
    let long = m.cpu.long_mode();
    let gate_type = d.type_;
    let is_call_gate = if long {
        gate_type == 0xc
    } else {
        gate_type == 0xc || gate_type == 0x4
    };
    if !is_call_gate {
        if matches!(gate_type, 0x1 | 0x9 | 0x5) {
            return Err(Fault::Fatal(&"hardware task switches are not implemented"));
        }
        return Err(sel_fault(crate::machine::GP, sel));
    }
    if d.dpl < cpl || d.dpl < rpl {
        return Err(sel_fault(crate::machine::GP, sel));
    }
    if !d.present {
        return Err(sel_fault(NP, sel));
    }
    let (target_sel, target_off, params, gate_size) = if long {
        let (_, lo, hi) = read_desc16(m, sel)?;
        let off = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
        (((lo >> 16) & 0xffff) as u16, off, 0u64, 8u64)
    } else {
        let off = (raw & 0xffff) | ((raw >> 32) & 0xffff_0000);
        let size = if gate_type == 0xc { 4 } else { 2 };
        let off = if size == 2 { off & 0xffff } else { off };
        (((raw >> 16) & 0xffff) as u16, off, (raw >> 32) & 0x1f, size)
    };
    if target_sel & 0xfffc == 0 {
        return Err(gp(0));
    }
    let (taddr, traw) = read_desc(m, target_sel)?;
    let t = decode(target_sel, traw);
    if !t.s || t.type_ & 8 == 0 || t.dpl > cpl {
        return Err(sel_fault(crate::machine::GP, target_sel));
    }
    if long && (!t.l || t.db) {
        return Err(sel_fault(crate::machine::GP, target_sel));
    }
    if !t.present {
        return Err(sel_fault(NP, target_sel));
    }
    check_target(m, &t, target_off)?;
    let conforming = t.type_ & 4 != 0;
    let Some(_) = call else {
        // JMP through a call gate: no privilege change allowed.
        if !conforming && t.dpl != cpl {
            return Err(sel_fault(crate::machine::GP, target_sel));
        }
        set_accessed(m, taddr, traw)?;
        set_cs(m, target_sel, t, cpl);
        m.cpu.rip = target_off;
        return Ok(());
    };
    let old_cs = u64::from(m.cpu.seg[CS].selector);
    let ret = m.cpu.rip;
    if !conforming && t.dpl < cpl {
        // Inner privilege: switch to the stack the TSS holds for the new level.
        let new_cpl = t.dpl;
        let (new_ss, new_sp) = tss_stack(m, new_cpl)?;
        let old_ss = u64::from(m.cpu.seg[SS].selector);
        let old_sp = m.cpu.gpr[4];
        // Parameters to copy from the old stack (legacy gates only).
        let mut copied = Vec::new();
        for k in (0..params).rev() {
            copied.push(m.peek(k * gate_size, gate_size)?);
        }
        let saved = (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits);
        let r = (|| -> R<()> {
            if long {
                let mut s = Segment {
                    selector: u16::from(new_cpl),
                    unusable: true,
                    dpl: new_cpl,
                    ..Default::default()
                };
                s.db = true;
                m.cpu.seg[SS] = s;
                m.cpu.gpr[4] = new_sp & !0xf;
                m.cpu.seg[SS].dpl = new_cpl;
                m.cpu.cpl = new_cpl;
                m.cpu.mode = Mode::Long64;
            } else {
                load_stack_for(m, new_ss, new_cpl)?;
                m.cpu.gpr[4] = new_sp;
            }
            m.push(old_ss, gate_size)?;
            m.push(old_sp, gate_size)?;
            for v in copied {
                m.push(v, gate_size)?;
            }
            m.push(old_cs, gate_size)?;
            m.push(ret & mask(gate_size), gate_size)?;
            Ok(())
        })();
        if let Err(e) = r {
            (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits) = saved;
            return Err(e);
        }
        set_accessed(m, taddr, traw)?;
        set_cs(m, target_sel, t, new_cpl);
    } else {
        let sp0 = m.cpu.gpr[4];
        m.push(old_cs, gate_size)?;
        if let Err(e) = m.push(ret & mask(gate_size), gate_size) {
            m.cpu.gpr[4] = sp0;
            return Err(e);
        }
        set_accessed(m, taddr, traw)?;
        set_cs(m, target_sel, t, cpl);
    }
    m.cpu.rip = target_off;
    Ok(())
}

/// SS:ESP (or RSP with a null SS in long mode) for privilege `level` from the current TSS.
pub fn tss_stack(m: &mut Machine, level: u8) -> R<(u16, u64)> {
    let tr = m.cpu.tr;
    let tr_sel = tr.selector;
    if m.cpu.long_mode() {
        let off = 4 + 8 * u64::from(level);
        if off + 7 > u64::from(tr.limit) {
            return Err(sel_fault(TS, tr_sel));
        }
        let rsp = m.read_sys(tr.base + off, 8)?;
        return Ok((u16::from(level), rsp));
    }
    let wide = tr.type_ & 8 != 0;
    let (sp_off, ss_off, sp_size) = if wide {
        (4 + 8 * u64::from(level), 8 + 8 * u64::from(level), 4)
    } else {
        (2 + 4 * u64::from(level), 4 + 4 * u64::from(level), 2)
    };
    if ss_off + 1 > u64::from(tr.limit) {
        return Err(sel_fault(TS, tr_sel));
    }
    let sp = m.read_sys(tr.base + sp_off, sp_size)?;
    let ss = m.read_sys(tr.base + ss_off, 2)? as u16;
    Ok((ss, sp))
}

/// Read an IST stack pointer (1..7) from the 64-bit TSS.
pub fn tss_ist(m: &mut Machine, ist: u8) -> R<u64> {
    let off = 0x24 + 8 * u64::from(ist - 1);
    if off + 7 > u64::from(m.cpu.tr.limit) {
        return Err(sel_fault(TS, m.cpu.tr.selector));
    }
    m.read_sys(m.cpu.tr.base + off, 8)
}

/// Load SS for a privilege change to `cpl` (checks as for a stack switch: #TS on failure).
pub fn load_stack_for(m: &mut Machine, sel: u16, cpl: u8) -> R<()> {
    if sel & 0xfffc == 0 {
        return Err(sel_fault(TS, sel));
    }
    let (addr, raw) = read_desc(m, sel).map_err(|_| sel_fault(TS, sel))?;
    let d = decode(sel, raw);
    if (sel & 3) as u8 != cpl || d.dpl != cpl || !d.s || d.type_ & 0xa != 0x2 {
        return Err(sel_fault(TS, sel));
    }
    if !d.present {
        return Err(sel_fault(SSF, sel));
    }
    set_accessed(m, addr, raw)?;
    let mut d = d;
    d.type_ |= 1;
    m.cpu.seg[SS] = d;
    m.cpu.cpl = cpl;
    Ok(())
}

/// After a return to an outer level: data segments the new level may not use become null.
fn drop_inaccessible(m: &mut Machine) {
    let cpl = m.cpu.cpl;
    for idx in [ES, DS, FS, GS] {
        let s = m.cpu.seg[idx];
        let conforming_code = s.type_ & 0xc == 0xc;
        if !s.unusable && (s.type_ & 8 == 0 || !conforming_code) && s.dpl < cpl {
            m.cpu.seg[idx] = Segment {
                selector: 0,
                unusable: true,
                base: if m.cpu.long_mode() { s.base } else { 0 },
                ..Default::default()
            };
        }
    }
}

/// Check a code selector popped by RETF/IRET; returns the decoded descriptor.
fn return_cs(m: &mut Machine, sel: u16) -> R<(u64, u64, Segment)> {
    if sel & 0xfffc == 0 {
        return Err(gp(0));
    }
    let (addr, raw) = read_desc(m, sel)?;
    let d = decode(sel, raw);
    let rpl = (sel & 3) as u8;
    if !d.s || d.type_ & 8 == 0 || rpl < m.cpu.cpl {
        return Err(sel_fault(crate::machine::GP, sel));
    }
    let conforming = d.type_ & 4 != 0;
    if (conforming && d.dpl > rpl) || (!conforming && d.dpl != rpl) {
        return Err(sel_fault(crate::machine::GP, sel));
    }
    if !d.present {
        return Err(sel_fault(NP, sel));
    }
    Ok((addr, raw, d))
}

/// Far RET with operand size `size`, releasing `imm` extra bytes.
pub fn far_return(m: &mut Machine, size: u64, imm: u64) -> R<()> {
    let ip = m.peek(0, size)? & mask(size);
    let sel = m.peek(size, size)? as u16;
    if matches!(m.cpu.mode, Mode::Real | Mode::Virtual8086) {
        m.cpu.seg[CS] = real_seg(&m.cpu.seg[CS], sel);
        m.cpu.rip = ip;
        let sp = m.cpu.gpr[4].wrapping_add(2 * size + imm);
        m.set_sp(sp);
        m.cpu.update_mode();
        return Ok(());
    }
    let (addr, raw, d) = return_cs(m, sel)?;
    let rpl = (sel & 3) as u8;
    check_target(m, &d, ip)?;
    if rpl == m.cpu.cpl {
        set_accessed(m, addr, raw)?;
        let sp = m.cpu.gpr[4].wrapping_add(2 * size + imm);
        m.set_sp(sp);
        set_cs(m, sel, d, rpl);
        m.cpu.rip = ip;
        return Ok(());
    }
    // Return to an outer level: SS:SP follow the parameters.
    let new_sp = m.peek(2 * size + imm, size)?;
    let new_ss = m.peek(3 * size + imm, size)? as u16;
    let saved = (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits);
    let r = (|| -> R<()> {
        if m.cpu.long_mode() && new_ss & 0xfffc == 0 && d.l && rpl < 3 {
            m.cpu.seg[SS] = Segment {
                selector: new_ss,
                unusable: true,
                dpl: rpl,
                db: true,
                ..Default::default()
            };
            m.cpu.cpl = rpl;
        } else {
            m.cpu.cpl = rpl;
            load_data_seg(m, SS, new_ss)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits) = saved;
        return Err(e);
    }
    set_accessed(m, addr, raw)?;
    set_cs(m, sel, d, rpl);
    m.cpu.gpr[4] = if m.cpu.seg[SS].db || m.cpu.mode == Mode::Long64 {
        new_sp.wrapping_add(imm)
    } else {
        (m.cpu.gpr[4] & !0xffff) | (new_sp.wrapping_add(imm) & 0xffff)
    };
    m.cpu.rip = ip;
    drop_inaccessible(m);
    Ok(())
}

/// New RFLAGS after POPF/IRET: which bits the current privilege may change.
pub fn merge_flags(m: &Machine, old: u64, new: u64, size: u64, iret: bool) -> u64 {
    let cpl = m.cpu.cpl;
    let iopl = ((old & fl::IOPL) >> 12) as u8;
    let mut changeable = fl::ARITH | fl::TF | fl::DF | fl::NT | fl::AC | fl::ID;
    if m.cpu.mode == Mode::Real || cpl == 0 {
        changeable |= fl::IOPL | fl::IF;
    } else if cpl <= iopl {
        changeable |= fl::IF;
    }
    if iret {
        changeable |= fl::RF;
        if cpl == 0 {
            changeable |= fl::VIF | fl::VIP;
        }
    }
    let changeable = changeable & mask(size);
    ((old & !changeable) | (new & changeable)) | 2
}

/// IRET with operand size `size`.
pub fn iret(m: &mut Machine, size: u64) -> R<()> {
    let old_flags = m.cpu.flags;
    if matches!(m.cpu.mode, Mode::Real) {
        let ip = m.peek(0, size)? & mask(size);
        let sel = m.peek(size, size)? as u16;
        let f = m.peek(2 * size, size)?;
        if ip > u64::from(m.cpu.seg[CS].limit) {
            return Err(gp(0));
        }
        m.cpu.seg[CS] = real_seg(&m.cpu.seg[CS], sel);
        m.cpu.rip = ip;
        m.cpu.flags = merge_flags(m, old_flags, f, size, true) & !fl::VM;
        let sp = m.cpu.gpr[4].wrapping_add(3 * size);
        m.set_sp(sp);
        m.cpu.nmi_blocked = false;
        m.cpu.update_mode();
        return Ok(());
    }
    if m.cpu.mode == Mode::Virtual8086 {
        return Err(Fault::Fatal(&"virtual-8086 mode is not implemented"));
    }
    if old_flags & fl::NT != 0 {
        if m.cpu.long_mode() {
            return Err(gp(0));
        }
        return Err(Fault::Fatal(
            &"hardware task switches (IRET with NT) are not implemented",
        ));
    }
    let ip = m.peek(0, size)? & mask(size);
    let sel = m.peek(size, size)? as u16;
    let f = m.peek(2 * size, size)?;
    if f & fl::VM != 0 && m.cpu.cpl == 0 && !m.cpu.long_mode() {
        return Err(Fault::Fatal(&"virtual-8086 mode is not implemented"));
    }
    let (addr, raw, d) = return_cs(m, sel)?;
    let rpl = (sel & 3) as u8;
    check_target(m, &d, ip)?;
    let pops_stack = m.cpu.mode == Mode::Long64 || rpl > m.cpu.cpl;
    let new_flags = merge_flags(m, old_flags, f, size, true);
    if !pops_stack {
        set_accessed(m, addr, raw)?;
        let sp = m.cpu.gpr[4].wrapping_add(3 * size);
        m.set_sp(sp);
        set_cs(m, sel, d, rpl);
        m.cpu.rip = ip;
        m.cpu.flags = new_flags;
        m.cpu.nmi_blocked = false;
        m.cpu.update_mode();
        return Ok(());
    }
    let new_sp = m.peek(3 * size, size)?;
    let new_ss = m.peek(4 * size, size)? as u16;
    let saved = (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits);
    let r = (|| -> R<()> {
        m.cpu.cpl = rpl;
        if m.cpu.long_mode() && new_ss & 0xfffc == 0 && rpl < 3 && d.l {
            m.cpu.seg[SS] = Segment {
                selector: new_ss,
                unusable: true,
                dpl: rpl,
                db: true,
                ..Default::default()
            };
        } else {
            // With CPL already the target level, the usual SS checks apply.
            m.cpu.mode = if m.cpu.long_mode() {
                Mode::Compat
            } else {
                Mode::Protected
            };
            load_data_seg(m, SS, new_ss)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits) = saved;
        return Err(e);
    }
    let changed_level = rpl > saved.2;
    set_accessed(m, addr, raw)?;
    set_cs(m, sel, d, rpl);
    m.cpu.flags = new_flags;
    m.cpu.rip = ip;
    m.cpu.gpr[4] = if m.cpu.mode == Mode::Long64 || size == 8 {
        new_sp
    } else if m.cpu.seg[SS].db {
        new_sp & 0xffff_ffff
    } else {
        (m.cpu.gpr[4] & !0xffff) | (new_sp & 0xffff)
    };
    m.cpu.nmi_blocked = false;
    if changed_level {
        drop_inaccessible(m);
    }
    m.cpu.update_mode();
    Ok(())
}
