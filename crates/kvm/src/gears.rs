//! System-call intercepts on KVM (GEARS). Hardware virtualization does not exit on SYSCALL or
//! INT 0x80, so the vCPU gets two hardware instruction breakpoints (KVM_SET_GUEST_DEBUG): one
//! on the kernel's SYSCALL entry (LSTAR), one on the INT 0x80 gate's handler. Every system
//! call then exits to the VMM at the kernel's entry; the ones the filter does not select go
//! straight back into the guest from here (RFLAGS.RF set so the breakpoint does not fire
//! again), without reaching the exit loop. Selected ones are reported as
//! [`Intercepted::Syscall`] with `entered` set: the CPU has already switched to the kernel, RCX
//! and R11 (SYSCALL) or the interrupt frame (INT 0x80) hold the way back. The cost is one
//! exit per system call of every process while a rule is active (none without rules).
//! User-mode entries and user faults cannot be intercepted this way and are refused.

use std::sync::Arc;

use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, kvm_guest_debug};
use palacios_vmm::intercept::{Intercepted, Intercepts, SyscallAbi, SyscallFilter, space_of};
use palacios_vmm::{BackendError, Exit, Vcpu};
use vm_memory::{Bytes, GuestAddress};

use crate::{KvmVcpu, host_err};

const MSR_LSTAR: u32 = 0xc000_0082;
const RF: u64 = 1 << 16;

/// The breakpoints of an active syscall filter.
pub(crate) struct SyscallHook {
    filter: Arc<SyscallFilter>,
    /// Breakpoint exits taken (selected or not), for telemetry.
    pub(crate) hits: u64,
    /// Runs since the entry points were last looked up (while one is still unknown).
    since_lookup: u32,
    /// [SYSCALL entry, INT 0x80 handler] (0: none).
    at: [u64; 2],
}

impl KvmVcpu {
    fn refuse(&self, what: &str) -> BackendError {
        BackendError::Unhandled {
            vcpu: self.index,
            rip: 0,
            what: format!(
                "KVM cannot stop at {what} (GEARS code and environment injection need the emulator backend)"
            ),
        }
    }

    /// The INT 0x80 gate's handler address (0 if the IDT is not readable).
    fn int80_handler(&self) -> u64 {
        let Ok(s) = self.sregs() else { return 0 };
        let Some(mem) = &self.mem else { return 0 };
        let gate = s.idt.base.wrapping_add(0x80 * 16);
        let Ok(t) = self.fd.translate_gva(gate) else {
            return 0;
        };
        if t.valid == 0 {
            return 0;
        }
        let mut g = [0u8; 16];
        if mem
            .read_slice(&mut g, GuestAddress(t.physical_address))
            .is_err()
        {
            return 0;
        }
        let lo = u64::from(u16::from_le_bytes([g[0], g[1]]));
        let mid = u64::from(u16::from_le_bytes([g[6], g[7]]));
        let hi = u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]]));
        // Present interrupt or trap gate only.
        if g[5] & 0x80 == 0 {
            return 0;
        }
        lo | (mid << 16) | (hi << 32)
    }

    pub(crate) fn apply_intercepts(&mut self, i: &Intercepts) -> Result<(), BackendError> {
        if i.user_entry.is_some() {
            return Err(self.refuse("entries to user mode"));
        }
        if i.user_faults.is_some() {
            return Err(self.refuse("user-mode exceptions"));
        }
        let filter = i.syscalls.clone().filter(|f| !f.is_empty());
        let mut dbg = kvm_guest_debug::default();
        self.syscall_hook = None;
        if let Some(filter) = filter {
            let lstar = self.msrs(&[MSR_LSTAR])?.first().map(|m| m.1).unwrap_or(0);
            let at = [lstar, self.int80_handler()];
            dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            let mut dr7 = 0u64;
            for (n, a) in at.iter().enumerate() {
                if *a != 0 {
                    dbg.arch.debugreg[n] = *a;
                    // Local enable; RW=00 (execute) and LEN=00.
                    dr7 |= 1 << (2 * n);
                }
            }
            dbg.arch.debugreg[7] = dr7;
            self.syscall_hook = Some(SyscallHook {
                filter,
                at,
                hits: 0,
                since_lookup: 0,
            });
        }
        self.fd
            .set_guest_debug(&dbg)
            .map_err(host_err("KVM_SET_GUEST_DEBUG"))
    }

    /// Before a run: an entry point not set up yet when the rule came (a rule from the config
    /// applies before the guest kernel has written LSTAR or its IDT) is looked up again now and
    /// then.
    pub(crate) fn refresh_breakpoints(&mut self) -> Result<(), BackendError> {
        let Some(h) = &mut self.syscall_hook else {
            return Ok(());
        };
        if !h.at.contains(&0) {
            return Ok(());
        }
        h.since_lookup += 1;
        if h.since_lookup < 64 {
            return Ok(());
        }
        h.since_lookup = 0;
        let (old, filter, hits) = (h.at, h.filter.clone(), h.hits);
        let lstar = self.msrs(&[MSR_LSTAR])?.first().map_or(0, |m| m.1);
        if [lstar, self.int80_handler()] != old {
            self.apply_intercepts(&Intercepts {
                syscalls: Some(filter),
                ..Intercepts::default()
            })?;
            if let Some(h) = &mut self.syscall_hook {
                h.hits = hits;
            }
        }
        Ok(())
    }

    /// A debug exit: `Some` to report, `None` to go back into the guest at once.
    pub(crate) fn on_debug(&mut self, dr6: u64, pc: u64) -> Result<Option<Exit>, BackendError> {
        let Some(h) = &mut self.syscall_hook else {
            return Err(self.fail(format!("unexpected debug exit at {pc:#x}")));
        };
        h.hits += 1;
        let (at, filter) = (h.at, h.filter.clone());
        let abi = if dr6 & 1 != 0 || pc == at[0] {
            SyscallAbi::Syscall64
        } else if dr6 & 2 != 0 || pc == at[1] {
            SyscallAbi::Int80
        } else {
            return Err(self.fail(format!("debug exit at {pc:#x} from no breakpoint of ours")));
        };
        let mut regs = self.regs()?;
        let nr = match abi {
            SyscallAbi::Syscall64 => regs.rax,
            SyscallAbi::Int80 => regs.rax & 0xffff_ffff,
        };
        let space = space_of(self.sregs()?.cr3);
        if filter.hit(abi, nr, space) {
            return Ok(Some(Exit::Intercept(Intercepted::Syscall {
                abi,
                entered: true,
            })));
        }
        regs.rflags |= RF;
        self.set_regs(&regs)?;
        Ok(None)
    }

    /// Resume past the breakpoint of a reported system call.
    pub(crate) fn pass_breakpoint(&mut self) {
        if let Ok(mut r) = self.regs() {
            r.rflags |= RF;
            let _ = self.set_regs(&r);
        }
    }
}
