//! Page-table walks (32-bit, PAE, 4-level) and the software TLB in front of them.

use palacios_x86::{cr0, cr4, efer};

use crate::cpu::Cpu;
use crate::phys::{PhysMem, Target};

/// Page-fault error-code bits.
pub mod pf {
    pub const P: u32 = 1 << 0;
    pub const W: u32 = 1 << 1;
    pub const U: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    pub const I: u32 = 1 << 4;
}

/// What an access wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Fetch,
}

/// The physical-address width the CPU model reports (CPUID 0x80000008).
pub const PHYS_BITS: u32 = 40;
const PHYS_MASK: u64 = ((1 << PHYS_BITS) - 1) & !0xfff;
const NX: u64 = 1 << 63;
/// Bits above the physical width that must be zero in PAE/4-level entries (NX excluded).
const HIGH_RSVD: u64 = !((1u64 << PHYS_BITS) - 1) & !NX;

/// A successful translation.
#[derive(Clone, Copy, Debug)]
pub struct Translation {
    /// Physical address of the byte.
    pub phys: u64,
    /// Permissions for this privilege (bits of [`perm`]).
    pub perm: u8,
    pub global: bool,
    /// log2 of the page size the translation came from (12, 21 or 22).
    pub page_bits: u8,
}

/// TLB permission bits.
pub mod perm {
    pub const R: u8 = 1;
    pub const W: u8 = 2;
    pub const X: u8 = 4;
}

