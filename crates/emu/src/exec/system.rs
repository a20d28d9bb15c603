//! System instructions: control and debug registers, descriptor tables, MSRs, port I/O,
//! interrupt flag, fast system calls, CPUID and the TSC.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use palacios_vmm::backend::{Exit, IoData};
use palacios_vmm::intercept::SyscallAbi;
use palacios_x86::segment::decode;
use palacios_x86::{Segment, cr0, cr4, efer, msr};

use super::seg::{load_data_seg, merge_flags, read_desc, read_desc16};
use super::{Handler, mask};
use crate::block::Insn;
use crate::cpu::{CS, DS, ES, FS, GS, Mode, SS, fl};
use crate::machine::{Fault, Machine, R, canonical, gp, ud};
use crate::paging::PHYS_BITS;

fn need_cpl0(m: &Machine) -> R<()> {
    if m.cpu.cpl != 0 { Err(gp(0)) } else { Ok(()) }
}

fn protected(m: &Machine) -> bool {
    !matches!(m.cpu.mode, Mode::Real | Mode::Virtual8086)
}

// ---- port I/O ----------------------------------------------------------------------------

/// I/O permission: CPL <= IOPL, or the TSS I/O bitmap allows every byte of the access.
pub fn check_io(m: &mut Machine, port: u16, size: u64) -> R<()> {
    let iopl = ((m.cpu.flags & fl::IOPL) >> 12) as u8;
    if m.cpu.mode == Mode::Real || (m.cpu.mode != Mode::Virtual8086 && m.cpu.cpl <= iopl) {
        return Ok(());
    }
    let tr = m.cpu.tr;
    // Only a 32-bit (or 64-bit) TSS has a bitmap.
    if tr.type_ & 8 == 0 || tr.limit < 0x67 {
        return Err(gp(0));
    }
    let base = m.read_sys(tr.base + 0x66, 2)?;
    let byte = base + u64::from(port / 8);
    if byte + 1 > u64::from(tr.limit) {
        return Err(gp(0));
    }
    let bits = m.read_sys(tr.base + byte, 2)?;
    let want = ((1u64 << size) - 1) << (port % 8);
    if bits & want != 0 { Err(gp(0)) } else { Ok(()) }
}

fn in_(m: &mut Machine, x: &Insn) -> R<()> {
    let r = x.i.op0_register();
    let size = r.size() as u64;
    let port = if x.i.op1_kind() == OpKind::Register {
        (m.cpu.gpr[2] & 0xffff) as u16
    } else {
        u16::from(x.i.immediate8())
    };
    check_io(m, port, size)?;
    if m.dbg.armed {
        m.dbg.io(port, size);
    }
    match m.io_answer.take() {
        Some(d) => {
            let mut b = [0u8; 8];
            b[..d.as_slice().len()].copy_from_slice(d.as_slice());
            m.set_reg(r, u64::from_le_bytes(b) & mask(size));
            Ok(())
        }
        None => Err(Fault::exit(Exit::IoIn {
            port,
            size: size as u8,
        })),
    }
}

fn out(m: &mut Machine, x: &Insn) -> R<()> {
    let r = x.i.op1_register();
    let size = r.size() as u64;
    let port = if x.i.op0_kind() == OpKind::Register {
        (m.cpu.gpr[2] & 0xffff) as u16
    } else {
        u16::from(x.i.immediate8())
    };
    check_io(m, port, size)?;
    if m.dbg.armed {
        m.dbg.io(port, size);
    }
    let v = m.reg(r);
    m.exit_after(Exit::IoOut {
        port,
        data: IoData::new(&v.to_le_bytes()[..size as usize]),
    });
    Ok(())
}

// ---- flags -------------------------------------------------------------------------------

fn cli(m: &mut Machine, _: &Insn) -> R<()> {
    let iopl = ((m.cpu.flags & fl::IOPL) >> 12) as u8;
    if protected(m) && m.cpu.cpl > iopl || m.cpu.mode == Mode::Virtual8086 && iopl < 3 {
        return Err(gp(0));
    }
    m.cpu.flags &= !fl::IF;
    Ok(())
}

fn sti(m: &mut Machine, _: &Insn) -> R<()> {
    let iopl = ((m.cpu.flags & fl::IOPL) >> 12) as u8;
    if protected(m) && m.cpu.cpl > iopl || m.cpu.mode == Mode::Virtual8086 && iopl < 3 {
        return Err(gp(0));
    }
    if m.cpu.flags & fl::IF == 0 {
        m.cpu.shadow = true;
    }
    m.cpu.flags |= fl::IF;
    Ok(())
}

fn pushf(m: &mut Machine, x: &Insn) -> R<()> {
    let size = (-x.i.stack_pointer_increment()) as u64;
    let v = m.cpu.flags & !(fl::VM | fl::RF);
    m.push(v & mask(size), size)
}

