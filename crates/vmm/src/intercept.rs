//! Guest events a backend can stop at so that VMM services run in the guest's own context
//! (GEARS): system calls from user mode, a return to user mode in a chosen address space, and
//! exceptions raised by user code there. The emulator implements them (it executes every
//! instruction); a backend that cannot refuses [`crate::Vcpu::set_intercepts`].
//!
//! Address spaces are named by their page-directory base: CR3 with the PCID bits (0-11) and
//! bit 12 cleared, so a Linux process has one name with or without page-table isolation (its
//! user page directory is the page after the kernel's).

use std::sync::Arc;

/// CR3 bits that name an address space ([`space_of`]).
pub const CR3_SPACE_MASK: u64 = 0x000f_ffff_ffff_e000;

/// The address space CR3 `cr3` names.
pub fn space_of(cr3: u64) -> u64 {
    cr3 & CR3_SPACE_MASK
}

/// System-call numbers of one ABI, 0..512.
pub type NrSet = [u64; 8];

/// Whether `nr` is in `set`.
#[inline]
pub fn nr_in(set: &NrSet, nr: u64) -> bool {
    nr < 512 && set[(nr / 64) as usize] & (1 << (nr % 64)) != 0
}

/// Add `nr` (< 512) to `set`.
pub fn nr_add(set: &mut NrSet, nr: u32) {
    if nr < 512 {
        set[(nr / 64) as usize] |= 1 << (nr % 64);
    }
}

/// The two system-call ABIs of an x86-64 Linux guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyscallAbi {
    /// SYSCALL in 64-bit mode: number in RAX, arguments in RDI, RSI, RDX, R10, R8, R9.
    Syscall64,
    /// INT 0x80: number in EAX, arguments in EBX, ECX, EDX, ESI, EDI, EBP.
    Int80,
}

/// Which system calls stop: numbers selected in every address space, and numbers selected in
/// given spaces only. Everything else runs without an exit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyscallFilter {
    /// [SYSCALL, INT 0x80] numbers that stop everywhere.
    pub everywhere: [NrSet; 2],
    /// (space, [SYSCALL, INT 0x80] numbers) that stop in that space only.
    pub by_space: Vec<(u64, [NrSet; 2])>,
}

impl SyscallFilter {
    /// Whether system call `nr` of `abi` in address space `space` stops.
    #[inline]
    pub fn hit(&self, abi: SyscallAbi, nr: u64, space: u64) -> bool {
        let a = abi as usize;
        nr_in(&self.everywhere[a], nr)
            || self
                .by_space
                .iter()
                .any(|(s, sets)| *s == space && nr_in(&sets[a], nr))
    }

    pub fn is_empty(&self) -> bool {
        self.everywhere.iter().all(|s| s.iter().all(|w| *w == 0)) && self.by_space.is_empty()
    }
}

/// What a core stops at ([`crate::Vcpu::set_intercepts`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intercepts {
    pub syscalls: Option<Arc<SyscallFilter>>,
    /// Stop when the core enters user mode in this address space (and at once if it is
    /// already there when the intercepts are set).
    pub user_entry: Option<u64>,
    /// Exceptions raised by user code in this address space stop instead of being delivered.
    pub user_faults: Option<u64>,
}

impl Intercepts {
    pub fn is_empty(&self) -> bool {
        self.syscalls.is_none() && self.user_entry.is_none() && self.user_faults.is_none()
    }
}

/// Why a core stopped at an intercept ([`crate::Exit::Intercept`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Intercepted {
    /// A selected system call, before it executes (emulator: RIP at the instruction) or at the
    /// kernel's entry (`entered`). The core runs it when resumed after
    /// [`crate::Vcpu::intercept_pass`]; a service that answers it itself sets RAX and returns
    /// to user mode past the instruction instead.
    Syscall {
        abi: SyscallAbi,
        /// The CPU already entered the kernel (KVM: a breakpoint at the kernel's entry). The
        /// way back to user mode is in RCX/R11 (SYSCALL) or the interrupt frame (INT 0x80).
        entered: bool,
    },
    /// The core just entered user mode in the watched space (RIP at the user instruction).
    UserEntry,
    /// User code in the watched space raised `vector` (RIP at the faulting instruction). Not
    /// delivered; the core's loop delivers it ([`crate::Vcpu::inject_exception`]) unless a
    /// service handles it.
    UserFault {
        vector: u8,
        code: Option<u32>,
        cr2: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_selects_by_abi_number_and_space() {
        let mut f = SyscallFilter::default();
        assert!(f.is_empty());
        nr_add(&mut f.everywhere[SyscallAbi::Syscall64 as usize], 59);
        let mut mine = [[0; 8]; 2];
        nr_add(&mut mine[SyscallAbi::Syscall64 as usize], 1);
        nr_add(&mut mine[SyscallAbi::Int80 as usize], 4);
        f.by_space.push((0x1234_0000, mine));
        assert!(f.hit(SyscallAbi::Syscall64, 59, 0));
        assert!(!f.hit(SyscallAbi::Int80, 59, 0));
        assert!(f.hit(SyscallAbi::Syscall64, 1, 0x1234_0000));
        assert!(!f.hit(SyscallAbi::Syscall64, 1, 0x5678_0000));
        assert!(f.hit(SyscallAbi::Int80, 4, 0x1234_0000));
        assert!(!f.hit(SyscallAbi::Syscall64, 4, 0x1234_0000));
        assert!(!f.hit(SyscallAbi::Syscall64, 100_000, 0x1234_0000));
        nr_add(&mut mine[0], 9999);
        assert_eq!(mine[0].iter().map(|w| w.count_ones()).sum::<u32>(), 1);
    }

    #[test]
    fn space_ignores_pcid_and_the_pti_bit() {
        assert_eq!(space_of(0x1234_5000 | 0x1000 | 0x7), space_of(0x1234_4000));
        assert_ne!(space_of(0x1234_4000), space_of(0x1234_6000));
    }
}
