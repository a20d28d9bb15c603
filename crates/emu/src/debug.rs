//! Debug registers (SDM Vol. 3 ch. 17): DR0–DR3 breakpoints on execution, data writes, data
//! reads and writes, and I/O ports (with CR4.DE), their status in DR6, DR7's enables and
//! general detect.
//!
//! While DR7 enables any breakpoint the core runs one instruction at a time without the
//! translator (see `lib.rs`): instruction breakpoints are checked before each instruction,
//! and data accesses to a watched page miss the TLB (its entries lose R and W), so they take
//! the slow memory path, which records the breakpoints they meet. Nothing is checked, and
//! nothing costs, while DR7 enables none.

use crate::cpu::Cpu;

/// DR6: breakpoint conditions met (B0–B3), debug-register access detected, single step.
pub const DR6_B: u64 = 0xf;
pub const DR6_BD: u64 = 1 << 13;
pub const DR6_BS: u64 = 1 << 14;
/// DR7: general detect.
pub const DR7_GD: u64 = 1 << 13;

/// What a breakpoint watches (DR7's R/W field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    Exec,
    Write,
    Io,
    ReadWrite,
}

/// One enabled breakpoint.
#[derive(Clone, Copy, Debug)]
struct Bp {
    n: u8,
    kind: Watch,
    /// First and last byte covered (the address aligned down to the length).
    first: u64,
    last: u64,
}

/// The enabled breakpoints of one core, derived from DR0–DR3, DR7 and CR4.DE.
#[derive(Clone, Debug, Default)]
pub struct Debug {
    bps: Vec<Bp>,
    /// Some breakpoint is enabled.
    pub armed: bool,
    /// Some data breakpoint is enabled (watched pages stay out of the TLB).
    pub data: bool,
    /// Breakpoint conditions met by the current instruction (DR6 bits B0–B3).
    pub hits: u8,
    /// Conditions met by a MOV SS / POP SS, reported after the next instruction.
    pub deferred: u8,
}

impl Debug {
    /// Derive the enabled breakpoints from the registers.
    pub fn from_cpu(cpu: &Cpu) -> Debug {
        let dr7 = cpu.dr[7];
        let de = cpu.cr4 & 8 != 0;
        let mut bps = Vec::new();
        for n in 0..4u8 {
            if dr7 >> (2 * n) & 3 == 0 {
                continue;
            }
            let field = dr7 >> (16 + 4 * n);
            let kind = match field & 3 {
                0 => Watch::Exec,
                1 => Watch::Write,
                // R/W = 10 is an I/O breakpoint with CR4.DE set, undefined without it.
                2 if de => Watch::Io,
                2 => continue,
                _ => Watch::ReadWrite,
            };
            let len: u64 = match (field >> 2) & 3 {
                0 => 1,
                1 => 2,
                2 => 8,
                _ => 4,
            };
            // An instruction breakpoint is on one address (its length must be 1).
            let len = if kind == Watch::Exec { 1 } else { len };
            let first = cpu.dr[n as usize] & !(len - 1);
            bps.push(Bp {
                n,
                kind,
                first,
                last: first + (len - 1),
            });
        }
        Debug {
            armed: !bps.is_empty(),
            data: bps
                .iter()
                .any(|b| matches!(b.kind, Watch::Write | Watch::ReadWrite)),
            bps,
            hits: 0,
            deferred: 0,
        }
    }

    /// Instruction breakpoints at linear address `lin` (DR6 B bits).
    pub fn exec_hits(&self, lin: u64) -> u8 {
        self.bps
            .iter()
            .filter(|b| b.kind == Watch::Exec && b.first == lin)
            .fold(0, |h, b| h | 1 << b.n)
    }

    /// Whether a data breakpoint covers any byte of the 4 KiB page holding `lin`.
    pub fn watches_page(&self, lin: u64) -> bool {
        let page = lin & !0xfff;
        self.bps.iter().any(|b| {
            matches!(b.kind, Watch::Write | Watch::ReadWrite)
                && b.first <= page + 0xfff
                && b.last >= page
        })
    }

    /// A data access of `size` bytes at linear `lin`: record the breakpoints it meets.
    pub fn access(&mut self, lin: u64, size: u64, write: bool) {
        let last = lin.wrapping_add(size.max(1) - 1);
        for b in &self.bps {
            let meets = match b.kind {
                Watch::Write => write,
                Watch::ReadWrite => true,
                _ => false,
            };
            if meets && lin <= b.last && last >= b.first {
                self.hits |= 1 << b.n;
            }
        }
    }

    /// A port access of `size` bytes at `port`: record the I/O breakpoints it meets.
    pub fn io(&mut self, port: u16, size: u64) {
        let (first, last) = (u64::from(port), u64::from(port) + size.max(1) - 1);
        for b in &self.bps {
            if b.kind == Watch::Io && first <= b.last && last >= b.first {
                self.hits |= 1 << b.n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(dr: [u64; 4], dr7: u64, cr4: u64) -> Cpu {
        let mut c = Cpu::default();
        c.dr[..4].copy_from_slice(&dr);
        c.dr[7] = dr7 | 0x400;
        c.cr4 = cr4;
        c
    }

    #[test]
    fn decodes_dr7() {
        // DR0 exec (L0), DR1 write 4 bytes (G1), DR2 I/O without CR4.DE (ignored), DR3 off.
        let c = cpu(
            [0x1000, 0x2003, 0x80, 0x4000],
            0b01 | 0b10 << 2 | 0b01 << 4 | 0b1101 << 20 | 0b0010 << 24,
            0,
        );
        let d = Debug::from_cpu(&c);
        assert!(d.armed && d.data);
        assert_eq!(d.exec_hits(0x1000), 1);
        assert_eq!(d.exec_hits(0x1001), 0);
        assert!(d.watches_page(0x2fff) && !d.watches_page(0x3000));
        let mut d2 = d.clone();
        d2.access(0x2000, 1, true); // DR1 aligned down to 0x2000..0x2003
        assert_eq!(d2.hits, 2);
        let mut d3 = d.clone();
        d3.access(0x2000, 4, false); // a read does not meet a write breakpoint
        d3.access(0x1ffc, 4, true); // ends just before
        assert_eq!(d3.hits, 0);
        let mut d4 = d.clone();
        d4.io(0x80, 1);
        assert_eq!(d4.hits, 0, "an I/O breakpoint needs CR4.DE");
        let mut d5 = Debug::from_cpu(&cpu([0, 0, 0x80, 0], 0b01 << 4 | 0b0110 << 24, 8));
        d5.io(0x7f, 2);
        assert_eq!(d5.hits, 4);
        assert!(!Debug::from_cpu(&cpu([0; 4], 0, 0)).armed);
    }
}
