//! The PC platform on every backend with assembled scenario guests: PIT channel 0 through the 8259A
//! to the core, in real mode.

mod common;

use std::sync::Arc;
use std::time::Instant;

use iced_x86::code_asm::*;
use palacios::vmm::{LinuxHost, Outcome, Vm, VmConfig};
use palacios_x86::CpuState;
use vm_memory::{Bytes, GuestAddress};

fn build(xml: &str) -> Vm {
    let mut cfg = VmConfig::parse(xml, std::path::Path::new(".")).unwrap();
    if let Some(b) = palacios::vmm::config::BackendChoice::parse(common::current_backend()) {
        if common::current_backend() != "auto" {
            cfg.backend = b;
        }
    }
    let backend = palacios::launch::backend(cfg.backend).unwrap();
    Vm::build(
        &cfg,
        &palacios::devices::registry(),
        backend,
        Arc::new(LinuxHost::new(false)),
    )
    .unwrap()
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
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xfe),
        (0xa1, 0xff),
    ] {
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
    common::each_backend(|_b| {
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
    });
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
    assert!(
        vm.port_bus().owner(0x40).is_none(),
        "the in-kernel PIT owns the timer ports"
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
    match report.outcome {
        Outcome::DebugExit(n) => assert!(n >= 50, "counted {n} ticks"),
        other => panic!("unexpected outcome {other:?}"),
    }
    assert!(t.elapsed().as_millis() >= 45);
    assert_eq!(
        report.telemetry.cores[0].injected, 0,
        "KVM injected the interrupts itself"
    );
}

/// A 64-bit long-mode guest (flat GDT, identity-mapped 4 GiB) whose IDT vector `vec` runs
/// `handler`; `main` is the rest. Returns the boot state. (This machine's software KVM cannot
/// return from interrupts in 32-bit protected mode, so platform scenarios run in long mode.)
fn long_guest(
    vm: &Vm,
    vec: u8,
    handler: impl FnOnce(&mut CodeAssembler),
    main: impl FnOnce(&mut CodeAssembler),
) -> CpuState {
    let mem = vm.memory();
    let gdt: Vec<u8> = palacios_x86::segment::boot_gdt()
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    mem.write_slice(&gdt, GuestAddress(0x1000)).unwrap();
    mem.write_slice(
        &palacios_x86::paging::identity_tables(0x20000, 4),
        GuestAddress(0x20000),
    )
    .unwrap();
    let mut h = CodeAssembler::new(64).unwrap();
    handler(&mut h);
    h.iretq().unwrap();
    mem.write_slice(&h.assemble(0x4000).unwrap(), GuestAddress(0x4000))
        .unwrap();
    let lo: u64 = 0x4000 | (0x18 << 16) | (0x8e00u64 << 32);
    mem.write_obj(lo, GuestAddress(0x3000 + 16 * u64::from(vec)))
        .unwrap();
    mem.write_obj(0u64, GuestAddress(0x3000 + 16 * u64::from(vec) + 8))
        .unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    main(&mut a);
    mem.write_slice(&a.assemble(0x10000).unwrap(), GuestAddress(0x10000))
        .unwrap();
    let mut st = CpuState::reset();
    st.sregs.cs = palacios_x86::segment::flat(0x18, 0xb, true);
    for s in [
        &mut st.sregs.ds,
        &mut st.sregs.es,
        &mut st.sregs.ss,
        &mut st.sregs.fs,
        &mut st.sregs.gs,
    ] {
        *s = palacios_x86::segment::flat(0x10, 3, false);
    }
    st.sregs.tr = palacios_x86::Segment {
        limit: 0x67,
        type_: 0xb,
        present: true,
        ..Default::default()
    };
    st.sregs.gdt = palacios_x86::DescriptorTable {
        base: 0x1000,
        limit: 31,
    };
    st.sregs.idt = palacios_x86::DescriptorTable {
        base: 0x3000,
        limit: 0xfff,
    };
    st.sregs.cr0 = palacios_x86::cr0::PE | palacios_x86::cr0::ET | palacios_x86::cr0::PG;
    st.sregs.cr3 = 0x20000;
    st.sregs.cr4 = palacios_x86::cr4::PAE;
    st.sregs.efer = palacios_x86::efer::LME | palacios_x86::efer::LMA;
    st.regs.rip = 0x10000;
    st.regs.rsp = 0x7000;
    st
}

fn run_limited(vm: Vm, secs: u64) -> (palacios::vmm::vm::RunReport, std::time::Duration) {
    let h = vm.handle();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(secs));
        h.stop(Outcome::Failed("time limit".into()));
    });
    let t = Instant::now();
    let r = vm.run();
    (r, t.elapsed())
}

