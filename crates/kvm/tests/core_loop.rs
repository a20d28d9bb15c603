//! The core's exit loop on KVM: a VM composed through the registry with an embedder's own device
//! class, an interrupt controller feeding vectors, HLT that sleeps until an interrupt arrives,
//! and a clean end with telemetry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use iced_x86::code_asm::*;
use palacios_kvm::{KvmBackend, probe};
use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::VectorQueue;
use palacios_vmm::{
    BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption, LinuxHost, Outcome, Registry, Vm,
    VmConfig,
};
use palacios_x86::CpuState;
use vm_memory::{Bytes, GuestAddress};

struct Recorder(Arc<Mutex<Vec<u8>>>);
impl BusDevice for Recorder {
    fn read(&mut self, _: u64, d: &mut [u8]) {
        d.fill(0);
    }
    fn write(&mut self, _: u64, d: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(d);
    }
}

struct RecorderClass(Arc<Mutex<Vec<u8>>>);
impl DeviceClass for RecorderClass {
    fn name(&self) -> &'static str {
        "RECORDER"
    }
    fn help(&self) -> &'static str {
        "test: records port 0xe9"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        ctx.add_ports(
            0xe9,
            1,
            &dev.id,
            Arc::new(Mutex::new(Recorder(self.0.clone()))),
        )
    }
}

#[test]
fn halted_core_sleeps_until_an_interrupt_is_injected() {
    if let Some(r) = probe() {
        palacios_vmm::test_support::skip_machine("core_loop", &format!("KVM unavailable: {r}"));
        return;
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut reg = Registry::new();
    reg.register(Box::new(RecorderClass(out.clone())));
    let cfg = VmConfig::parse(
        "<vm class=\"PC\"><memory>16</memory><telemetry>enable</telemetry><devices><device class=\"RECORDER\" id=\"rec\"/></devices></vm>",
        std::path::Path::new("."),
    )
    .unwrap();
    let backend = Box::new(KvmBackend::new("kvm").unwrap());
    let mut vm = Vm::build(&cfg, &reg, backend, Arc::new(LinuxHost::new(false))).unwrap();

    let mem = vm.memory();
    mem.write_obj(0x2000u16, GuestAddress(0x30 * 4)).unwrap();
    mem.write_obj(0u16, GuestAddress(0x30 * 4 + 2)).unwrap();
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(al, b'I' as i32).unwrap();
    a.out(0xe9, al).unwrap();
    a.iret().unwrap();
    mem.write_slice(&a.assemble(0x2000).unwrap(), GuestAddress(0x2000))
        .unwrap();
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(sp, 0x7000).unwrap();
    a.mov(al, b'A' as i32).unwrap();
    a.out(0xe9, al).unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.mov(al, b'B' as i32).unwrap();
    a.out(0xe9, al).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    mem.write_slice(&a.assemble(0x1000).unwrap(), GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_state(CpuState::real_mode_at(0x1000));

    let handle = vm.handle();
    let queue = Arc::new(VectorQueue::new(1, handle.wakers().clone()));
    vm.set_interrupt_controller(queue.clone());
    let out2 = out.clone();
    let feeder = std::thread::spawn(move || {
        // Wait until the guest is halted with IF=1, then give it a moment of idling.
        for _ in 0..3000 {
            if out2.lock().unwrap().as_slice() == b"A" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        let seen = out2.lock().unwrap().clone();
        queue.push(0, 0x30);
        seen
    });
    let watchdog = handle.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        watchdog.stop(Outcome::Failed("test time limit".into()));
    });
    let report = vm.run();
    let before_injection = feeder.join().unwrap();
    assert_eq!(report.outcome, Outcome::Halted);
    assert_eq!(
        before_injection, b"A",
        "nothing ran while the core was halted"
    );
    assert_eq!(out.lock().unwrap().as_slice(), b"AIB");
    let core = &report.telemetry.cores[0];
    assert_eq!(core.injected, 1);
    assert!(
        core.count(palacios_vmm::backend::ExitKind::Hlt) <= 3,
        "HLT does not spin: {core:?}"
    );
    assert!(report.print_telemetry);
}

#[test]
fn stop_from_the_control_channel_ends_a_busy_guest() {
    if let Some(r) = probe() {
        palacios_vmm::test_support::skip_machine("core_loop", &format!("KVM unavailable: {r}"));
        return;
    }
    let cfg = VmConfig::parse(
        "<vm class=\"PC\"><memory>16</memory><cores count=\"2\"/></vm>",
        std::path::Path::new("."),
    )
    .unwrap();
    let backend = Box::new(KvmBackend::new("kvm").unwrap());
    let mut vm = Vm::build(
        &cfg,
        &Registry::new(),
        backend,
        Arc::new(LinuxHost::new(false)),
    )
    .unwrap();
    // An endless loop of port writes nobody claims.
    let mut a = CodeAssembler::new(16).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.out(0x80, al).unwrap();
    a.jmp(top).unwrap();
    vm.memory()
        .write_slice(&a.assemble(0x1000).unwrap(), GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_state(CpuState::real_mode_at(0x1000));
    let h = vm.handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let took = h.pause(Duration::from_secs(5)).expect("pause");
        assert!(took < Duration::from_secs(1), "pause took {took:?}");
        assert!(h.is_paused());
        std::thread::sleep(Duration::from_millis(100));
        h.resume();
        std::thread::sleep(Duration::from_millis(100));
        h.stop(Outcome::Stopped);
    });
    let report = vm.run();
    stopper.join().unwrap();
    assert_eq!(report.outcome, Outcome::Stopped);
    assert_eq!(report.telemetry.cores.len(), 2, "both vCPU threads joined");
    assert!(
        report
            .telemetry
            .unclaimed_ports
            .iter()
            .any(|&(p, n)| p == 0x80 && n > 10),
        "{:?}",
        report.telemetry.unclaimed_ports
    );
}
