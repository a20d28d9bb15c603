//! Interrupt and exception delivery: the real-mode IVT, protected-mode and long-mode IDT
//! gates with stack switches (TSS, IST), double faults and triple faults.

use palacios_x86::Segment;
use palacios_x86::segment::decode;

use super::seg::{load_stack_for, read_desc, tss_ist, tss_stack};
use crate::cpu::{CS, Mode, SS, fl};
use crate::machine::{DF, Fault, GP, Machine, NP, R, gp};

/// Where an event comes from (decides privilege checks and the EXT bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// INT n: the gate's DPL is checked.
    Software,
    /// INT3 / INTO: also DPL-checked.
    SoftwareException,
    /// INT1 (ICEBP): not DPL-checked.
    Privileged,
    /// A processor exception.
    Exception,
    /// An external interrupt or NMI.
    External,
}

impl Source {
    fn ext(self) -> u32 {
        matches!(
            self,
            Source::Exception | Source::External | Source::Privileged
        ) as u32
    }
}

fn idt_fault(v: u8, vector: u8, src: Source) -> Fault {
    Fault::Exc(v, Some(u32::from(vector) * 8 + 2 + src.ext()))
}

/// Deliver `vector`. RIP is the return address already (next instruction for INT n and
/// traps, the faulting instruction for faults). On error nothing has changed.
pub fn deliver(m: &mut Machine, vector: u8, src: Source, code: Option<u32>) -> R<()> {
    let r = match m.cpu.mode {
        Mode::Real => deliver_real(m, vector),
        Mode::Virtual8086 => Err(Fault::Fatal(&"virtual-8086 mode is not implemented")),
        Mode::Protected => deliver_protected(m, vector, src, code),
        Mode::Long64 | Mode::Compat => deliver_long(m, vector, src, code),
    };
    // The #DB handler is entered with DR7.GD clear (SDM Vol. 3 17.2.4), so that it can
    // read the debug registers; INT 1 (CD 01) is an ordinary software interrupt.
    if r.is_ok() && vector == crate::machine::DB && src != Source::Software {
        m.cpu.dr[7] &= !crate::debug::DR7_GD;
    }
    r
}

fn deliver_real(m: &mut Machine, vector: u8) -> R<()> {
    let off = u64::from(vector) * 4;
    if off + 3 > u64::from(m.cpu.idtr.limit) {
        return Err(gp(0));
    }
    let entry = m.read_sys(m.cpu.idtr.base + off, 4)?;
    let flags = m.cpu.flags & 0xffff;
    let cs = u64::from(m.cpu.seg[CS].selector);
    let ip = m.cpu.rip & 0xffff;
    let sp0 = m.cpu.gpr[4];
    let r = (|| {
        m.push(flags, 2)?;
        m.push(cs, 2)?;
        m.push(ip, 2)
    })();
    if let Err(e) = r {
        m.cpu.gpr[4] = sp0;
        return Err(e);
    }
    let sel = (entry >> 16) as u16;
    m.cpu.seg[CS].selector = sel;
    m.cpu.seg[CS].base = u64::from(sel) << 4;
    m.cpu.rip = entry & 0xffff;
    m.cpu.flags &= !(fl::IF | fl::TF | fl::AC | fl::RF);
    Ok(())
}

/// The code segment a gate points at, checked.
fn gate_target(m: &mut Machine, sel: u16, vector: u8, src: Source) -> R<Segment> {
    if sel & 0xfffc == 0 {
        return Err(Fault::Exc(GP, Some(src.ext())));
    }
    let (_, raw) =
        read_desc(m, sel).map_err(|_| Fault::Exc(GP, Some(u32::from(sel & 0xfffc) + src.ext())))?;
    let d = decode(sel, raw);
    if !d.s || d.type_ & 8 == 0 || d.dpl > m.cpu.cpl {
        return Err(Fault::Exc(GP, Some(u32::from(sel & 0xfffc) + src.ext())));
    }
    if !d.present {
        return Err(Fault::Exc(NP, Some(u32::from(sel & 0xfffc) + src.ext())));
    }
    let _ = vector;
    Ok(d)
}