/// Count interrupts at [0x500] in the handler, EOI the LAPIC; main waits for `n` and exits.
fn count_and_exit(a: &mut CodeAssembler, n: u32) {
    let mut wait = a.create_label();
    a.sti().unwrap();
    a.set_label(&mut wait).unwrap();
    a.hlt().unwrap();
    a.cmp(dword_ptr(0x500), n).unwrap();
    a.jb(wait).unwrap();
    a.cli().unwrap();
    a.mov(eax, dword_ptr(0x500)).unwrap();
    a.out(0xf4, eax).unwrap();
    a.hlt().unwrap();
}

fn count_handler64(h: &mut CodeAssembler) {
    h.push(rax).unwrap();
    h.inc(dword_ptr(0x500)).unwrap();
    h.mov(eax, 0xfee0_00b0u32).unwrap();
    h.mov(dword_ptr(rax), 0).unwrap(); // LAPIC EOI
    h.pop(rax).unwrap();
}

const APIC_PLATFORM: &str = r#"<vm class="PC"><memory>16</memory><devices>
    <device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/>
    <device class="LAPIC" id="lapic"/><device class="IOAPIC" id="ioapic"/><device class="DEBUG_EXIT" id="exit"/>
  </devices></vm>"#;

#[test]
fn lapic_periodic_timer() {
    common::each_backend(|_b| {
        let mut vm = build(APIC_PLATFORM);
        let st = long_guest(&vm, 0x40, count_handler64, |a| {
            a.mov(ebx, 0xfee0_0000u32).unwrap();
            a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap(); // SVR: enable, spurious 0xff
            a.mov(dword_ptr(rbx + 0x3e0), 0xb).unwrap(); // divide by 1
            a.mov(dword_ptr(rbx + 0x320), 0x20040).unwrap(); // periodic, vector 0x40
            a.mov(dword_ptr(rbx + 0x380), 1_000_000).unwrap(); // 1 ms at the 1 GHz APIC clock
            count_and_exit(a, 20);
        });
        vm.set_boot_state(st);
        let (r, wall) = run_limited(vm, 60);
        assert!(
            matches!(r.outcome, Outcome::DebugExit(n) if n >= 20),
            "{:?} {}",
            r.outcome,
            r.telemetry.render()
        );
        assert!(wall.as_millis() >= 18, "20 periods of 1 ms in {wall:?}");
    });
}

