//! `v3` exit statuses. Every status `v3` chooses itself is even, so none can be mistaken for a
//! debug-exit status, which is always odd.

use palacios_vmm::Outcome;

/// The guest halted with interrupts disabled on every core (or requested a reset).
pub const OK: u8 = 0;
/// Bad command line, bad config, or a guest image that cannot be loaded.
pub const CONFIG_ERROR: u8 = 2;
/// The VM failed: triple fault, KVM internal error, failed VM entry, backend error.
pub const VM_FAILURE: u8 = 4;
/// No usable backend (for example no /dev/kvm).
pub const NO_BACKEND: u8 = 6;
/// Stopped by SIGINT (Ctrl-C), SIGTERM or SIGHUP: 128 + the signal number, as shells report.
pub fn signal(sig: i32) -> u8 {
    (128 + sig).clamp(0, 255) as u8
}

/// The status for a VM outcome; `signal` is the signal that stopped it, if any.
pub fn for_outcome(o: &Outcome, sig: Option<i32>) -> u8 {
    match o {
        Outcome::Halted | Outcome::Reset => OK,
        // QEMU's isa-debug-exit convention; only the low 8 bits reach the parent.
        Outcome::DebugExit(v) => ((v << 1) | 1) as u8,
        Outcome::Stopped => signal(sig.unwrap_or(libc::SIGINT)),
        Outcome::Shutdown { .. } | Outcome::Failed(_) => VM_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(for_outcome(&Outcome::DebugExit(0), None), 1);
        assert_eq!(for_outcome(&Outcome::DebugExit(0x2a), None), 85);
        assert_eq!(for_outcome(&Outcome::Halted, None), 0);
        assert_eq!(for_outcome(&Outcome::Shutdown { vcpu: 0, rip: 0 }, None), VM_FAILURE);
        assert_eq!(for_outcome(&Outcome::Stopped, Some(libc::SIGTERM)), 143);
        for s in [OK, CONFIG_ERROR, VM_FAILURE, NO_BACKEND, signal(2), signal(15)] {
            assert_eq!(s % 2, 0);
        }
    }
}