fn deliver_protected(m: &mut Machine, vector: u8, src: Source, code: Option<u32>) -> R<()> {
    let off = u64::from(vector) * 8;
    if off + 7 > u64::from(m.cpu.idtr.limit) {
        return Err(idt_fault(GP, vector, src));
    }
    let raw = m.read_sys(m.cpu.idtr.base + off, 8)?;
    let gate = decode(0, raw);
    let kind = gate.type_;
    if gate.s || !matches!(kind, 0x5 | 0x6 | 0x7 | 0xe | 0xf) {
        return Err(idt_fault(GP, vector, src));
    }
    if matches!(src, Source::Software | Source::SoftwareException) && gate.dpl < m.cpu.cpl {
        return Err(idt_fault(GP, vector, src));
    }
    if !gate.present {
        return Err(idt_fault(NP, vector, src));
    }
    if kind == 0x5 {
        return Err(Fault::Fatal(&"task gates are not implemented"));
    }
    let size: u64 = if kind & 8 != 0 { 4 } else { 2 };
    let sel = ((raw >> 16) & 0xffff) as u16;
    let target = (raw & 0xffff) | ((raw >> 32) & 0xffff_0000);
    let target = if size == 2 { target & 0xffff } else { target };
    let d = gate_target(m, sel, vector, src)?;
    if target > u64::from(d.limit) {
        return Err(Fault::Exc(GP, Some(src.ext())));
    }
    let conforming = d.type_ & 4 != 0;
    let old_flags = m.cpu.flags;
    let old_cs = u64::from(m.cpu.seg[CS].selector);
    let ret = m.cpu.rip;
    let saved = (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits);
    let new_cpl = if conforming { m.cpu.cpl } else { d.dpl };
    let r = (|| -> R<()> {
        if new_cpl < m.cpu.cpl {
            let old_ss = u64::from(m.cpu.seg[SS].selector);
            let old_sp = m.cpu.gpr[4];
            let (ss, sp) = tss_stack(m, new_cpl)?;
            load_stack_for(m, ss, new_cpl)?;
            m.cpu.mode = Mode::Protected;
            m.cpu.gpr[4] = sp;
            m.push(old_ss, size)?;
            m.push(old_sp, size)?;
        }
        m.push(old_flags, size)?;
        m.push(old_cs, size)?;
        m.push(ret, size)?;
        if let Some(c) = code {
            m.push(u64::from(c), size)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits) = saved;
        return Err(e);
    }
    let mut cs = d;
    cs.selector = (sel & 0xfffc) | u16::from(new_cpl);
    cs.type_ |= 1;
    m.cpu.seg[CS] = cs;
    m.cpu.seg[SS].dpl = new_cpl;
    m.cpu.rip = target;
    m.cpu.flags &= !(fl::TF | fl::NT | fl::RF | fl::VM);
    if kind & 1 == 0 {
        m.cpu.flags &= !fl::IF;
    }
    m.cpu.update_mode();
    Ok(())
}

fn deliver_long(m: &mut Machine, vector: u8, src: Source, code: Option<u32>) -> R<()> {
    let off = u64::from(vector) * 16;
    if off + 15 > u64::from(m.cpu.idtr.limit) {
        return Err(idt_fault(GP, vector, src));
    }
    let lo = m.read_sys(m.cpu.idtr.base + off, 8)?;
    let hi = m.read_sys(m.cpu.idtr.base + off + 8, 8)?;
    let gate = decode(0, lo);
    if gate.s || !matches!(gate.type_, 0xe | 0xf) {
        return Err(idt_fault(GP, vector, src));
    }
    if matches!(src, Source::Software | Source::SoftwareException) && gate.dpl < m.cpu.cpl {
        return Err(idt_fault(GP, vector, src));
    }
    if !gate.present {
        return Err(idt_fault(NP, vector, src));
    }
    let sel = ((lo >> 16) & 0xffff) as u16;
    let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
    let ist = ((lo >> 32) & 7) as u8;
    let d = gate_target(m, sel, vector, src)?;
    if !d.l || d.db {
        return Err(Fault::Exc(GP, Some(u32::from(sel & 0xfffc) + src.ext())));
    }
    if !crate::machine::canonical(target) {
        return Err(Fault::Exc(GP, Some(src.ext())));
    }
    let conforming = d.type_ & 4 != 0;
    let new_cpl = if conforming { m.cpu.cpl } else { d.dpl };
    let old_ss = u64::from(m.cpu.seg[SS].selector);
    let old_sp = m.cpu.gpr[4];
    let old_flags = m.cpu.flags;
    let old_cs = u64::from(m.cpu.seg[CS].selector);
    let ret = m.cpu.rip;
    let new_sp = if ist != 0 {
        tss_ist(m, ist)?
    } else if new_cpl < m.cpu.cpl {
        tss_stack(m, new_cpl)?.1
    } else {
        old_sp
    };
    let saved = (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits);
    let r = (|| -> R<()> {
        if new_cpl < m.cpu.cpl {
            m.cpu.seg[SS] = Segment {
                selector: u16::from(new_cpl),
                unusable: true,
                dpl: new_cpl,
                db: true,
                ..Default::default()
            };
            m.cpu.cpl = new_cpl;
        }
        m.cpu.mode = Mode::Long64;
        m.cpu.gpr[4] = new_sp & !0xf;
        m.push(old_ss, 8)?;
        m.push(old_sp, 8)?;
        m.push(old_flags, 8)?;
        m.push(old_cs, 8)?;
        m.push(ret, 8)?;
        if let Some(c) = code {
            m.push(u64::from(c), 8)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        (m.cpu.seg, m.cpu.gpr[4], m.cpu.cpl, m.cpu.mode, m.cpu.bits) = saved;
        return Err(e);
    }
    let mut cs = d;
    cs.selector = (sel & 0xfffc) | u16::from(new_cpl);
    cs.type_ |= 1;
    m.cpu.seg[CS] = cs;
    m.cpu.seg[SS].dpl = new_cpl;
    m.cpu.rip = target;
    m.cpu.flags &= !(fl::TF | fl::NT | fl::RF | fl::VM);
    if gate.type_ & 1 == 0 {
        m.cpu.flags &= !fl::IF;
    }
    m.cpu.update_mode();
    Ok(())
}

/// Vectors that push an error code.
pub fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

/// Fault-class exception vectors (the instruction is restarted after the handler).
fn is_fault(v: u8) -> bool {
    matches!(
        v,
        0 | 5 | 6 | 7 | 10 | 11 | 12 | 13 | 14 | 16 | 17 | 19 | 20 | 21
    )
}

fn contributory(v: u8) -> bool {
    matches!(v, 0 | 10 | 11 | 12 | 13)
}

/// Outcome of raising an exception.
#[derive(Debug, PartialEq, Eq)]
pub enum Raised {
    Delivered,
    /// Triple fault: the core shuts down.
    Shutdown,
    /// The emulator cannot continue.
    Fatal(&'static str),
}

/// Raise exception `f` (with CR2 for page faults), escalating to #DF and triple fault.
pub fn deliver_exception(m: &mut Machine, f: Fault) -> Raised {
    let mut current = f;
    let mut first: Option<u8> = None;
    for _ in 0..8 {
        let (vector, code) = match current {
            Fault::Exc(v, c) => (
                v,
                if has_error_code(v) {
                    Some(c.unwrap_or(0))
                } else {
                    None
                },
            ),
            Fault::Pf(lin, c) => {
                m.cpu.cr2 = lin;
                (14, Some(c))
            }
            Fault::Fatal(s) => return Raised::Fatal(s),
            Fault::Exit(_) => return Raised::Fatal("device access while delivering an exception"),
        };
        if let Some(prev) = first {
            if prev == DF {
                return Raised::Shutdown;
            }
            let df = (contributory(prev) && contributory(vector))
                || (prev == 14 && (vector == 14 || contributory(vector)));
            if df {
                match deliver(m, DF, Source::Exception, Some(0)) {
                    Ok(()) => return Raised::Delivered,
                    Err(_) => return Raised::Shutdown,
                }
            }
        }
        // Fault-class exceptions push RFLAGS with RF set, so that the handler's IRET does
        // not hit an instruction breakpoint again (SDM Vol. 3 17.3.1.1). #DB is left out: its
        // instruction-breakpoint form is the exception, and its other forms are traps.
        let before = m.cpu.flags;
        if is_fault(vector) {
            m.cpu.flags |= fl::RF;
        }
        match deliver(m, vector, Source::Exception, code) {
            Ok(()) => return Raised::Delivered,
            Err(e) => {
                m.cpu.flags = before;
                first = Some(vector);
                current = e;
            }
        }
    }
    Raised::Shutdown
}