#[test]
fn pit_through_the_ioapic_and_self_ipi() {
    common::each_backend(|_b| {
        let mut vm = build(APIC_PLATFORM);
        let st = long_guest(&vm, 0x40, count_handler64, |a| {
            a.mov(al, 0xff).unwrap();
            a.out(0x21, al).unwrap(); // PIC fully masked
            a.out(0xa1, al).unwrap();
            a.mov(ebx, 0xfee0_0000u32).unwrap();
            a.mov(ecx, 0xfec0_0000u32).unwrap();
            a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
            // A self-IPI first: vector 0x40 with the "self" shorthand.
            a.mov(dword_ptr(rbx + 0x300), 0x40040).unwrap();
            // IOAPIC pin 2 (ISA IRQ0): vector 0x40, edge, physical dest 0.
            a.mov(dword_ptr(rcx), 0x14).unwrap();
            a.mov(dword_ptr(rcx + 0x10), 0x40).unwrap();
            a.mov(dword_ptr(rcx), 0x15).unwrap();
            a.mov(dword_ptr(rcx + 0x10), 0).unwrap();
            a.mov(al, 0x34).unwrap();
            a.out(0x43, al).unwrap();
            a.mov(al, (1193 & 0xff) as i32).unwrap();
            a.out(0x40, al).unwrap();
            a.mov(al, (1193 >> 8) as i32).unwrap();
            a.out(0x40, al).unwrap();
            count_and_exit(a, 21);
        });
        vm.set_boot_state(st);
        let (r, wall) = run_limited(vm, 60);
        assert!(
            matches!(r.outcome, Outcome::DebugExit(n) if n >= 21),
            "{:?} {}",
            r.outcome,
            r.telemetry.render()
        );
        assert!(wall.as_millis() >= 18);
    });
}

#[test]
fn tsc_deadline_and_x2apic_through_trapped_msrs() {
    common::each_backend(|_b| {
        let mut vm = build(APIC_PLATFORM);
        let st = long_guest(&vm, 0x40, count_handler_x2apic, |a| {
            // x2APIC on: IA32_APIC_BASE |= EXTD (bit 10).
            a.mov(ecx, 0x1b).unwrap();
            a.rdmsr().unwrap();
            a.or(eax, 0x400).unwrap();
            a.wrmsr().unwrap();
            // SVR through MSR 0x80f.
            a.mov(ecx, 0x80f).unwrap();
            a.mov(eax, 0x1ff).unwrap();
            a.xor(edx, edx).unwrap();
            a.wrmsr().unwrap();
            // Self IPI through MSR 0x83f: one interrupt.
            a.mov(ecx, 0x83f).unwrap();
            a.mov(eax, 0x40).unwrap();
            a.wrmsr().unwrap();
            // LVT timer in TSC-deadline mode (0x832), vector 0x40; deadline = now + 1M cycles.
            a.mov(ecx, 0x832).unwrap();
            a.mov(eax, 0x40040).unwrap();
            a.wrmsr().unwrap();
            a.rdtsc().unwrap();
            a.add(eax, 1_000_000).unwrap();
            a.adc(edx, 0).unwrap();
            a.mov(ecx, 0x6e0).unwrap();
            a.wrmsr().unwrap();
            count_and_exit(a, 2);
        });
        vm.set_boot_state(st);
        let (r, _) = run_limited(vm, 60);
        assert!(
            matches!(r.outcome, Outcome::DebugExit(2)),
            "{:?} {}",
            r.outcome,
            r.telemetry.render()
        );
        assert!(
            r.telemetry.cores[0].count(palacios::vmm::backend::ExitKind::MsrWrite) >= 5,
            "{}",
            r.telemetry.render()
        );
    });
}

/// Count, then EOI through the x2APIC EOI MSR (0x80b).
fn count_handler_x2apic(h: &mut CodeAssembler) {
    h.push(rax).unwrap();
    h.push(rcx).unwrap();
    h.push(rdx).unwrap();
    h.inc(dword_ptr(0x500)).unwrap();
    h.mov(ecx, 0x80b).unwrap();
    h.xor(eax, eax).unwrap();
    h.xor(edx, edx).unwrap();
    h.wrmsr().unwrap();
    h.pop(rdx).unwrap();
    h.pop(rcx).unwrap();
    h.pop(rax).unwrap();
}