fn popf(m: &mut Machine, x: &Insn) -> R<()> {
    let size = x.i.stack_pointer_increment() as u64;
    let v = m.peek(0, size)?;
    let new = merge_flags(m, m.cpu.flags, v, size, false);
    let sp = m.cpu.gpr[4].wrapping_add(size);
    m.set_sp(sp);
    m.cpu.flags = new;
    Ok(())
}

// ---- control and debug registers ----------------------------------------------------------

/// CR4 bits this CPU accepts.
const CR4_OK: u64 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | cr4::PSE
    | cr4::PAE
    | 0x40
    | cr4::PGE
    | 0x100
    | cr4::OSFXSR
    | cr4::OSXMMEXCPT;

pub fn write_cr0(m: &mut Machine, v: u64) -> R<()> {
    let v = v | cr0::ET;
    if v >> 32 != 0
        || (v & cr0::PG != 0 && v & cr0::PE == 0)
        || (v & cr0::NW != 0 && v & cr0::CD == 0)
    {
        return Err(gp(0));
    }
    let old = m.cpu.cr0;
    if v & cr0::PG != 0 && old & cr0::PG == 0 && m.cpu.efer & efer::LME == 0 {
        check_pdptes(m, m.cpu.cr3, m.cpu.cr4)?;
    }
    if v & cr0::PG != 0 && old & cr0::PG == 0 && m.cpu.efer & efer::LME != 0 {
        if m.cpu.cr4 & cr4::PAE == 0 || m.cpu.seg[CS].l {
            return Err(gp(0));
        }
        m.cpu.efer |= efer::LMA;
    }
    if v & cr0::PG == 0 && old & cr0::PG != 0 && m.cpu.efer & efer::LMA != 0 {
        if m.cpu.mode == Mode::Long64 {
            return Err(gp(0));
        }
        m.cpu.efer &= !efer::LMA;
    }
    m.cpu.cr0 = v;
    if (old ^ v) & (cr0::PG | cr0::WP | cr0::PE) != 0 {
        m.tlb.flush_all();
    }
    m.cpu.update_mode();
    Ok(())
}

/// PAE paging (outside IA-32e mode) loads the four PDPTEs on MOV to CR0, CR3 and CR4: one that
/// is present with a reserved bit set makes the MOV #GP(0).
fn check_pdptes(m: &Machine, cr3: u64, cr4: u64) -> R<()> {
    if cr4 & cr4::PAE == 0 || m.cpu.long_mode() {
        return Ok(());
    }
    for i in 0..4 {
        let e = m.phys.read_u64((cr3 & 0xffff_ffe0) + i * 8).unwrap_or(0);
        if e & 1 != 0 && (e & 0x1e6 != 0 || e >> PHYS_BITS != 0) {
            return Err(gp(0));
        }
    }
    Ok(())
}

fn write_cr3(m: &mut Machine, v: u64) -> R<()> {
    if m.cpu.long_mode() && v >> PHYS_BITS != 0 {
        return Err(gp(0));
    }
    if m.cpu.cr0 & cr0::PG != 0 {
        check_pdptes(m, v & 0xffff_ffff, m.cpu.cr4)?;
    }
    m.cpu.cr3 = if m.cpu.long_mode() {
        v
    } else {
        v & 0xffff_ffff
    };
    m.tlb.flush_nonglobal();
    Ok(())
}

fn write_cr4(m: &mut Machine, v: u64) -> R<()> {
    if v & !CR4_OK != 0 || (m.cpu.long_mode() && v & cr4::PAE == 0) {
        return Err(gp(0));
    }
    let old = m.cpu.cr4;
    if m.cpu.cr0 & cr0::PG != 0 && (old ^ v) & (cr4::PSE | cr4::PAE | cr4::PGE) != 0 {
        check_pdptes(m, m.cpu.cr3, v)?;
    }
    m.cpu.cr4 = v;
    if (old ^ v) & (cr4::PSE | cr4::PAE | cr4::PGE) != 0 {
        m.tlb.flush_all();
    }
    if (old ^ v) & 8 != 0 {
        m.debug_changed(); // CR4.DE: I/O breakpoints
    }
    Ok(())
}

fn mov_cr(m: &mut Machine, x: &Insn) -> R<()> {
    need_cpl0(m)?;
    let size = if m.cpu.mode == Mode::Long64 { 8 } else { 4 };
    if x.i.op0_register().is_cr() {
        let n = x.i.op0_register() as usize - Register::CR0 as usize;
        let v = m.reg(x.i.op1_register()) & mask(size);
        match n {
            0 => write_cr0(m, v)?,
            2 => m.cpu.cr2 = v,
            3 => write_cr3(m, v)?,
            4 => write_cr4(m, v)?,
            8 => {
                if v >> 4 != 0 {
                    return Err(gp(0));
                }
                m.cpu.cr8 = v;
            }
            _ => return Err(ud()),
        }
    } else {
        let n = x.i.op1_register() as usize - Register::CR0 as usize;
        let v = match n {
            0 => m.cpu.cr0,
            2 => m.cpu.cr2,
            3 => m.cpu.cr3,
            4 => m.cpu.cr4,
            8 => m.cpu.cr8,
            _ => return Err(ud()),
        };
        let r = x.i.op0_register();
        m.set_reg(r, v & mask(size));
    }
    Ok(())
}

