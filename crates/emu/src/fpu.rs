//! x87, MMX and SSE register state, and its exchange with the VMM's FXSAVE-shaped
//! [`FpuState`].

use palacios_vmm::backend::FpuState;

/// FSW bits.
pub mod sw {
    pub const IE: u16 = 1 << 0;
    pub const DE: u16 = 1 << 1;
    pub const ZE: u16 = 1 << 2;
    pub const OE: u16 = 1 << 3;
    pub const UE: u16 = 1 << 4;
    pub const PE: u16 = 1 << 5;
    /// Stack fault (with IE).
    pub const SF: u16 = 1 << 6;
    /// Exception summary: an unmasked exception is pending.
    pub const ES: u16 = 1 << 7;
    pub const C0: u16 = 1 << 8;
    pub const C1: u16 = 1 << 9;
    pub const C2: u16 = 1 << 10;
    pub const TOP_SHIFT: u16 = 11;
    pub const TOP: u16 = 7 << 11;
    pub const C3: u16 = 1 << 14;
    pub const B: u16 = 1 << 15;
    /// The six exception flags.
    pub const EXC: u16 = 0x3f;
}

/// MXCSR bits.
pub mod mx {
    pub const IE: u32 = 1 << 0;
    pub const DE: u32 = 1 << 1;
    pub const ZE: u32 = 1 << 2;
    pub const OE: u32 = 1 << 3;
    pub const UE: u32 = 1 << 4;
    pub const PE: u32 = 1 << 5;
    pub const DAZ: u32 = 1 << 6;
    /// Exception masks: flags << 7.
    pub const MASK_SHIFT: u32 = 7;
    pub const RC_SHIFT: u32 = 13;
    pub const FTZ: u32 = 1 << 15;
    /// Bits software may set (this model has DAZ).
    pub const WRITABLE: u32 = 0xffff;
    pub const DEFAULT: u32 = 0x1f80;
}

/// The x87/SSE unit of one core.
#[derive(Clone, Debug)]
pub struct Fpu {
    /// Physical data registers R0-R7, 80-bit values in the low bits (MMX registers are the
    /// low 64 bits).
    pub r: [u128; 8],
    pub fcw: u16,
    /// Status word, TOP included.
    pub fsw: u16,
    /// Abridged tag: bit i set when physical register i is not empty.
    pub tag: u8,
    /// Last instruction opcode (11 bits), instruction and operand pointers.
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub fcs: u16,
    pub fds: u16,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
}

impl Default for Fpu {
    /// The state after RESET (FINIT's values with all registers empty).
    fn default() -> Self {
        Fpu {
            r: [0; 8],
            fcw: 0x40,
            fsw: 0,
            tag: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            fcs: 0,
            fds: 0,
            xmm: [0; 16],
            mxcsr: mx::DEFAULT,
        }
    }
}

/// MXCSR bits the model implements (MXCSR_MASK in the FXSAVE image).
pub const MXCSR_MASK: u32 = mx::WRITABLE;

impl Fpu {
    /// FNINIT / FINIT.
    pub fn init(&mut self) {
        self.fcw = 0x37f;
        self.fsw = 0;
        self.tag = 0;
        self.fop = 0;
        self.fip = 0;
        self.fdp = 0;
        self.fcs = 0;
        self.fds = 0;
    }

    #[inline]
    pub fn top(&self) -> usize {
        usize::from((self.fsw & sw::TOP) >> sw::TOP_SHIFT)
    }

    #[inline]
    pub fn set_top(&mut self, t: usize) {
        self.fsw = (self.fsw & !sw::TOP) | (((t & 7) as u16) << sw::TOP_SHIFT);
    }

    /// Physical register number of ST(i).
    #[inline]
    pub fn phys(&self, i: usize) -> usize {
        (self.top() + i) & 7
    }

    /// The full two-bit tag of physical register `p` (valid, zero, special, empty).
    pub fn full_tag(&self, p: usize) -> u16 {
        if self.tag & (1 << p) == 0 {
            return 3;
        }
        let v = self.r[p];
        let exp = (v >> 64) as u16 & 0x7fff;
        let mant = v as u64;
        if exp == 0x7fff {
            2
        } else if exp == 0 {
            if mant == 0 { 1 } else { 2 }
        } else if mant >> 63 == 0 {
            2 // unnormal
        } else {
            0
        }
    }

    /// The full 16-bit tag word (FSTENV/FSAVE).
    pub fn tag_word(&self) -> u16 {
        (0..8).fold(0, |w, p| w | (self.full_tag(p) << (2 * p)))
    }

    /// Load a full tag word: only "empty" versus "not empty" is kept, as FLDENV does.
    pub fn set_tag_word(&mut self, w: u16) {
        self.tag = (0..8).fold(0, |t, p| {
            if (w >> (2 * p)) & 3 == 3 {
                t
            } else {
                t | (1 << p)
            }
        });
    }

    /// The VMM's view (FXSAVE layout: registers ST0-ST7, abridged tag by physical register).
    pub fn to_state(&self) -> FpuState {
        let mut s = FpuState {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.tag,
            last_opcode: self.fop,
            last_ip: self.fip,
            last_dp: self.fdp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for i in 0..8 {
            s.fpr[i] = (self.r[self.phys(i)] & ((1u128 << 80) - 1)).to_le_bytes();
        }
        for (d, x) in s.xmm.iter_mut().zip(self.xmm.iter()) {
            *d = x.to_le_bytes();
        }
        s
    }

    pub fn set_state(&mut self, s: &FpuState) {
        self.fcw = s.fcw;
        self.fsw = s.fsw;
        self.tag = s.ftwx;
        self.fop = s.last_opcode & 0x7ff;
        self.fip = s.last_ip;
        self.fdp = s.last_dp;
        self.mxcsr = s.mxcsr & MXCSR_MASK;
        for i in 0..8 {
            let p = self.phys(i);
            self.r[p] = u128::from_le_bytes(s.fpr[i]) & ((1u128 << 80) - 1);
        }
        for (x, d) in self.xmm.iter_mut().zip(s.xmm.iter()) {
            *x = u128::from_le_bytes(*d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_fxsave_view() {
        let mut f = Fpu::default();
        f.init();
        f.set_top(5);
        f.r[5] = 0x3fff_8000_0000_0000_0000; // 1.0 = ST0
        f.r[6] = 0; // +0 = ST1
        f.tag = (1 << 5) | (1 << 6);
        f.xmm[3] = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        f.mxcsr = 0x1f80 | mx::PE;
        let s = f.to_state();
        assert_eq!(u128::from_le_bytes(s.fpr[0]), 0x3fff_8000_0000_0000_0000);
        assert_eq!(s.ftwx, 0x60);
        let mut g = Fpu::default();
        g.set_state(&s);
        assert_eq!(g.r, f.r);
        assert_eq!(g.xmm, f.xmm);
        assert_eq!(g.mxcsr, f.mxcsr);
        // Full tags: R5 valid, R6 zero, the rest empty.
        assert_eq!(g.tag_word(), 0xffff & !(3 << 10) & !(3 << 12) | (1 << 12));
    }
}