/// Translate linear `lin` for an access of `kind` by privilege `user`; sets accessed and dirty
/// bits. Errors are page-fault error codes.
pub fn walk(
    cpu: &Cpu,
    mem: &PhysMem,
    lin: u64,
    kind: Kind,
    user: bool,
) -> Result<Translation, u32> {
    if cpu.cr0 & cr0::PG == 0 {
        return Ok(Translation {
            phys: lin & 0xffff_ffff,
            perm: perm::R | perm::W | perm::X,
            global: false,
            page_bits: 12,
        });
    }
    let nxe = cpu.efer & efer::NXE != 0;
    let mut code = if user { pf::U } else { 0 };
    if kind == Kind::Write {
        code |= pf::W;
    }
    if kind == Kind::Fetch && nxe {
        code |= pf::I;
    }
    let not_present = || code;
    let rsvd = || code | pf::P | pf::RSVD;
    // (entry address, entry) of every level, for the accessed bits.
    let mut levels: [(u64, u64); 4] = [(0, 0); 4];
    let mut n = 0;
    let mut rw = true;
    let mut us = true;
    let mut xd = false;
    let leaf: u64;
    let page_bits: u32;
    let wide = cpu.cr4 & cr4::PAE != 0;
    if !wide {
        // 32-bit paging.
        let lin = lin & 0xffff_ffff;
        let pde_addr = (cpu.cr3 & 0xffff_f000) + ((lin >> 22) << 2);
        let pde = u64::from(mem.read_u32(pde_addr).unwrap_or(0));
        if pde & 1 == 0 {
            return Err(not_present());
        }
        levels[n] = (pde_addr, pde);
        n += 1;
        rw &= pde & 2 != 0;
        us &= pde & 4 != 0;
        if pde & 0x80 != 0 && cpu.cr4 & cr4::PSE != 0 {
            // 4 MiB page (PSE-36 high bits in 13..20).
            let high = (pde >> 13) & 0xff;
            if (pde >> 13) & 0xff & !((1 << (PHYS_BITS - 32)) - 1) != 0 || pde & (1 << 21) != 0 {
                return Err(rsvd());
            }
            leaf = (pde & 0xffc0_0000) | (high << 32);
            page_bits = 22;
        } else {
            let pte_addr = (pde & 0xffff_f000) + (((lin >> 12) & 0x3ff) << 2);
            let pte = u64::from(mem.read_u32(pte_addr).unwrap_or(0));
            if pte & 1 == 0 {
                return Err(not_present());
            }
            levels[n] = (pte_addr, pte);
            n += 1;
            rw &= pte & 2 != 0;
            us &= pte & 4 != 0;
            leaf = pte & 0xffff_f000;
            page_bits = 12;
        }
    } else {
        let long = cpu.efer & efer::LMA != 0;
        let check = |e: u64| -> bool { e & HIGH_RSVD != 0 || (!nxe && e & NX != 0) };
        let mut table;
        let mut shift;
        if long {
            let pml4_addr = (cpu.cr3 & PHYS_MASK) + (((lin >> 39) & 0x1ff) << 3);
            let e = mem.read_u64(pml4_addr).unwrap_or(0);
            if e & 1 == 0 {
                return Err(not_present());
            }
            if check(e) || e & 0x80 != 0 {
                return Err(rsvd());
            }
            levels[n] = (pml4_addr, e);
            n += 1;
            rw &= e & 2 != 0;
            us &= e & 4 != 0;
            xd |= e & NX != 0;
            table = e & PHYS_MASK;
            shift = 30;
        } else {
            // PAE: the four PDPTEs (read at walk time; real CPUs cache them at CR3 load).
            let addr = (cpu.cr3 & 0xffff_ffe0) + (((lin >> 30) & 3) << 3);
            let e = mem.read_u64(addr).unwrap_or(0);
            if e & 1 == 0 {
                return Err(not_present());
            }
            if e & HIGH_RSVD != 0 || e & 0x1e6 != 0 || e & NX != 0 {
                return Err(rsvd());
            }
            table = e & PHYS_MASK;
            shift = 21;
        }
        loop {
            let addr = table + (((lin >> shift) & 0x1ff) << 3);
            let e = mem.read_u64(addr).unwrap_or(0);
            if e & 1 == 0 {
                return Err(not_present());
            }
            if check(e) {
                return Err(rsvd());
            }
            levels[n] = (addr, e);
            n += 1;
            rw &= e & 2 != 0;
            us &= e & 4 != 0;
            xd |= e & NX != 0;
            if shift == 12 {
                leaf = e & PHYS_MASK;
                page_bits = 12;
                break;
            }
            if e & 0x80 != 0 {
                if shift == 30 {
                    // 1 GiB pages are not advertised.
                    return Err(rsvd());
                }
                // 2 MiB page: bits 13..20 are reserved.
                if e & 0x1f_e000 != 0 {
                    return Err(rsvd());
                }
                leaf = e & PHYS_MASK & !((1 << 21) - 1);
                page_bits = 21;
                break;
            }
            table = e & PHYS_MASK;
            shift -= 9;
        }
    }
    let (leaf_addr, leaf_entry) = levels[n - 1];
    let wp = cpu.cr0 & cr0::WP != 0;
    let allowed = match kind {
        Kind::Read => !user || us,
        Kind::Write => {
            if user {
                us && rw
            } else {
                rw || !wp
            }
        }
        Kind::Fetch => (!user || us) && !(nxe && xd),
    };
    if !allowed {
        return Err(code | pf::P);
    }
    // Accessed bits on every level, dirty on the leaf for writes.
    for &(addr, e) in &levels[..n] {
        if e & 0x20 == 0 {
            mem.or_u32(addr, 0x20);
        }
    }
    let dirty = leaf_entry & 0x40 != 0 || kind == Kind::Write;
    if kind == Kind::Write && leaf_entry & 0x40 == 0 {
        mem.or_u32(leaf_addr, 0x40);
    }
    let mut p = perm::R;
    let can_write = if user { us && rw } else { rw || !wp };
    if can_write && dirty {
        p |= perm::W;
    }
    if (!user || us) && !(nxe && xd) {
        p |= perm::X;
    }
    let global = cpu.cr4 & cr4::PGE != 0 && leaf_entry & 0x100 != 0;
    Ok(Translation {
        phys: leaf | (lin & ((1u64 << page_bits) - 1)),
        perm: p,
        global,
        page_bits: page_bits as u8,
    })
}