#[test]
fn init_sipi_brings_up_four_cores_with_their_apic_ids() {
    common::each_backend(|_b| {
        let mut vm = build(&APIC_PLATFORM.replace(
            "<memory>16</memory>",
            "<memory>16</memory><cores count=\"4\"/>",
        ));
        // AP trampoline at 0x8000 (SIPI vector 8), real mode: mark its CPUID APIC ID, count, halt.
        let mut t = CodeAssembler::new(16).unwrap();
        t.xor(ax, ax).unwrap();
        t.mov(ds, ax).unwrap();
        t.mov(eax, 1).unwrap();
        t.cpuid().unwrap();
        t.shr(ebx, 24).unwrap();
        t.mov(byte_ptr(bx + 0x610), 1).unwrap();
        t.lock().inc(word_ptr(0x600)).unwrap();
        t.cli().unwrap();
        t.hlt().unwrap();
        vm.memory()
            .write_slice(&t.assemble(0x8000).unwrap(), GuestAddress(0x8000))
            .unwrap();
        let st = long_guest(&vm, 0x40, count_handler64, |a| {
            let mut wait = a.create_label();
            a.mov(ebx, 0xfee0_0000u32).unwrap();
            a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
            a.mov(dword_ptr(rbx + 0x300), 0xc4500).unwrap(); // INIT, all excluding self
            a.mov(dword_ptr(rbx + 0x300), 0xc4608).unwrap(); // STARTUP vector 8
            a.mov(dword_ptr(rbx + 0x300), 0xc4608).unwrap(); // and again, as the MP spec says
            a.set_label(&mut wait).unwrap();
            a.pause().unwrap();
            a.cmp(word_ptr(0x600), 3).unwrap();
            a.jb(wait).unwrap();
            a.mov(eax, dword_ptr(0x610)).unwrap(); // bytes for APIC IDs 0..3
            a.out(0xf4, eax).unwrap();
            a.hlt().unwrap();
        });
        vm.set_boot_state(st);
        let (r, _) = run_limited(vm, 60);
        // APIC IDs 1, 2 and 3 checked in (byte 0, the BSP's, stays 0).
        assert_eq!(
            r.outcome,
            Outcome::DebugExit(0x0101_0100),
            "{}",
            r.telemetry.render()
        );
        assert_eq!(r.telemetry.cores.len(), 4);
    });
}

const FULL_PC: &str = r#"<vm class="PC"><memory>64</memory><cores count="2"/><devices>
    <device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/>
    <device class="LAPIC" id="lapic"/><device class="IOAPIC" id="ioapic"/><device class="MPTABLE" id="mp"/>
    <device class="NVRAM" id="nvram"/><device class="KEYBOARD" id="kbd"/><device class="FW_CFG" id="fw"/>
    <device class="PC_TESTDEV" id="testdev"/><device class="DEBUG_EXIT" id="exit"/>
  </devices></vm>"#;

