//! Debian's stock kernel (built into a guest by scripts/fetch-linux-guest.sh) on the emulator.
//!
//! The emulator has no x87/SSE yet (that is the next stage), so the kernel stops at its FPU
//! check; this test guards everything before it: the bzImage loader (zero page, e820,
//! command line, initrd), the decompressor, early paging and long-mode set-up, the serial
//! console and the timers, on about 2×10^8 instructions of real-world code.

mod common;
use common::*;

use std::time::Duration;

#[test]
fn debian_kernel_boots_to_its_fpu_check_on_the_emulator() {
    let Some((kernel, initrd, release)) = linux_guest() else {
        return;
    };
    let (k, i) = (kernel.display().to_string(), initrd.display().to_string());
    let r = v3_until(
        &[
            "run",
            "--backend",
            "emu",
            "--kernel",
            &k,
            "--initrd",
            &i,
            "--mem",
            "256",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr",
        ],
        "x86/fpu:",
        Duration::from_secs(120),
    );
    let out = &r.stdout;
    let version = release.split('-').next().unwrap_or("");
    assert!(
        out.contains(&format!("Linux version {version}")),
        "no banner for {release}\n{}",
        r.out()
    );
    assert!(out.contains("Command line: console=ttyS0"), "{}", r.out());
    // The e820 map the loader wrote is the one the kernel reports.
    assert!(
        out.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{}",
        r.out()
    );
    assert!(
        out.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{}",
        r.out()
    );
    // The initrd was found where the zero page says.
    assert!(out.contains("RAMDISK: [mem"), "{}", r.out());
    assert!(
        out.contains("x86/fpu: Giving up, no FPU found"),
        "{}",
        r.out()
    );
}
