//! The emulated core's architectural state.

use palacios_x86::{DescriptorTable, Regs, SRegs, Segment, cr0, efer};

/// Segment registers in the encoding's order (also iced-x86's).
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

/// RFLAGS bits the emulator uses.
pub mod fl {
    pub const CF: u64 = 1 << 0;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can change at all.
    pub const WRITABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | VM | AC | VIF | VIP | ID;
}

/// Model-specific registers the core keeps itself.
#[derive(Clone, Debug, Default)]
pub struct MsrFile {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub tsc_aux: u64,
    pub mtrr_def_type: u64,
    /// MTRRphysBase/Mask 0-7 (0x200-0x20f).
    pub mtrr_var: [u64; 16],
    /// Fixed-range MTRRs in MSR order (0x250, 0x258, 0x259, 0x268-0x26f).
    pub mtrr_fixed: [u64; 11],
    /// IA32_MCG_STATUS, IA32_MCG_CTL.
    pub mcg_status: u64,
    pub mcg_ctl: u64,
    /// MCi_CTL, MCi_STATUS, MCi_ADDR, MCi_MISC of each bank (0x400 + 4i ...).
    pub mc: [[u64; 4]; MC_BANKS],
}

/// Machine-check banks IA32_MCG_CAP reports.
pub const MC_BANKS: usize = 4;
/// IA32_MCG_CAP: MCG_CTL present, [`MC_BANKS`] banks, nothing else.
pub const MCG_CAP: u64 = (1 << 8) | MC_BANKS as u64;
/// The machine-check MSRs the emulator keeps (saved with the core's state).
pub const MCE_MSRS: [u32; 2 + 4 * MC_BANKS] = {
    let mut v = [0u32; 2 + 4 * MC_BANKS];
    v[0] = 0x17a;
    v[1] = 0x17b;
    let mut i = 0;
    while i < 4 * MC_BANKS {
        v[2 + i] = 0x400 + i as u32;
        i += 1;
    }
    v
};

/// The processor mode, derived from CR0.PE, EFER.LMA, RFLAGS.VM and CS.L.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Real,
    /// Protected mode (16- or 32-bit code per CS.D).
    Protected,
    Virtual8086,
    /// IA-32e compatibility mode (CS.L = 0).
    Compat,
    Long64,
}

/// Architectural state of one core.
#[derive(Clone, Debug)]
pub struct Cpu {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub flags: u64,
    pub seg: [Segment; 6],
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub dr: [u64; 8],
    pub apic_base: u64,
    pub msr: MsrFile,
    /// Added to the virtual clock's TSC.
    pub tsc_offset: u64,
    /// Interrupts are blocked for one instruction (after STI, MOV SS, POP SS).
    pub shadow: bool,
    /// An NMI handler is running (until IRET).
    pub nmi_blocked: bool,
    pub fpu: crate::fpu::Fpu,
    /// Cached: current privilege level.
    pub cpl: u8,
    /// Cached: current mode.
    pub mode: Mode,
    /// Cached: code size of CS in bits (16, 32, 64).
    pub bits: u32,
}

impl Default for Cpu {
    fn default() -> Self {
        let mut c = Cpu {
            gpr: [0; 16],
            rip: 0,
            flags: 2,
            seg: [Segment::default(); 6],
            ldtr: Segment::default(),
            tr: Segment::default(),
            gdtr: DescriptorTable::default(),
            idtr: DescriptorTable::default(),
            cr0: cr0::ET,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0xffff_0ff0, 0x400, 0xffff_0ff0, 0x400],
            apic_base: 0,
            msr: MsrFile {
                pat: palacios_x86::msr::PAT_DEFAULT,
                ..Default::default()
            },
            tsc_offset: 0,
            shadow: false,
            nmi_blocked: false,
            fpu: Default::default(),
            cpl: 0,
            mode: Mode::Real,
            bits: 16,
        };
        c.set_sregs(&palacios_x86::CpuState::reset().sregs);
        c
    }
}

impl Cpu {
    /// Recompute the cached mode, CPL and code size after CR0, EFER, RFLAGS.VM or CS changed.
    pub fn update_mode(&mut self) {
        let cs = &self.seg[CS];
        self.mode = if self.cr0 & cr0::PE == 0 {
            Mode::Real
        } else if self.efer & efer::LMA != 0 {
            if cs.l { Mode::Long64 } else { Mode::Compat }
        } else if self.flags & fl::VM != 0 {
            Mode::Virtual8086
        } else {
            Mode::Protected
        };
        self.cpl = match self.mode {
            Mode::Real => 0,
            Mode::Virtual8086 => 3,
            _ => self.seg[SS].dpl,
        };
        self.bits = match self.mode {
            Mode::Long64 => 64,
            Mode::Real | Mode::Virtual8086 => {
                if cs.db && self.mode == Mode::Real {
                    32
                } else {
                    16
                }
            }
            _ => {
                if cs.db {
                    32
                } else {
                    16
                }
            }
        };
    }

    pub fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }

    pub fn regs(&self) -> Regs {
        let g = &self.gpr;
        Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.rip,
            rflags: self.flags,
        }
    }

    pub fn set_regs(&mut self, r: &Regs) {
        self.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        self.rip = r.rip;
        self.flags = (r.rflags & fl::WRITABLE) | 2;
        self.update_mode();
    }

    pub fn sregs(&self) -> SRegs {
        SRegs {
            es: self.seg[ES],
            cs: self.seg[CS],
            ss: self.seg[SS],
            ds: self.seg[DS],
            fs: self.seg[FS],
            gs: self.seg[GS],
            tr: self.tr,
            ldt: self.ldtr,
            gdt: self.gdtr,
            idt: self.idtr,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
        }
    }

    pub fn set_sregs(&mut self, s: &SRegs) {
        self.seg = [s.es, s.cs, s.ss, s.ds, s.fs, s.gs];
        self.tr = s.tr;
        self.ldtr = s.ldt;
        self.gdtr = s.gdt;
        self.idtr = s.idt;
        self.cr0 = s.cr0 | cr0::ET;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.cr8 = s.cr8;
        self.efer = s.efer;
        self.apic_base = s.apic_base;
        self.update_mode();
    }
}