fn mov_dr(m: &mut Machine, x: &Insn) -> R<()> {
    need_cpl0(m)?;
    let size = if m.cpu.mode == Mode::Long64 { 8 } else { 4 };
    let de = m.cpu.cr4 & 8 != 0;
    let map = |n: usize| -> R<usize> {
        match n {
            4 | 5 if de => Err(ud()),
            4 | 5 => Ok(n + 2),
            n if n < 8 => Ok(n),
            _ => Err(ud()),
        }
    };
    // General detect: any debug-register access is a #DB fault with DR6.BD, and the
    // handler is entered with GD clear (so that it can use the registers).
    if m.cpu.dr[7] & crate::debug::DR7_GD != 0 {
        m.cpu.dr[6] |= crate::debug::DR6_BD;
        return Err(Fault::Exc(crate::machine::DB, None));
    }
    if x.i.op0_register().is_dr() {
        let n = map(x.i.op0_register() as usize - Register::DR0 as usize)?;
        let v = m.reg(x.i.op1_register()) & mask(size);
        if n >= 6 && v >> 32 != 0 {
            return Err(gp(0));
        }
        m.cpu.dr[n] = match n {
            6 => v | 0xffff_0ff0,
            7 => (v | 0x400) & !0xd000,
            _ => v,
        };
        if n != 6 {
            m.debug_changed();
        }
    } else {
        let n = map(x.i.op1_register() as usize - Register::DR0 as usize)?;
        let v = m.cpu.dr[n];
        m.set_reg(x.i.op0_register(), v & mask(size));
    }
    Ok(())
}

fn lmsw(m: &mut Machine, x: &Insn) -> R<()> {
    need_cpl0(m)?;
    let v = m.rd(x, 0, 2)? & 0xf;
    // LMSW can set PE but never clear it.
    let new = (m.cpu.cr0 & !0xe) | v | (m.cpu.cr0 & cr0::PE);
    write_cr0(m, new)
}

fn smsw(m: &mut Machine, x: &Insn) -> R<()> {
    let size = if x.i.op0_kind() == OpKind::Register {
        x.i.op0_register().size() as u64
    } else {
        2
    };
    let v = m.cpu.cr0 & mask(size);
    m.wr(x, 0, size, v)
}

fn clts(m: &mut Machine, _: &Insn) -> R<()> {
    need_cpl0(m)?;
    m.cpu.cr0 &= !cr0::TS;
    Ok(())
}

fn invlpg(m: &mut Machine, x: &Insn) -> R<()> {
    need_cpl0(m)?;
    let off = m.ea(x);
    let s = &m.cpu.seg[m.mseg(x)];
    let lin = if m.cpu.mode == Mode::Long64 {
        if m.mseg(x) >= FS {
            s.base.wrapping_add(off)
        } else {
            off
        }
    } else {
        s.base.wrapping_add(off) & 0xffff_ffff
    };
    m.tlb.flush_page(lin);
    Ok(())
}

// ---- descriptor tables --------------------------------------------------------------------

fn lgdt_lidt<const IDT: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    need_cpl0(m)?;
    let seg = m.mseg(x);
    let off = m.ea(x);
    let limit = m.read(seg, off, 2)? as u16;
    let wide = m.cpu.mode == Mode::Long64;
    let mut base = m.read(seg, off.wrapping_add(2) & x.amask, if wide { 8 } else { 4 })?;
    if !wide && x.osz == 2 {
        base &= 0x00ff_ffff;
    }
    if wide && !canonical(base) {
        return Err(gp(0));
    }
    let t = palacios_x86::DescriptorTable { base, limit };
    if IDT {
        m.cpu.idtr = t;
    } else {
        m.cpu.gdtr = t;
    }
    Ok(())
}

fn sgdt_sidt<const IDT: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    let t = if IDT { m.cpu.idtr } else { m.cpu.gdtr };
    let seg = m.mseg(x);
    let off = m.ea(x);
    let wide = m.cpu.mode == Mode::Long64;
    let n = if wide { 8 } else { 4 };
    m.probe_write(seg, off, 2 + n)?;
    m.write(seg, off, 2, u64::from(t.limit))?;
    m.write(seg, off.wrapping_add(2) & x.amask, n, t.base & mask(n))
}

