//! Debian's stock kernel and busybox (built into a guest by scripts/fetch-linux-guest.sh) on
//! the emulator backend, through `examples/linux.xml`: boot to the shell, run commands on the
//! serial console, check the kernel release and that /proc/cpuinfo's CPUID flags are exactly
//! the emulator's CPU model, then `poweroff -f` (ACPI S5) must end `v3` with status 0.

mod common;
use common::*;

use std::time::Duration;

use palacios_emu::model::CpuModel;

/// Linux's /proc/cpuinfo names of the CPUID bits of leaves 1 and 0x80000001:
/// (leaf, register index EAX=0 EBX=1 ECX=2 EDX=3, bit, name).
const FLAGS: &[(u32, usize, u32, &str)] = &[
    (1, 3, 0, "fpu"),
    (1, 3, 1, "vme"),
    (1, 3, 2, "de"),
    (1, 3, 3, "pse"),
    (1, 3, 4, "tsc"),
    (1, 3, 5, "msr"),
    (1, 3, 6, "pae"),
    (1, 3, 7, "mce"),
    (1, 3, 8, "cx8"),
    (1, 3, 9, "apic"),
    (1, 3, 11, "sep"),
    (1, 3, 12, "mtrr"),
    (1, 3, 13, "pge"),
    (1, 3, 14, "mca"),
    (1, 3, 15, "cmov"),
    (1, 3, 16, "pat"),
    (1, 3, 17, "pse36"),
    (1, 3, 19, "clflush"),
    (1, 3, 21, "dts"),
    (1, 3, 22, "acpi"),
    (1, 3, 23, "mmx"),
    (1, 3, 24, "fxsr"),
    (1, 3, 25, "sse"),
    (1, 3, 26, "sse2"),
    (1, 3, 27, "ss"),
    (1, 3, 28, "ht"),
    (1, 3, 29, "tm"),
    (1, 3, 31, "pbe"),
    (1, 2, 0, "pni"),
    (1, 2, 1, "pclmulqdq"),
    (1, 2, 3, "monitor"),
    (1, 2, 5, "vmx"),
    (1, 2, 9, "ssse3"),
    (1, 2, 12, "fma"),
    (1, 2, 13, "cx16"),
    (1, 2, 17, "pcid"),
    (1, 2, 19, "sse4_1"),
    (1, 2, 20, "sse4_2"),
    (1, 2, 21, "x2apic"),
    (1, 2, 22, "movbe"),
    (1, 2, 23, "popcnt"),
    (1, 2, 24, "tsc_deadline_timer"),
    (1, 2, 25, "aes"),
    (1, 2, 26, "xsave"),
    (1, 2, 28, "avx"),
    (1, 2, 29, "f16c"),
    (1, 2, 30, "rdrand"),
    (1, 2, 31, "hypervisor"),
    (0x8000_0001, 3, 11, "syscall"),
    (0x8000_0001, 3, 20, "nx"),
    (0x8000_0001, 3, 26, "pdpe1gb"),
    (0x8000_0001, 3, 27, "rdtscp"),
    (0x8000_0001, 3, 29, "lm"),
    (0x8000_0001, 2, 0, "lahf_lm"),
    (0x8000_0001, 2, 5, "abm"),
];

#[test]
fn debian_kernel_boots_to_a_shell_takes_commands_and_powers_off() {
    let Some((_kernel, _initrd, release)) = linux_guest() else {
        return;
    };
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/linux.xml");
    let mut s = Session::start(&["run", config, "--stats"]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(150));
    let boot = s.elapsed();
    let out = s.output();
    assert!(
        out.contains("Command line: console=ttyS0"),
        "{}",
        s.describe()
    );
    assert!(
        out.contains("ACPI: PM: (supports S0 S5)"),
        "the kernel did not take the ACPI tables\n{}",
        s.describe()
    );
    assert!(
        out.contains("x86/fpu: x87 FPU will use FXSAVE"),
        "{}",
        s.describe()
    );
    let mut at = s.wait_for("# ", ready, Duration::from_secs(60));

    s.send("uname -r");
    let echoed = s.wait_for("uname -r", at, Duration::from_secs(30));
    let end = s.wait_for("# ", echoed, Duration::from_secs(30));
    let answer = s.output()[at..end].to_string();
    assert!(
        answer.lines().any(|l| l.trim() == release),
        "uname -r did not print {release}: {answer:?}"
    );
    at = end;

    s.send("grep -m1 ^flags /proc/cpuinfo");
    let from = s.wait_for("/proc/cpuinfo", at, Duration::from_secs(30));
    let flags = s.wait_for("\nflags", from, Duration::from_secs(30));
    let end = s.wait_for("# ", flags, Duration::from_secs(30));
    let text = s.output()[from..end].to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_else(|| panic!("no flags line: {text:?}"));
    let shown: std::collections::BTreeSet<&str> = line
        .split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let model = CpuModel::emulated();
    let mut wrong = Vec::new();
    for &(leaf, reg, bit, name) in FLAGS {
        let has = model.cpuid(leaf, 0, 0, 1)[reg] & (1 << bit) != 0;
        if has != shown.contains(name) {
            wrong.push(format!(
                "{name}: CPUID model {}, /proc/cpuinfo {}",
                if has { "has it" } else { "has not" },
                if shown.contains(name) {
                    "shows it"
                } else {
                    "does not"
                }
            ));
        }
    }
    assert!(wrong.is_empty(), "CPU flags differ: {wrong:?}\n{line}");

    s.send("poweroff -f");
    let status = s.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status,
        0,
        "poweroff -f must end v3 with status 0\n{}",
        s.describe()
    );
    let stderr = s.describe();
    let insns = stderr
        .lines()
        .find(|l| l.contains("emu instructions"))
        .map(|l| l.split_whitespace().last().unwrap_or("?").to_string())
        .unwrap_or_else(|| "?".into());
    // The regression guard the issue asks for: printed with the test's output.
    eprintln!(
        "linux boot: PALACIOS-LINUX-READY after {:.2} s; {insns} guest instructions in the whole run",
        boot.as_secs_f64()
    );
    assert!(
        stderr.contains("guest powered off"),
        "the VM did not end by ACPI S5\n{stderr}"
    );
}