/// Real-mode guest from `f`, run to its debug-exit value.
fn real_mode_value(xml: &str, f: impl FnOnce(&mut CodeAssembler)) -> Outcome {
    let mut vm = build(xml);
    let mut a = CodeAssembler::new(16).unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    f(&mut a);
    a.out(dx, eax).unwrap();
    a.hlt().unwrap();
    vm.memory()
        .write_slice(&a.assemble(0x1000).unwrap(), GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_state(CpuState::real_mode_at(0x1000));
    run_limited(vm, 60).0.outcome
}

#[test]
fn fw_cfg_signature_and_cpu_count() {
    common::each_backend(|_b| {
        let out = real_mode_value(FULL_PC, |a| {
            a.mov(dx, 0x510).unwrap();
            a.mov(ax, 0x0000).unwrap();
            a.out(dx, ax).unwrap();
            a.mov(dx, 0x511).unwrap();
            for i in 0..4 {
                a.in_(al, dx).unwrap();
                a.mov(byte_ptr(0x700 + i), al).unwrap();
            }
            a.mov(dx, 0x510).unwrap();
            a.mov(ax, 0x0005).unwrap();
            a.out(dx, ax).unwrap();
            a.mov(dx, 0x511).unwrap();
            a.in_(al, dx).unwrap();
            a.mov(byte_ptr(0x704), al).unwrap();
            // "QEMU" compared as a dword; exit value = cpu count if it matched, else 0xbad.
            a.mov(ebx, 0xbad).unwrap();
            a.movzx(eax, byte_ptr(0x704)).unwrap();
            a.cmp(dword_ptr(0x700), 0x554d_4551).unwrap();
            a.cmovne(eax, ebx).unwrap();
            a.mov(dx, 0xf4).unwrap();
        });
        assert_eq!(out, Outcome::DebugExit(2));
    });
}

#[test]
fn cmos_memory_size_and_rtc_registers() {
    common::each_backend(|_b| {
        let out = real_mode_value(FULL_PC, |a| {
            // 0x34/0x35: 64 KiB units above 16 MiB; register D bit 7 (valid RAM and time).
            a.mov(al, 0x35).unwrap();
            a.out(0x70, al).unwrap();
            a.in_(al, 0x71).unwrap();
            a.mov(ah, al).unwrap();
            a.mov(al, 0x34).unwrap();
            a.out(0x70, al).unwrap();
            a.in_(al, 0x71).unwrap();
            a.movzx(ebx, ax).unwrap();
            a.mov(al, 0x0d).unwrap();
            a.out(0x70, al).unwrap();
            a.in_(al, 0x71).unwrap();
            a.movzx(eax, al).unwrap();
            a.shl(eax, 16).unwrap();
            a.or(eax, ebx).unwrap();
            a.mov(dx, 0xf4).unwrap();
        });
        // 64 MiB: (64 - 16) MiB / 64 KiB = 768 = 0x300; register D = 0x80.
        assert_eq!(out, Outcome::DebugExit(0x80_0300));
    });
}

#[test]
fn i8042_reset_line_ends_the_vm() {
    common::each_backend(|_b| {
        let out = real_mode_value(FULL_PC, |a| {
            a.mov(al, 0xfe).unwrap();
            a.out(0x64, al).unwrap();
            // Not reached: the VM ends on the pulse. A 7 here would fail the test.
            a.mov(eax, 7).unwrap();
            a.mov(dx, 0xf4).unwrap();
        });
        assert_eq!(out, Outcome::Reset);
    });
}

#[test]
fn mp_table_describes_the_cores() {
    common::each_backend(|_b| {
        let vm = build(FULL_PC);
        let mut buf = vec![0u8; 1024];
        vm.memory()
            .read_slice(&mut buf, GuestAddress(0x9fc00))
            .unwrap();
        let parsed = palacios::devices::pc::chips::mptable::parse(&buf).unwrap();
        assert_eq!(parsed.processors.len(), 2);
        assert_eq!(parsed.ioapics.len(), 1);
    });
}

#[test]
fn testdev_level_irq_keeps_remote_irr_until_lowered() {
    common::each_backend(|_b| {
        let mut vm = build(FULL_PC);
        // Handler: count; the first time, read the redirection entry of pin 10 (remote IRR is bit
        // 14) into [0x508]; on the third delivery lower the line. EOI every time.
        let st = long_guest(
            &vm,
            0x60,
            |h| {
                let mut skip = h.create_label();
                let mut keep = h.create_label();
                h.push(rax).unwrap();
                h.push(rcx).unwrap();
                h.push(rdx).unwrap();
                h.inc(dword_ptr(0x500)).unwrap();
                h.mov(ecx, 0xfec0_0000u32).unwrap();
                h.mov(dword_ptr(rcx), 0x10 + 2 * 10).unwrap();
                h.mov(eax, dword_ptr(rcx + 0x10)).unwrap();
                h.cmp(dword_ptr(0x500), 1).unwrap();
                h.jne(skip).unwrap();
                h.mov(dword_ptr(0x508), eax).unwrap();
                h.set_label(&mut skip).unwrap();
                h.cmp(dword_ptr(0x500), 3).unwrap();
                h.jne(keep).unwrap();
                h.mov(dx, 0x200a).unwrap();
                h.mov(al, 0).unwrap();
                h.out(dx, al).unwrap();
                h.set_label(&mut keep).unwrap();
                h.mov(eax, 0xfee0_00b0u32).unwrap();
                h.mov(dword_ptr(rax), 0).unwrap();
                h.pop(rdx).unwrap();
                h.pop(rcx).unwrap();
                h.pop(rax).unwrap();
            },
            |a| {
                let mut wait = a.create_label();
                a.mov(ebx, 0xfee0_0000u32).unwrap();
                a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
                // IOAPIC pin 10: vector 0x60, level triggered (bit 15), dest 0.
                a.mov(ecx, 0xfec0_0000u32).unwrap();
                a.mov(dword_ptr(rcx), 0x10 + 2 * 10).unwrap();
                a.mov(dword_ptr(rcx + 0x10), 0x8060).unwrap();
                a.mov(dword_ptr(rcx), 0x11 + 2 * 10).unwrap();
                a.mov(dword_ptr(rcx + 0x10), 0).unwrap();
                a.mov(dx, 0x200a).unwrap();
                a.mov(al, 1).unwrap();
                a.out(dx, al).unwrap();
                a.sti().unwrap();
                // Wait for three deliveries, then a while longer to see that no fourth comes.
                a.set_label(&mut wait).unwrap();
                a.cmp(dword_ptr(0x500), 3).unwrap();
                a.jb(wait).unwrap();
                a.mov(ecx, 200_000).unwrap();
                let mut spin = a.create_label();
                a.set_label(&mut spin).unwrap();
                a.pause().unwrap();
                a.dec(ecx).unwrap();
                a.jnz(spin).unwrap();
                a.cli().unwrap();
                // Exit value: count | remote-IRR bit seen in the first delivery << 8.
                a.mov(eax, dword_ptr(0x508)).unwrap();
                a.shr(eax, 14).unwrap();
                a.and(eax, 1).unwrap();
                a.shl(eax, 8).unwrap();
                a.or(eax, dword_ptr(0x500)).unwrap();
                a.out(0xf4, eax).unwrap();
                a.hlt().unwrap();
            },
        );
        vm.set_boot_state(st);
        let (r, _) = run_limited(vm, 60);
        assert_eq!(
            r.outcome,
            Outcome::DebugExit(0x103),
            "three deliveries while high, remote IRR set during service"
        );
    });
}

#[test]
fn apic_base_relocates_and_disables() {
    common::each_backend(|_b| {
        let mut vm = build(APIC_PLATFORM);
        let st = long_guest(&vm, 0x40, count_handler64, |a| {
            // Move the APIC to 0xfed00000 (enable | BSP kept).
            a.mov(ecx, 0x1b).unwrap();
            a.mov(eax, 0xfed0_0900u32).unwrap();
            a.xor(edx, edx).unwrap();
            a.wrmsr().unwrap();
            a.mov(ebx, 0xfed0_0000u32).unwrap();
            a.mov(esi, dword_ptr(rbx + 0x30)).unwrap(); // version at the new base
            a.mov(ebx, 0xfee0_0000u32).unwrap();
            a.mov(edi, dword_ptr(rbx + 0x30)).unwrap(); // old base: nothing there now
            // Disable globally: the page stops decoding.
            a.mov(eax, 0xfed0_0100u32).unwrap();
            a.wrmsr().unwrap();
            a.mov(ebx, 0xfed0_0000u32).unwrap();
            a.mov(ebp, dword_ptr(rbx + 0x30)).unwrap();
            // Exit value: low byte of each read (version 0x14, 0xff, 0xff).
            a.movzx(eax, si).unwrap();
            a.and(eax, 0xff).unwrap();
            a.and(edi, 0xff).unwrap();
            a.shl(edi, 8).unwrap();
            a.or(eax, edi).unwrap();
            a.and(ebp, 0xff).unwrap();
            a.shl(ebp, 16).unwrap();
            a.or(eax, ebp).unwrap();
            a.out(0xf4, eax).unwrap();
            a.hlt().unwrap();
        });
        vm.set_boot_state(st);
        let (r, _) = run_limited(vm, 60);
        assert_eq!(
            r.outcome,
            Outcome::DebugExit(0xff_ff14),
            "{}",
            r.telemetry.render()
        );
    });
}

/// The emulator's CPU model is configurable: `<cpu hide="...">` takes features out of CPUID.
#[test]
fn cpu_features_can_be_hidden_on_the_emulator() {
    let x2apic_bit = |xml: &str| {
        real_mode_value(xml, |a| {
            a.mov(eax, 1).unwrap();
            a.cpuid().unwrap();
            a.mov(eax, ecx).unwrap();
            a.shr(eax, 21).unwrap();
            a.and(eax, 1).unwrap();
            a.mov(dx, 0xf4).unwrap();
        })
    };
    let base = r#"<vm class="PC"><backend>emu</backend><memory>16</memory>
        <devices><device class="DEBUG_EXIT" id="exit"/></devices>"#;
    assert_eq!(x2apic_bit(&format!("{base}</vm>")), Outcome::DebugExit(1));
    assert_eq!(
        x2apic_bit(&format!(r#"{base}<cpu hide="x2apic, popcnt"/></vm>"#)),
        Outcome::DebugExit(0)
    );
    let err = palacios::vmm::VmConfig::parse(
        r#"<vm class="PC"><cpu hide="avx512"/></vm>"#,
        std::path::Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unknown CPU feature 'avx512'") && err.contains("1:"),
        "{err}"
    );
}

/// The quick form (`v3 run --kernel`) is the standard PC, ACPI included: its RSDP is in the
/// BIOS area where a guest looks for it.
#[test]
fn quick_form_has_acpi_tables() {
    let cfg =
        palacios::platform::standard_pc(64, 1, palacios::vmm::config::BackendChoice::Emu, None);
    assert!(
        cfg.devices.iter().any(|d| d.class == "ACPI"),
        "{:?}",
        cfg.devices
    );
    let backend = palacios::launch::backend(cfg.backend).unwrap();
    let vm = Vm::build(
        &cfg,
        &palacios::registry(),
        backend,
        Arc::new(LinuxHost::new(false)),
    )
    .unwrap();
    let mut bios = vec![0u8; 0x20000];
    vm.memory()
        .read_slice(&mut bios, GuestAddress(0xe0000))
        .unwrap();
    assert!(
        bios.chunks(16).any(|c| c.starts_with(b"RSD PTR ")),
        "no RSDP in 0xE0000-0xFFFFF"
    );
}

/// A panic on a vCPU thread (here an extension's exit hook; the same for an interpreted
/// handler or a device) ends the VM with a failure that says so, on every backend, instead
/// of leaving `v3` waiting for the core's outcome.
#[test]
fn a_panic_on_a_vcpu_thread_fails_the_vm() {
    use palacios::vmm::backend::Exit;
    use palacios::vmm::config::ExtensionConfig;
    use palacios::vmm::extension::{CoreCtx, CoreHooks, ExitAction, Extension, ExtensionClass};
    use palacios::vmm::{BuildCtx, ConfigError, DeviceOption};
    struct Boom;
    impl CoreHooks for Boom {
        fn on_exit(&mut self, _: &mut CoreCtx, exit: &Exit) -> ExitAction {
            if matches!(exit, Exit::IoOut { port: 0x80, .. }) {
                panic!("boom at port 0x80");
            }
            ExitAction::Continue
        }
    }
    struct BoomExt;
    impl Extension for BoomExt {
        fn core(&self, _: u32) -> Option<Box<dyn CoreHooks>> {
            Some(Box::new(Boom))
        }
    }
    struct BoomClass;
    impl ExtensionClass for BoomClass {
        fn name(&self) -> &'static str {
            "boom"
        }
        fn help(&self) -> &'static str {
            "panics at an OUT to port 0x80 (test)"
        }
        fn options(&self) -> &'static [DeviceOption] {
            &[]
        }
        fn create(
            &self,
            _: &mut BuildCtx,
            _: &ExtensionConfig,
        ) -> Result<Arc<dyn Extension>, ConfigError> {
            Ok(Arc::new(BoomExt))
        }
    }
    common::each_backend(|b| {
        let mut reg = palacios::registry();
        reg.register_extension(Box::new(BoomClass));
        let cfg = VmConfig::parse(
            &format!(
                r#"<vm class="PC"><memory>16</memory><backend>{b}</backend>
                 <extensions><extension name="boom"/></extensions><devices/></vm>"#
            ),
            std::path::Path::new("."),
        )
        .unwrap();
        let backend = palacios::launch::backend(cfg.backend).unwrap();
        let mut vm = Vm::build(&cfg, &reg, backend, Arc::new(LinuxHost::new(false))).unwrap();
        // out 0x80, al ; hlt
        vm.memory()
            .write_slice(&[0xe6, 0x80, 0xf4], GuestAddress(0x1000))
            .unwrap();
        vm.set_boot_state(CpuState::real_mode_at(0x1000));
        let h = vm.handle();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(60));
            h.stop(Outcome::Failed("time limit".into()));
        });
        let r = vm.run();
        match r.outcome {
            Outcome::Failed(m) => {
                assert!(
                    m.contains("internal error on vCPU 0") && m.contains("boom"),
                    "{m}"
                )
            }
            o => panic!("{b}: {o:?}"),
        }
    });
}

