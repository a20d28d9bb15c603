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
    if !kvm() {
        return;
    }
    let r = pctest("user", "cpus=4 ram_mib=128", "4");
    assert_all_passed(&r, 16);
    for id in 0..4 {
        assert!(r.stdout.contains(&format!("apic id {id}")), "{}", r.out());
    }
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
