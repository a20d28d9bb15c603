//! The PC platform under KVM with assembled scenario guests: PIT channel 0 through the 8259A
//! to the core, in real mode.

mod common;

use std::sync::Arc;
use std::time::Instant;

use iced_x86::code_asm::*;
use palacios::vmm::{LinuxHost, Outcome, Vm, VmConfig};
use palacios_x86::CpuState;
use vm_memory::{Bytes, GuestAddress};

fn build(xml: &str) -> Vm {
    let cfg = VmConfig::parse(xml, std::path::Path::new(".")).unwrap();
    let backend = palacios::launch::backend(cfg.backend).unwrap();
    Vm::build(&cfg, &palacios::devices::registry(), backend, Arc::new(LinuxHost::new(false))).unwrap()
}

/// Real-mode guest: PIC at vector 0x20, PIT 1 kHz; counts IRQ0s at [0x500] and leaves
/// through the debug-exit port with the count once it reaches `ticks`.
fn pit_guest(ticks: u16) -> (Vec<u8>, Vec<u8>) {
    let mut h = CodeAssembler::new(16).unwrap();
    h.inc(word_ptr(0x500)).unwrap();
    h.mov(al, 0x20).unwrap();
    h.out(0x20, al).unwrap(); // non-specific EOI
    h.iret().unwrap();
    let handler = h.assemble(0x2000).unwrap();
    let mut a = CodeAssembler::new(16).unwrap();
    let mut wait = a.create_label();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(sp, 0x7000).unwrap();
    a.mov(word_ptr(0x500), 0).unwrap();
    for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0xa0, 0x11), (0xa1, 0x28), (0xa1, 0x02), (0xa1, 0x01), (0x21, 0xfe), (0xa1, 0xff)] {
        a.mov(al, v).unwrap();
        a.out(port, al).unwrap();
    }
    a.mov(al, 0x34).unwrap(); // channel 0, lo/hi, mode 2
    a.out(0x43, al).unwrap();
    a.mov(al, (1193 & 0xff) as i32).unwrap();
    a.out(0x40, al).unwrap();
    a.mov(al, (1193 >> 8) as i32).unwrap();
    a.out(0x40, al).unwrap();
    a.sti().unwrap();
    a.set_label(&mut wait).unwrap();
    a.hlt().unwrap();
    a.cmp(word_ptr(0x500), ticks as i32).unwrap();
    a.jb(wait).unwrap();
    a.cli().unwrap();
    a.movzx(eax, word_ptr(0x500)).unwrap();
    a.out(0xf4, eax).unwrap();
    a.hlt().unwrap();
    (a.assemble(0x1000).unwrap(), handler)
}

#[test]
fn pit_irq0_through_the_pic_wakes_a_halted_core() {
    if !common::kvm() {
        return;
    }
    let mut vm = build(
        r#"<vm class="PC"><memory>16</memory><devices>
             <device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/><device class="DEBUG_EXIT" id="exit"/>
           </devices></vm>"#,
    );
    let (code, handler) = pit_guest(50);
    let mem = vm.memory();
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    mem.write_slice(&handler, GuestAddress(0x2000)).unwrap();
    mem.write_obj(0x2000u16, GuestAddress(0x20 * 4)).unwrap();
    mem.write_obj(0u16, GuestAddress(0x20 * 4 + 2)).unwrap();
    vm.set_boot_state(CpuState::real_mode_at(0x1000));
    let h = vm.handle();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        h.stop(Outcome::Failed("time limit".into()));
    });
    let t = Instant::now();
    let report = vm.run();
    let wall = t.elapsed();
    match report.outcome {
        Outcome::DebugExit(n) => assert!(n >= 50, "counted {n} ticks"),
        other => panic!("unexpected outcome {other:?}"),
    }
    // 50 ticks of a 1 kHz timer cannot arrive in much less than 50 ms.
    assert!(wall.as_millis() >= 45, "50 PIT ticks in {wall:?}");
    assert!(report.telemetry.cores[0].injected >= 50);
}

#[test]
fn the_same_guest_on_kvms_in_kernel_pic_and_pit() {
    if !common::kvm() {
        return;
    }
    let mut vm = build(
        r#"<vm class="PC"><memory>16</memory><irqchip>kernel</irqchip><devices>
             <device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/><device class="DEBUG_EXIT" id="exit"/>
           </devices></vm>"#,
    );
    assert!(vm.port_bus().owner(0x40).is_none(), "the in-kernel PIT owns the timer ports");
    let (code, handler) = pit_guest(50);
    let mem = vm.memory();
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    mem.write_slice(&handler, GuestAddress(0x2000)).unwrap();
    mem.write_obj(0x2000u16, GuestAddress(0x20 * 4)).unwrap();
    mem.write_obj(0u16, GuestAddress(0x20 * 4 + 2)).unwrap();
    vm.set_boot_state(CpuState::real_mode_at(0x1000));
    let h = vm.handle();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        h.stop(Outcome::Failed("time limit".into()));
    });
    let t = Instant::now();
    let report = vm.run();
    match report.outcome {
        Outcome::DebugExit(n) => assert!(n >= 50, "counted {n} ticks"),
        other => panic!("unexpected outcome {other:?}"),
    }
    assert!(t.elapsed().as_millis() >= 45);
    assert_eq!(report.telemetry.cores[0].injected, 0, "KVM injected the interrupts itself");
}