/// One TLB entry: a linear page and where it leads.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// Linear page number; `u64::MAX` when empty.
    pub page: u64,
    pub perm: u8,
    pub global: bool,
    /// Host address of the page's first byte.
    pub host: *mut u8,
    /// Physical page address.
    pub phys: u64,
    /// Index of the physical page in the code-page tables.
    pub code_page: usize,
    /// log2 of the size of the page the entry is a 4 KiB piece of.
    pub page_bits: u8,
}

const EMPTY: Entry = Entry {
    page: u64::MAX,
    perm: 0,
    global: false,
    host: std::ptr::null_mut(),
    phys: 0,
    code_page: 0,
    page_bits: 12,
};

pub const TLB_SIZE: usize = 1024;

/// Direct-mapped software TLB, one half for supervisor and one for user accesses.
pub struct Tlb {
    pub sets: [[Entry; TLB_SIZE]; 2],
    /// The code-page epoch this TLB's write permissions were granted under.
    pub code_epoch: u64,
    /// Bumped by every flush: block chaining trusts a link only within one generation.
    pub generation: u64,
    /// Some entry may be a piece of a 2 or 4 MiB page (INVLPG must then drop all pieces).
    pub has_large: bool,
}

// SAFETY: the host pointers in the entries point into guest RAM, which lives as long as the
// core's `PhysMem` and may be accessed from any thread; a TLB is used by one thread at a time.
unsafe impl Send for Tlb {}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            sets: [[EMPTY; TLB_SIZE]; 2],
            code_epoch: 0,
            generation: 0,
            has_large: false,
        }
    }
}

impl Tlb {
    #[inline(always)]
    pub fn slot(lin: u64) -> usize {
        ((lin >> 12) as usize) & (TLB_SIZE - 1)
    }

    /// Drop everything (CR0/CR4 changes, INVLPG of a large page).
    pub fn flush_all(&mut self) {
        self.generation += 1;
        self.sets = [[EMPTY; TLB_SIZE]; 2];
        self.has_large = false;
    }

    /// A CR3 write: global entries survive.
    pub fn flush_nonglobal(&mut self) {
        self.generation += 1;
        for set in &mut self.sets {
            for e in set.iter_mut() {
                if !e.global {
                    *e = EMPTY;
                }
            }
        }
    }

    /// INVLPG: the page holding `lin`. A large page occupies one entry per 4 KiB piece used,
    /// so every piece of a large page that holds `lin` goes, as on hardware (SDM 4.10.4.1:
    /// INVLPG invalidates the translation of the whole page, whatever its size).
    pub fn flush_page(&mut self, lin: u64) {
        let page = lin >> 12;
        self.generation += 1;
        for set in &mut self.sets {
            let e = &mut set[Self::slot(lin)];
            if e.page == page {
                *e = EMPTY;
            }
        }
        if self.has_large {
            for set in &mut self.sets {
                for e in set.iter_mut() {
                    if e.page != u64::MAX
                        && e.page_bits > 12
                        && (e.page << 12) >> e.page_bits == lin >> e.page_bits
                    {
                        *e = EMPTY;
                    }
                }
            }
        }
    }

    /// Remove write permission everywhere (a page became code somewhere).
    pub fn drop_writes(&mut self) {
        for set in &mut self.sets {
            for e in set.iter_mut() {
                e.perm &= !perm::W;
            }
        }
    }

    /// Install a translation of `lin` (RAM only).
    pub fn fill(&mut self, user: bool, lin: u64, t: &Translation, target: Target, code: bool) {
        let Target::Ram(host, code_page) = target else {
            return;
        };
        let mut p = t.perm;
        if code {
            p &= !perm::W;
        }
        let off = (t.phys & 0xfff) as usize;
        self.sets[user as usize][Self::slot(lin)] = Entry {
            page: lin >> 12,
            perm: p,
            global: t.global,
            // SAFETY: `host` points at byte `off` of a RAM page; the page start is in the same mapping.
            host: unsafe { host.sub(off) },
            phys: t.phys & !0xfff,
            code_page,
            page_bits: t.page_bits,
        };
        if t.page_bits > 12 {
            self.has_large = true;
        }
    }
}