fn lldt(m: &mut Machine, x: &Insn) -> R<()> {
    if !protected(m) {
        return Err(ud());
    }
    need_cpl0(m)?;
    let sel = m.rd(x, 0, 2)? as u16;
    if sel & 0xfffc == 0 {
        m.cpu.ldtr = Segment {
            selector: sel,
            unusable: true,
            ..Default::default()
        };
        return Ok(());
    }
    if sel & 4 != 0 {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    let (d, base_hi) = if m.cpu.long_mode() {
        let (_, lo, hi) = read_desc16(m, sel)?;
        (decode(sel, lo), (hi & 0xffff_ffff) << 32)
    } else {
        (decode(sel, read_desc(m, sel)?.1), 0)
    };
    if d.s || d.type_ != 2 {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    if !d.present {
        return Err(Fault::Exc(
            crate::machine::NP,
            Some(u32::from(sel & 0xfffc)),
        ));
    }
    // A 64-bit descriptor's base must be canonical (SDM Vol. 2 LLDT, IA-32e mode).
    if m.cpu.long_mode() && !canonical(d.base | base_hi) {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    m.cpu.ldtr = Segment {
        base: d.base | base_hi,
        ..d
    };
    Ok(())
}

fn ltr(m: &mut Machine, x: &Insn) -> R<()> {
    if !protected(m) {
        return Err(ud());
    }
    need_cpl0(m)?;
    let sel = m.rd(x, 0, 2)? as u16;
    if sel & 0xfffc == 0 || sel & 4 != 0 {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    let (addr, lo, hi) = if m.cpu.long_mode() {
        read_desc16(m, sel)?
    } else {
        let (a, lo) = read_desc(m, sel)?;
        (a, lo, 0)
    };
    let d = decode(sel, lo);
    let available = if m.cpu.long_mode() {
        d.type_ == 9
    } else {
        d.type_ == 1 || d.type_ == 9
    };
    if d.s || !available {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    if !d.present {
        return Err(Fault::Exc(
            crate::machine::NP,
            Some(u32::from(sel & 0xfffc)),
        ));
    }
    // A 64-bit TSS descriptor's base must be canonical (SDM Vol. 2 LTR, IA-32e mode).
    if m.cpu.long_mode() && !canonical(d.base | ((hi & 0xffff_ffff) << 32)) {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    // Mark it busy in the GDT.
    m.write_sys(addr + 5, 1, (lo >> 40) | 2)?;
    m.cpu.tr = Segment {
        base: d.base | ((hi & 0xffff_ffff) << 32),
        type_: d.type_ | 2,
        ..d
    };
    Ok(())
}

fn sldt_str<const TR: bool>(m: &mut Machine, x: &Insn) -> R<()> {
    if !protected(m) {
        return Err(ud());
    }
    let sel = u64::from(if TR {
        m.cpu.tr.selector
    } else {
        m.cpu.ldtr.selector
    });
    if x.i.op0_kind() == OpKind::Register {
        let r = x.i.op0_register();
        m.set_reg(r, sel);
        Ok(())
    } else {
        m.wr(x, 0, 2, sel)
    }
}

fn arpl(m: &mut Machine, x: &Insn) -> R<()> {
    if !protected(m) {
        return Err(ud());
    }
    let d = m.rd(x, 0, 2)?;
    let s = m.reg(x.i.op1_register());
    if d & 3 < s & 3 {
        m.wr(x, 0, 2, (d & !3) | (s & 3))?;
        m.cpu.flags |= fl::ZF;
    } else {
        m.cpu.flags &= !fl::ZF;
    }
    Ok(())
}

/// LAR (0), LSL (1), VERR (2), VERW (3).
fn desc_query<const OP: u8>(m: &mut Machine, x: &Insn) -> R<()> {
    if !protected(m) {
        return Err(ud());
    }
    let n = if OP < 2 { 1 } else { 0 };
    let sel = m.rd(x, n, 2)? as u16;
    let ok_desc = if sel & 0xfffc == 0 {
        None
    } else {
        read_desc(m, sel).ok()
    };
    let mut ok = false;
    let mut value = 0;
    if let Some((_, raw)) = ok_desc {
        let d = decode(sel, raw);
        let rpl = (sel & 3) as u8;
        let conforming = d.s && d.type_ & 0xc == 0xc;
        let visible = conforming || (d.dpl >= m.cpu.cpl && d.dpl >= rpl);
        let long = m.cpu.long_mode();
        ok = visible
            && match OP {
                0 | 1 => {
                    d.s || match d.type_ {
                        1 | 3 | 9 | 0xb | 2 => true,
                        4 | 5 | 0xc => OP == 0 && !(long && d.type_ != 0xc),
                        _ => false,
                    } && !(long && matches!(d.type_, 1 | 3))
                }
                2 => d.s && (d.type_ & 8 == 0 || d.type_ & 2 != 0),
                _ => d.s && d.type_ & 8 == 0 && d.type_ & 2 != 0,
            };
        if OP == 2 || OP == 3 {
            ok = ok && (d.s && (conforming && OP == 2 || (d.dpl >= m.cpu.cpl && d.dpl >= rpl)));
        }
        value = if OP == 0 {
            raw >> 32 & 0x00f0_ff00
        } else {
            u64::from(d.limit)
        };
    }
    if ok {
        m.cpu.flags |= fl::ZF;
        if OP < 2 {
            let r = x.i.op0_register();
            m.set_reg(r, value);
        }
    } else {
        m.cpu.flags &= !fl::ZF;
    }
    Ok(())
}

/// LDS/LES/LFS/LGS/LSS: a far pointer from memory.
fn load_far<const SEG: usize>(m: &mut Machine, x: &Insn) -> R<()> {
    let r = x.i.op0_register();
    let size = r.size() as u64;
    let seg = m.mseg(x);
    let off = m.ea(x);
    let v = m.read(seg, off, size)?;
    let sel = m.read(seg, off.wrapping_add(size) & x.amask, 2)? as u16;
    load_data_seg(m, SEG, sel)?;
    m.set_reg(r, v);
    Ok(())
}

// ---- MSRs, CPUID, TSC ---------------------------------------------------------------------

fn trapped(m: &Machine, index: u32) -> bool {
    m.trapped_msrs
        .iter()
        .any(|&(a, b)| index >= a && index <= b)
}

/// The TSC: from the host clock, or from the instruction count in deterministic mode.
pub fn tsc(m: &Machine) -> u64 {
    clock_ticks(m).wrapping_add(m.cpu.tsc_offset)
}

fn clock_ticks(m: &Machine) -> u64 {
    if m.deterministic {
        let hz = palacios_vmm::time::DEFAULT_TSC_HZ as u128;
        (u128::from(m.virtual_ns()) * hz / 1_000_000_000) as u64
    } else {
        (m.clock)()
    }
}

/// Read an MSR the core keeps itself.
pub fn read_msr(m: &Machine, index: u32) -> Option<u64> {
    let f = &m.cpu.msr;
    Some(match index {
        msr::IA32_EFER => m.cpu.efer,
        msr::IA32_STAR => f.star,
        msr::IA32_LSTAR => f.lstar,
        msr::IA32_CSTAR => f.cstar,
        msr::IA32_FMASK => f.fmask,
        msr::IA32_FS_BASE => m.cpu.seg[FS].base,
        msr::IA32_GS_BASE => m.cpu.seg[GS].base,
        msr::IA32_KERNEL_GS_BASE => f.kernel_gs_base,
        msr::IA32_SYSENTER_CS => f.sysenter_cs,
        msr::IA32_SYSENTER_ESP => f.sysenter_esp,
        msr::IA32_SYSENTER_EIP => f.sysenter_eip,
        msr::IA32_TSC => tsc(m),
        msr::IA32_PAT => f.pat,
        msr::IA32_MISC_ENABLE => f.misc_enable | 1,
        msr::IA32_APIC_BASE => m.cpu.apic_base,
        0xc000_0103 => f.tsc_aux,
        // IA32_BIOS_SIGN_ID: the microcode revision (1) in the high half.
        0x8b => 1 << 32,
        // MTRRcap: 8 variable ranges, fixed ranges, write-combining.
        0xfe => 0x508,
        0x2ff => f.mtrr_def_type,
        0x200..=0x20f => f.mtrr_var[(index - 0x200) as usize],
        0x250 | 0x258 | 0x259 | 0x268..=0x26f => f.mtrr_fixed[fixed_mtrr(index)],
        // Machine check (SDM Vol. 3 16.3): MCG_CAP, MCG_STATUS, MCG_CTL and the banks.
        0x179 => crate::cpu::MCG_CAP,
        0x17a => f.mcg_status,
        0x17b => f.mcg_ctl,
        i if mc_bank(i).is_some() => {
            let (b, k) = mc_bank(i)?;
            f.mc[b][k]
        }
        _ => return None,
    })
}

/// MAXPHYADDR as CPUID.80000008H:EAX[7:0] reports it (36 when the leaf is absent).
fn phys_bits(m: &Machine) -> u32 {
    match m.model.cpuid(0x8000_0008, 0, m.vcpu, 1)[0] & 0xff {
        0 => 36,
        b => b.min(52),
    }
}

/// (bank, register) of a machine-check bank MSR (CTL, STATUS, ADDR, MISC).
fn mc_bank(index: u32) -> Option<(usize, usize)> {
    let o = index.checked_sub(0x400)? as usize;
    (o < 4 * crate::cpu::MC_BANKS).then_some((o / 4, o % 4))
}

fn fixed_mtrr(index: u32) -> usize {
    match index {
        0x250 => 0,
        0x258 => 1,
        0x259 => 2,
        i => (i - 0x268 + 3) as usize,
    }
}

/// Write an MSR the core keeps itself; false raises #GP.
pub fn write_msr(m: &mut Machine, index: u32, v: u64) -> bool {
    let long = m.cpu.long_mode();
    match index {
        msr::IA32_EFER => {
            let allowed = efer::SCE | efer::LME | efer::NXE | efer::LMA;
            if v & !allowed != 0 {
                return false;
            }
            if m.cpu.cr0 & cr0::PG != 0 && (v ^ m.cpu.efer) & efer::LME != 0 {
                return false;
            }
            let lma = m.cpu.efer & efer::LMA;
            if (m.cpu.efer ^ v) & efer::NXE != 0 {
                m.tlb.flush_all();
            }
            m.cpu.efer = (v & !efer::LMA) | lma;
            m.cpu.update_mode();
        }
        msr::IA32_STAR => m.cpu.msr.star = v,
        msr::IA32_LSTAR
        | msr::IA32_CSTAR
        | msr::IA32_KERNEL_GS_BASE
        | msr::IA32_FS_BASE
        | msr::IA32_GS_BASE
            if !canonical(v) =>
        {
            return false;
        }
        msr::IA32_LSTAR => m.cpu.msr.lstar = v,
        msr::IA32_CSTAR => m.cpu.msr.cstar = v,
        msr::IA32_FMASK => m.cpu.msr.fmask = v & 0xffff_ffff,
        msr::IA32_FS_BASE => m.cpu.seg[FS].base = v,
        msr::IA32_GS_BASE => m.cpu.seg[GS].base = v,
        msr::IA32_KERNEL_GS_BASE => m.cpu.msr.kernel_gs_base = v,
        msr::IA32_SYSENTER_CS => m.cpu.msr.sysenter_cs = v & 0xffff,
        msr::IA32_SYSENTER_ESP => m.cpu.msr.sysenter_esp = v,
        msr::IA32_SYSENTER_EIP => m.cpu.msr.sysenter_eip = v,
        msr::IA32_TSC => m.cpu.tsc_offset = v.wrapping_sub(clock_ticks(m)),
        msr::IA32_PAT => {
            // Each entry must be a valid memory type (0, 1, 4, 5, 6, 7).
            if (0..8).any(|k| matches!((v >> (8 * k)) & 0xff, 2 | 3 | 8..)) {
                return false;
            }
            m.cpu.msr.pat = v;
        }
        msr::IA32_MISC_ENABLE => m.cpu.msr.misc_enable = v,
        // Reserved: bits 0-7 and 9, and the address bits above MAXPHYADDR (SDM Vol. 3 11.4.4).
        msr::IA32_APIC_BASE if v & (0x2ff | !((1u64 << phys_bits(m)) - 1)) != 0 => {
            return false;
        }
        msr::IA32_APIC_BASE => m.cpu.apic_base = v,
        0xc000_0103 => m.cpu.msr.tsc_aux = v & 0xffff_ffff,
        // Writing IA32_BIOS_SIGN_ID (zero, before CPUID) is how software asks for the
        // revision; there is nothing to update.
        0x8b => {}
        0x2ff => m.cpu.msr.mtrr_def_type = v,
        0x200..=0x20f => m.cpu.msr.mtrr_var[(index - 0x200) as usize] = v,
        0x250 | 0x258 | 0x259 | 0x268..=0x26f => m.cpu.msr.mtrr_fixed[fixed_mtrr(index)] = v,
        // MCG_CAP is read-only; MCG_STATUS holds RIPV, EIPV and MCIP; MCG_CTL is all zeros or
        // all ones; a bank's CTL takes any value, and its STATUS, ADDR and MISC only zero
        // (no error is ever logged here).
        0x17a if v & !7 == 0 => m.cpu.msr.mcg_status = v,
        0x17b if v == 0 || v == u64::MAX => m.cpu.msr.mcg_ctl = v,
        i if mc_bank(i).is_some_and(|(_, k)| k == 0 || v == 0) => {
            if let Some((b, k)) = mc_bank(i) {
                m.cpu.msr.mc[b][k] = v;
            }
        }
        _ => return false,
    }
    let _ = long;
    true
}

fn rdmsr(m: &mut Machine, _: &Insn) -> R<()> {
    need_cpl0(m)?;
    let index = m.cpu.gpr[1] as u32;
    let v = if trapped(m, index) {
        match m.msr_answer.take() {
            Some(Some(v)) => v,
            Some(None) => return Err(gp(0)),
            None => return Err(Fault::exit(Exit::MsrRead { index })),
        }
    } else {
        read_msr(m, index).ok_or(gp(0))?
    };
    m.set_gpr(0, 4, v & 0xffff_ffff);
    m.set_gpr(2, 4, v >> 32);
    Ok(())
}

fn wrmsr(m: &mut Machine, _: &Insn) -> R<()> {
    need_cpl0(m)?;
    let index = m.cpu.gpr[1] as u32;
    let v = (m.cpu.gpr[0] & 0xffff_ffff) | (m.cpu.gpr[2] << 32);
    if trapped(m, index) {
        return match m.msr_write_answer.take() {
            Some(true) => {
                if index == msr::IA32_APIC_BASE {
                    m.cpu.apic_base = v;
                }
                Ok(())
            }
            Some(false) => Err(gp(0)),
            None => Err(Fault::exit(Exit::MsrWrite { index, value: v })),
        };
    }
    if write_msr(m, index, v) {
        Ok(())
    } else {
        Err(gp(0))
    }
}

fn cpuid(m: &mut Machine, _: &Insn) -> R<()> {
    let leaf = m.cpu.gpr[0] as u32;
    let sub = m.cpu.gpr[1] as u32;
    let cores = m.cores_shared.load(std::sync::atomic::Ordering::Relaxed);
    let mut r = m.model.cpuid(leaf, sub, m.vcpu, cores);
    // CPUID.1:EDX.APIC follows IA32_APIC_BASE's global enable (SDM Vol. 3 11.4.3).
    if leaf == 1 && m.cpu.apic_base & (1 << 11) == 0 {
        r[3] &= !(1 << 9);
    }
    for (n, v) in [(0, r[0]), (3, r[1]), (1, r[2]), (2, r[3])] {
        m.set_gpr(n, 4, u64::from(v));
    }
    Ok(())
}

fn rdtsc<const P: bool>(m: &mut Machine, _: &Insn) -> R<()> {
    if m.cpu.cr4 & 4 != 0 && m.cpu.cpl != 0 {
        return Err(gp(0));
    }
    let t = tsc(m);
    m.set_gpr(0, 4, t & 0xffff_ffff);
    m.set_gpr(2, 4, t >> 32);
    if P {
        m.set_gpr(1, 4, m.cpu.msr.tsc_aux);
    }
    Ok(())
}

/// VMCALL/VMMCALL: a hypercall to the VMM, from any privilege level (the VMM refuses what
/// it does not allow), RIP past the instruction.
fn vmcall(m: &mut Machine, _: &Insn) -> R<()> {
    m.exit_after(Exit::Hypercall);
    Ok(())
}

fn hlt(m: &mut Machine, _: &Insn) -> R<()> {
    need_cpl0(m)?;
    // With TF set, the single-step #DB after HLT is an event that ends the halt at once (as
    // on KVM): the core goes into the handler instead of halting, so the VMM never sees a
    // halt whose RFLAGS are the handler's (IF clear) and takes it for the end of the guest.
    if m.cpu.flags & crate::cpu::fl::TF != 0 {
        return Ok(());
    }
    m.exit_after(Exit::Hlt);
    Ok(())
}

fn wbinvd(m: &mut Machine, _: &Insn) -> R<()> {
    need_cpl0(m)
}

// ---- fast system calls --------------------------------------------------------------------

fn flat_code(sel: u16, dpl: u8, long: bool) -> Segment {
    Segment {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        type_: 0xb,
        present: true,
        dpl,
        db: !long,
        s: true,
        l: long,
        g: true,
        avl: false,
        unusable: false,
    }
}

fn flat_stack(sel: u16, dpl: u8) -> Segment {
    Segment {
        type_: 0x3,
        db: true,
        l: false,
        ..flat_code(sel, dpl, false)
    }
}

fn syscall(m: &mut Machine, x: &Insn) -> R<()> {
    // The model is an Intel CPU: SYSCALL exists in 64-bit mode only; from compatibility
    // mode it is #UD (SDM Vol. 2B SYSCALL; AMD, and QEMU for any vendor, go through CSTAR).
    if m.cpu.efer & efer::SCE == 0 || m.cpu.mode != Mode::Long64 {
        return Err(ud());
    }
    m.syscall_intercept(SyscallAbi::Syscall64, m.cpu.gpr[0], x.i.len())?;
    let star = m.cpu.msr.star;
    let sel = ((star >> 32) & 0xfffc) as u16;
    let target = m.cpu.msr.lstar;
    m.cpu.gpr[1] = m.cpu.rip;
    m.cpu.gpr[11] = m.cpu.flags & !fl::RF;
    m.cpu.flags &= !(m.cpu.msr.fmask | fl::RF);
    m.cpu.flags |= 2;
    m.cpu.seg[CS] = flat_code(sel, 0, true);
    m.cpu.seg[SS] = flat_stack(sel + 8, 0);
    m.cpu.update_mode();
    m.cpu.rip = target;
    m.tf_after = true;
    Ok(())
}

fn sysret(m: &mut Machine, x: &Insn) -> R<()> {
    if m.cpu.efer & efer::SCE == 0 || !m.cpu.long_mode() {
        return Err(ud());
    }
    if m.cpu.cpl != 0 || m.cpu.mode != Mode::Long64 {
        return Err(gp(0));
    }
    let wide = x.i.code() == iced_x86::Code::Sysretq;
    let base = ((m.cpu.msr.star >> 48) & 0xffff) as u16;
    let rip = m.cpu.gpr[1];
    if wide && !canonical(rip) {
        return Err(gp(0));
    }
    let (cs, long) = if wide {
        (base + 16, true)
    } else {
        (base, false)
    };
    m.cpu.seg[CS] = flat_code(cs | 3, 3, long);
    let mut ss = flat_stack((base + 8) | 3, 3);
    ss.selector = (base + 8) | 3;
    m.cpu.seg[SS] = ss;
    m.cpu.flags = (m.cpu.gpr[11] & fl::WRITABLE & !(fl::RF | fl::VM)) | 2;
    m.cpu.rip = if wide { rip } else { rip & 0xffff_ffff };
    m.cpu.update_mode();
    m.note_user_entry();
    m.tf_after = true;
    Ok(())
}

fn sysenter(m: &mut Machine, _: &Insn) -> R<()> {
    if !protected(m) {
        return Err(gp(0));
    }
    let cs = (m.cpu.msr.sysenter_cs & 0xfffc) as u16;
    if cs == 0 {
        return Err(gp(0));
    }
    let long = m.cpu.long_mode();
    m.cpu.flags &= !(fl::IF | fl::VM | fl::RF);
    m.cpu.seg[CS] = flat_code(cs, 0, long);
    m.cpu.seg[SS] = flat_stack(cs + 8, 0);
    m.cpu.update_mode();
    m.cpu.rip = if long {
        m.cpu.msr.sysenter_eip
    } else {
        m.cpu.msr.sysenter_eip & 0xffff_ffff
    };
    m.cpu.gpr[4] = if long {
        m.cpu.msr.sysenter_esp
    } else {
        m.cpu.msr.sysenter_esp & 0xffff_ffff
    };
    Ok(())
}

fn sysexit(m: &mut Machine, x: &Insn) -> R<()> {
    let cs = (m.cpu.msr.sysenter_cs & 0xfffc) as u16;
    if !protected(m) || m.cpu.cpl != 0 || cs == 0 {
        return Err(gp(0));
    }
    let wide = x.i.code() == iced_x86::Code::Sysexitq;
    let (sel, long) = if wide {
        (cs + 32, true)
    } else {
        (cs + 16, false)
    };
    m.cpu.seg[CS] = flat_code(sel | 3, 3, long);
    m.cpu.seg[SS] = flat_stack((sel + 8) | 3, 3);
    m.cpu.update_mode();
    let (rip, sp) = (m.cpu.gpr[2], m.cpu.gpr[1]);
    m.cpu.rip = if wide { rip } else { rip & 0xffff_ffff };
    m.cpu.gpr[4] = if wide { sp } else { sp & 0xffff_ffff };
    Ok(())
}

fn swapgs(m: &mut Machine, _: &Insn) -> R<()> {
    if m.cpu.mode != Mode::Long64 {
        return Err(ud());
    }
    need_cpl0(m)?;
    std::mem::swap(&mut m.cpu.seg[GS].base, &mut m.cpu.msr.kernel_gs_base);
    Ok(())
}

pub fn handler(mn: Mnemonic, i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match mn {
        In => in_,
        Out => out,
        Cli => cli,
        Sti => sti,
        Pushf | Pushfd | Pushfq => pushf,
        Popf | Popfd | Popfq => popf,
        Mov => {
            let r0 = i.op0_register();
            let r1 = i.op1_register();
            if r0.is_cr() || r1.is_cr() {
                mov_cr
            } else if r0.is_dr() || r1.is_dr() {
                mov_dr
            } else {
                return None;
            }
        }
        Lmsw => lmsw,
        Smsw => smsw,
        Clts => clts,
        Invlpg => invlpg,
        Lgdt => lgdt_lidt::<false>,
        Lidt => lgdt_lidt::<true>,
        Sgdt => sgdt_sidt::<false>,
        Sidt => sgdt_sidt::<true>,
        Lldt => lldt,
        Ltr => ltr,
        Sldt => sldt_str::<false>,
        Str => sldt_str::<true>,
        Arpl => arpl,
        Lar => desc_query::<0>,
        Lsl => desc_query::<1>,
        Verr => desc_query::<2>,
        Verw => desc_query::<3>,
        Lds => load_far::<DS>,
        Les => load_far::<ES>,
        Lfs => load_far::<FS>,
        Lgs => load_far::<GS>,
        Lss => load_far::<SS>,
        Rdmsr => rdmsr,
        Wrmsr => wrmsr,
        Cpuid => cpuid,
        Rdtsc => rdtsc::<false>,
        Rdtscp => rdtsc::<true>,
        Hlt => hlt,
        Vmcall | Vmmcall => vmcall,
        Wbinvd | Invd => wbinvd,
        Syscall => syscall,
        Sysret | Sysretq => sysret,
        Sysenter => sysenter,
        Sysexit | Sysexitq => sysexit,
        Swapgs => swapgs,
        _ => return None,
    })
}
