//! Differential testing of the emulator against the host CPU.
//!
//! Every general-purpose integer instruction form that user mode can execute runs with random
//! registers, arithmetic flags (and DF) and memory, natively inside this test process and in
//! the emulator; the general-purpose registers, the flags the Intel SDM defines for the
//! instruction, and the memory buffer must agree. The forms of the chosen mnemonics are
//! enumerated from iced-x86's opcode tables (every encoding, operand size, register and
//! memory operand, LOCK where allowed), plus string instructions with and without REP in each
//! address size, near branches, calls and returns, JCC/LOOP/JCXZ and XLAT. They run in 64-bit
//! code and, where the host has Linux's 32-bit user code segment, in 32-bit compatibility-mode
//! code too (which adds BCD arithmetic, PUSHA/POPA, BOUND, ARPL and 16-bit LEA).
//!
//! Memory operands use random bases, indexes, scales, displacements, 32-bit address sizes,
//! RIP-relative addressing and segment overrides, aimed at a buffer whose accesses may cross a
//! page boundary. Both sides use the same addresses: the test maps its data buffer, scratch
//! area and code at a fixed low address (MAP_FIXED_NOREPLACE), and the guest has RAM there
//! with the identity map of the 64-bit ELF loader's entry state, so memory operands,
//! RIP-relative addressing and return addresses agree.
//!
//! Flags and register bits the SDM leaves undefined are not compared (see `undefined_flags`
//! and `undefined_reg_bits`); cases that would fault natively (#DE, #BR) are not generated.
//!
//! Environment:
//! - `PALACIOS_DIFF_CASES`: number of cases (default 50000, a few seconds in a debug build;
//!   `bench/emu-soak.sh` runs 10^6 in release mode).
//! - `PALACIOS_DIFF_SEED`: seed (decimal or 0x-hex; default fixed). Printed, with every
//!   mismatch's case number, so a failure can be replayed.
//! - `PALACIOS_DIFF_FORM`: only run forms whose name contains this text.
//! - `PALACIOS_DIFF_SHOW`: how many mismatches to print in full (default 30).
//! - `PALACIOS_DIFF_TRACE`: print every case before it runs (to find one that crashes).
//! - `PALACIOS_DIFF_LIST`: print every form with its number of cases and mismatches.

#[cfg(not(target_arch = "x86_64"))]
#[test]
fn differential_against_host_cpu() {
    palacios_vmm::test_support::skip_machine(
        "differential",
        &format!(
            "differential testing runs x86 instructions natively and needs an x86_64 host \
         (this host is {})",
            std::env::consts::ARCH
        ),
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn differential_against_host_cpu() {
    host::run();
}

#[cfg(target_arch = "x86_64")]
mod host;