/// `STI; HLT` with TF set: the single-step #DB after HLT is delivered (its handler runs with
/// IF clear), and the VM goes on instead of ending as "halted with interrupts disabled".
#[test]
fn sti_hlt_with_tf_single_steps_instead_of_ending() {
    common::each_backend(|_b| {
        let mut vm = build(
            r#"<vm class="PC"><memory>16</memory><devices>
                 <device class="DEBUG_EXIT" id="exit"/>
               </devices></vm>"#,
        );
        // #DB handler: count at [0x500].
        let mut h = CodeAssembler::new(16).unwrap();
        h.inc(word_ptr(0x500)).unwrap();
        h.iret().unwrap();
        let handler = h.assemble(0x2000).unwrap();
        let mut a = CodeAssembler::new(16).unwrap();
        a.xor(ax, ax).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(sp, 0x7000).unwrap();
        a.mov(word_ptr(0x500), 0).unwrap();
        a.pushf().unwrap();
        a.pop(ax).unwrap();
        a.or(ax, 0x100).unwrap();
        a.push(ax).unwrap();
        a.popf().unwrap(); // TF on: a #DB after each instruction from the next one
        a.sti().unwrap();
        a.hlt().unwrap();
        a.pushf().unwrap();
        a.pop(ax).unwrap();
        a.and(ax, !0x100).unwrap();
        a.push(ax).unwrap();
        a.popf().unwrap();
        a.cli().unwrap();
        a.movzx(eax, word_ptr(0x500)).unwrap();
        a.out(0xf4, eax).unwrap();
        a.hlt().unwrap();
        let code = a.assemble(0x1000).unwrap();
        let mem = vm.memory();
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&handler, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x2000u16, GuestAddress(4)).unwrap();
        mem.write_obj(0u16, GuestAddress(6)).unwrap();
        vm.set_boot_state(CpuState::real_mode_at(0x1000));
        let hd = vm.handle();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(60));
            hd.stop(Outcome::Failed("time limit".into()));
        });
        match vm.run().outcome {
            // #DBs after STI, HLT, PUSHF, POP, AND, PUSH and the POPF that clears TF.
            Outcome::DebugExit(n) => assert_eq!(n, 7, "single-step traps"),
            o => panic!("{_b}: {o:?}"),
        }
    });
}
