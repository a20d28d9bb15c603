//! The multiboot platform test kernel (guests/pctest) on the standard PC, under both KVM
//! interrupt modes: this project's user-space PIC/PIT/LAPIC/IOAPIC, and KVM's in-kernel ones.

mod common;
use common::*;

/// The platform tests measure interrupt timing with timeouts; running several 4-core VMs at
/// once on a 2-core machine starves them, so these tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pctest(irqchip: &str, cmdline: &str, cores: &str) -> Run {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let k = guest("pctest.elf").display().to_string();
    v3(
        &[
            "run",
            "--irqchip",
            irqchip,
            "--kernel",
            &k,
            "--cores",
            cores,
            "--mem",
            "128",
            "--cmdline",
            cmdline,
        ],
        b"",
        LIMIT,
    )
}

fn assert_all_passed(r: &Run, tests: usize) {
    assert_eq!(r.status, 1, "verdict 0 on the debug-exit port\n{}", r.out());
    assert!(!r.stdout.contains("FAIL"), "{}", r.out());
    assert!(
        r.stdout
            .contains(&format!("pctest: {tests} passed, 0 failed")),
        "{}",
        r.out()
    );
}

#[test]
fn every_platform_test_passes_on_the_user_space_controllers() {
    each_backend(|_b| {
        let r = pctest("user", "cpus=4 ram_mib=128", "4");
        assert_all_passed(&r, 16);
        for id in 0..4 {
            assert!(r.stdout.contains(&format!("apic id {id}")), "{}", r.out());
        }
    });
}

/// KVM's in-kernel irqchip on this project's reference machines (a software "PVM" KVM) runs
/// interrupt handlers with the vector's ISR bit clear, so EOIs are lost and a level-triggered
/// interrupt is delivered once too often; QEMU -accel kvm fails the same checks there. About
/// one run in eight, its in-kernel PIC also shows IRQ0 not pending in the IRR after 5 ms with
/// IF=0 (no code of ours is on that path in this mode). The ISR checks, `level_irr` and
/// `pit_pic` are therefore left out in this mode; the user-space test above runs them all.
#[test]
fn platform_tests_pass_on_kvms_in_kernel_irqchip() {
    if !kvm() {
        return;
    }
    let tests = "mptable,fw_cfg,cmos_mem,rtc,spurious,rtc_periodic,pit_ioapic,lapic_oneshot,lapic_periodic,tsc_deadline,self_ipi,testdev,smp,ipi";
    let r = pctest(
        "kernel",
        &format!("cpus=2 ram_mib=128 isr_check=0 test={tests}"),
        "2",
    );
    assert_all_passed(&r, 14);
}

#[test]
fn i8042_reset_ends_the_vm_in_both_modes() {
    if !kvm() {
        return;
    }
    for mode in ["user", "kernel"] {
        let r = pctest(mode, "test=i8042_reset", "1");
        assert_eq!(
            r.status,
            0,
            "{mode}: reset ends the VM with status 0\n{}",
            r.out()
        );
        assert!(!r.stdout.contains("FAIL"), "{}", r.out());
    }
}

#[test]
fn reset_line_reboots_when_configured_to() {
    each_backend(|_b| {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let d = tmpdir("reboot");
        std::fs::copy(guest("pctest.elf"), d.join("pctest.elf")).unwrap();
        std::fs::write(
            d.join("vm.xml"),
            r#"<vm class="PC"><memory>32</memory><devices>
      <device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/><device class="LAPIC" id="lapic"/>
      <device class="IOAPIC" id="ioapic"/><device class="KEYBOARD" id="kbd" on_reset="reset"/>
      <device class="SERIAL" id="serial"/><device class="DEBUG_EXIT" id="exit"/>
    </devices><boot kernel="pctest.elf" cmdline="test=i8042_reset"/></vm>"#,
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_v3"))
            .args(["run", &d.join("vm.xml").display().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Each boot prints "pctest: start"; three boots mean the machine rebooted twice.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut boots = 0;
        while boots < 3 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("pctest: start") => boots += 1,
                Ok(l) => assert!(!l.contains("FAIL"), "{l}"),
                Err(_) => {
                    let _ = child.kill();
                    panic!("only {boots} boots seen");
                }
            }
        }
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "Ctrl-C ends a rebooting VM");
    });
}

/// Deterministic time (guest time from the instruction count, idle HLT skipping ahead):
/// the whole platform test kernel, timers and RTC included, prints exactly the same
/// thing twice, and the instruction count in the telemetry is the same too.
#[test]
fn deterministic_runs_reproduce_exactly() {
    let k = guest("pctest.elf").display().to_string();
    let run = || {
        let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        v3(
            &[
                "run",
                "--backend",
                "emu",
                "--clock",
                "deterministic",
                "--stats",
                "--kernel",
                &k,
                "--mem",
                "128",
                "--cmdline",
                "cpus=1 ram_mib=128",
            ],
            b"",
            LIMIT,
        )
    };
    let (a, b) = (run(), run());
    assert_all_passed(&a, 15);
    assert_eq!(a.stdout, b.stdout, "two deterministic runs differ");
    let count = |r: &Run| {
        r.stderr
            .lines()
            .find(|l| l.contains("emu instructions"))
            .map(|l| l.split_whitespace().last().unwrap().to_string())
            .unwrap_or_else(|| panic!("no instruction count\n{}", r.out()))
    };
    assert_eq!(count(&a), count(&b));
    // Timers fire at virtual times, to within the few instructions of a block.
    let fired: u64 = a
        .stdout
        .split("fired after ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no one-shot timer line\n{}", a.out()));
    assert!((10_000..=10_010).contains(&fired), "{}", a.out());
    // The KVM backend has no deterministic time: a clear configuration error.
    let r = v3(
        &[
            "run",
            "--backend",
            "kvm",
            "--clock",
            "deterministic",
            "--kernel",
            &k,
        ],
        b"",
        LIMIT,
    );
    if r.status != 6 {
        assert_eq!(r.status, 2, "{}", r.out());
        assert!(
            r.stderr.contains("needs the emulator backend"),
            "{}",
            r.out()
        );
    }
}
