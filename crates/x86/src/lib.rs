//! Architectural facts shared by every CPU backend: the register file, segment
//! descriptors, control-register bits, MSR numbers and the long-mode entry set-up
//! (GDT and identity page tables) used by the loaders.

pub mod paging;
pub mod regs;
pub mod segment;

pub use regs::{CpuState, DescriptorTable, Regs, SRegs, Segment};

/// CR0 bits.
pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const PGE: u64 = 1 << 7;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
}

/// IA32_EFER bits.
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}

/// RFLAGS bits.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    /// Bit 1 always reads as one.
    pub const FIXED: u64 = 1 << 1;
    pub const ZF: u64 = 1 << 6;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
}

/// Model-specific register numbers.
pub mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_APIC_BASE: u32 = 0x1b;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// Power-on value of IA32_PAT.
    pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
}
