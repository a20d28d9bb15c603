//! A backend-neutral register file.

/// General-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// D/B bit: default operand size 32 bits.
    pub db: bool,
    /// S bit: code/data (true) or system (false).
    pub s: bool,
    /// L bit: 64-bit code segment.
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// Everything a loader sets before the first instruction.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuState {
    pub regs: Regs,
    pub sregs: SRegs,
    /// Extra MSRs to set (index, value).
    pub msrs: Vec<(u32, u64)>,
}

impl CpuState {
    /// The architectural state after INIT: real mode, CS:IP = F000:FFF0.
    pub fn reset() -> Self {
        let real = |selector: u16, type_: u8| Segment {
            base: u64::from(selector) << 4,
            limit: 0xffff,
            selector,
            type_,
            present: true,
            s: true,
            ..Default::default()
        };
        let mut sregs = SRegs {
            cs: Segment {
                base: 0xffff_0000,
                ..real(0xf000, 0xb)
            },
            ds: real(0, 3),
            es: real(0, 3),
            fs: real(0, 3),
            gs: real(0, 3),
            ss: real(0, 3),
            tr: Segment {
                limit: 0xffff,
                type_: 0xb,
                present: true,
                ..Default::default()
            },
            ldt: Segment {
                limit: 0xffff,
                type_: 0x2,
                present: true,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: crate::cr0::ET | crate::cr0::CD | crate::cr0::NW,
            apic_base: 0xfee0_0000 | (1 << 11) | (1 << 8),
            ..Default::default()
        };
        sregs.cr0 &= !(crate::cr0::CD | crate::cr0::NW);
        CpuState {
            regs: Regs {
                rip: 0xfff0,
                rflags: crate::rflags::FIXED,
                rdx: 0x600,
                ..Default::default()
            },
            sregs,
            msrs: Vec::new(),
        }
    }

    /// The state a STARTUP IPI with `vector` gives: real mode at CS = vector << 8, IP = 0.
    pub fn sipi(vector: u8) -> Self {
        let mut s = Self::reset();
        s.sregs.cs.selector = u16::from(vector) << 8;
        s.sregs.cs.base = u64::from(vector) << 12;
        s.regs.rip = 0;
        s.regs.rdx = 0;
        s
    }

    /// Real mode with CS:IP chosen so that CS.base + IP = `linear` (below 1 MiB).
    pub fn real_mode_at(linear: u32) -> Self {
        let mut s = Self::reset();
        let cs = ((linear >> 4) & 0xf000) as u16;
        s.sregs.cs.selector = cs;
        s.sregs.cs.base = u64::from(cs) << 4;
        s.regs.rip = u64::from(linear) - s.sregs.cs.base;
        s.regs.rdx = 0;
        s
    }
}
