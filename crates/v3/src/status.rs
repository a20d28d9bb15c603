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
/// Stopped from the outside by SIGINT (Ctrl-C), SIGTERM or SIGHUP. Shells report 128+N for a
/// process killed by signal N; `v3` catches the signal, stops the VM cleanly and exits with the
/// Ctrl-C value for all three, which keeps every status of its own even.
pub const STOPPED: u8 = 130;

/// The status for a VM outcome.
pub fn for_outcome(o: &Outcome) -> u8 {
    match o {
        Outcome::Halted
        | Outcome::Reset
        | Outcome::PowerOff
        | Outcome::Reboot
        | Outcome::Migrated(_) => OK,
        // QEMU's isa-debug-exit convention; only the low 8 bits reach the parent.
        Outcome::DebugExit(v) => ((v << 1) | 1) as u8,
        Outcome::Stopped => STOPPED,
        Outcome::Shutdown { .. } | Outcome::Failed(_) => VM_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(for_outcome(&Outcome::DebugExit(0)), 1);
        assert_eq!(for_outcome(&Outcome::DebugExit(0x2a)), 85);
        assert_eq!(for_outcome(&Outcome::Halted), 0);
        assert_eq!(
            for_outcome(&Outcome::Shutdown { vcpu: 0, rip: 0 }),
            VM_FAILURE
        );
        assert_eq!(for_outcome(&Outcome::Stopped), 130);
        for s in [OK, CONFIG_ERROR, VM_FAILURE, NO_BACKEND, STOPPED] {
            assert_eq!(s % 2, 0);
        }
    }
}