/// PVH entry, on a pseudo-terminal as a user runs it: Ctrl-C reaches the guest and interrupts
/// `sleep 30` in its shell, Ctrl-A h lists the console keys, and Ctrl-A x stops the VM.
#[test]
fn debian_kernel_boots_through_pvh_entry_and_the_console_passes_ctrl_c() {
    let Some((kernel, initrd, release)) = linux_guest() else {
        return;
    };
    let (k, i) = (kernel.display().to_string(), initrd.display().to_string());
    let mut s = Session::start_pty(&[
        "run",
        "--backend",
        "emu",
        "--format",
        "pvh",
        "--kernel",
        &k,
        "--initrd",
        &i,
        "--mem",
        "256",
        "--cmdline",
        "console=ttyS0 nokaslr cryptomgr.notests",
    ]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(150));
    let out = s.output();
    let version = release.split('-').next().unwrap_or("");
    assert!(
        out.contains(&format!("Linux version {version}")),
        "{}",
        s.describe()
    );
    // The PVH path hands over the memory map in hvm_start_info.
    assert!(
        out.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{}",
        s.describe()
    );
    assert!(out.contains("RAMDISK: [mem"), "{}", s.describe());
    let at = s.wait_for("# ", ready, Duration::from_secs(60));

    // Ctrl-C interrupts a program in the guest's shell; the VM keeps running.
    s.send_raw(b"sleep 30; echo slept-$?\r");
    let echoed = s.wait_for("sleep 30", at, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    let sent = std::time::Instant::now();
    s.send_raw(b"\x03");
    let back = s.wait_for("# ", echoed, Duration::from_secs(20));
    assert!(
        sent.elapsed() < Duration::from_secs(20),
        "the prompt came back only after the sleep ended"
    );
    let between = s.output()[echoed..back].to_string();
    assert!(
        !between.contains("slept-0"),
        "sleep 30 was not interrupted: {between:?}"
    );
    s.send_raw(b"echo alive-$((6*7))\r");
    s.wait_for("alive-42", back, Duration::from_secs(30));

    // Ctrl-A h prints the keys (on stderr); Ctrl-A x stops the VM (status 130).
    s.send_raw(b"\x01h");
    let t = std::time::Instant::now();
    while !s.describe().contains("stop the VM") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no key help\n{}",
            s.describe()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.send_raw(b"\x01x");
    assert_eq!(
        s.wait_exit(Duration::from_secs(30)),
        130,
        "{}",
        s.describe()
    );
    assert!(
        s.describe().contains("stopped from the console (Ctrl-A x)"),
        "{}",
        s.describe()
    );
}

/// Debian's kernel on the emulator, checkpointed at its shell: a file written in tmpfs is
/// still there after `kill -9` and `v3 load`, the same shell answers, and /proc/uptime
/// continues from where it was.
#[test]
fn debian_shell_survives_save_kill_and_load() {
    let Some(_) = linux_guest() else {
        return;
    };
    let dir = tmpdir("linux-ckpt");
    let sock = dir.join("vm.sock");
    let ck = dir.join("linux.ckpt");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/linux.xml");
    let sock_s = sock.display().to_string();
    let mut s = Session::start(&["run", config, "--api-sock", &sock_s]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(150));
    let at = s.wait_for("# ", ready, Duration::from_secs(60));
    s.send("echo kept-$((40+2)) > /tmp/f; echo $$ > /tmp/shell; cat /proc/uptime");
    let echoed = s.wait_for("cat /proc/uptime", at, Duration::from_secs(30));
    let up = s.wait_for("\n", echoed, Duration::from_secs(30));
    let end = s.wait_for("# ", up, Duration::from_secs(30));
    let uptime = |text: &str| -> f64 {
        text.lines()
            .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no uptime in {text:?}"))
    };
    let u1 = uptime(&s.output()[up..end]);
    let (st, v) = palacios_api::request(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&serde_json::json!({"path": ck.display().to_string()})),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(st, 200, "{v}");
    s.kill9();
    let ck_s = ck.display().to_string();
    let mut l = Session::start(&["load", &ck_s]);
    l.send("cat /tmp/f; echo shell-$(($(cat /tmp/shell) == $$)); cat /proc/uptime");
    let kept = l.wait_for("kept-42", 0, Duration::from_secs(60));
    let same = l.wait_for("shell-1", kept, Duration::from_secs(30));
    let up = l.wait_for("\n", same, Duration::from_secs(30));
    let end = l.wait_for("# ", up, Duration::from_secs(30));
    let u2 = uptime(&l.output()[up..end]);
    assert!(
        u2 >= u1 && u2 < u1 + 30.0,
        "/proc/uptime must continue: {u1} before the save, {u2} after the load"
    );
    l.send("poweroff -f");
    assert_eq!(l.wait_exit(Duration::from_secs(60)), 0, "{}", l.describe());
}
