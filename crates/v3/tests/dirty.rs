//! Dirty-page tracking: every path that writes guest memory marks the page, on both backends.
//! A 64-bit guest writes with a plain store (the interpreter, then the block translator once
//! the loop is hot), REP STOSB, FXSAVE and PUSH; devices and the VMM write through vm-memory;
//! a loader writes an image. After a round is taken, the same stores mark again.

mod common;

use std::sync::Arc;

use iced_x86::code_asm::*;
use palacios::vmm::backend::{Backend, Exit, Vcpu};
use palacios::vmm::dirty::DirtyLog;
use palacios::vmm::{GuestMem, MemoryMap};
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x10_0000;
const A: u64 = 0x20_0000; // plain store
const S: u64 = 0x20_1000; // REP STOSB
const F: u64 = 0x20_2000; // FXSAVE
const STACK: u64 = 0x20_4000; // PUSH writes the page below
const L: u64 = 0x20_5000; // a hot loop's store (translated)
const DMA: u64 = 0x20_6000;
const LOADED: u64 = 0x30_0000;

fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut l1 = a.create_label();
    let mut l2 = a.create_label();
    a.mov(rsp, STACK).unwrap();
    a.mov(rax, A).unwrap();
    a.mov(byte_ptr(rax), 1).unwrap();
    a.mov(rdi, S).unwrap();
    a.mov(rcx, 100u64).unwrap();
    a.mov(al, 7).unwrap();
    a.rep().stosb().unwrap();
    a.mov(rax, F).unwrap();
    a.fxsave(ptr(rax)).unwrap();
    a.push(rax).unwrap();
    a.mov(r8, L).unwrap();
    a.mov(rcx, 2000u64).unwrap();
    a.set_label(&mut l1).unwrap();
    a.mov(qword_ptr(r8), rcx).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(l1).unwrap();
    a.out(0xe9, al).unwrap();
    // Second phase: only the hot loop writes (its block is translated by now).
    a.mov(rcx, 2000u64).unwrap();
    a.set_label(&mut l2).unwrap();
    a.mov(qword_ptr(r8), rcx).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(l2).unwrap();
    a.out(0xe9, al).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

fn until_out(v: &mut dyn Vcpu) {
    for _ in 0..100_000 {
        match v.run().unwrap() {
            Exit::IoOut { port: 0xe9, .. } => return,
            Exit::Interrupted | Exit::IrqWindowOpen => continue,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("no output from the guest");
}

fn pages(log: &DirtyLog) -> Vec<u64> {
    log.take().iter().filter_map(|p| log.page_gpa(p)).collect()
}

fn run(backend: Box<dyn Backend>) {
    let map = MemoryMap::pc(16 << 20);
    let mem: GuestMem = map.create_memory().unwrap();
    let log = Arc::new(DirtyLog::new(&mem));
    palacios::vmm::write_watch::attach_dirty_log(&mem, log.clone());
    backend.map_memory(&mem).unwrap();
    let image = palacios::boot::elf::build_test_elf(true, CODE, &[(CODE, &guest(), 0x1000)]);
    let params = |image| palacios::boot::BootParams {
        format: palacios::vmm::config::BootFormat::Elf64,
        image,
        load_addr: None,
        entry: None,
        cmdline: "",
        modules: vec![],
    };
    let state = palacios::boot::load(&mem, &map, &params(&image)).unwrap();
    let mut v = backend.create_vcpu(0).unwrap();
    v.set_state(&state).unwrap();
    // Tracking starts after the load (whose writes are not part of this round).
    log.set_enabled(true);
    backend.set_dirty_log(Some(log.clone())).unwrap();
    backend.collect_dirty(&log).unwrap();
    let _ = log.take();

    until_out(v.as_mut());
    backend.collect_dirty(&log).unwrap();
    let first = pages(&log);
    v.sync_dirty();
    for (what, gpa) in [
        ("a plain store", A),
        ("REP STOSB", S),
        ("FXSAVE", F),
        ("PUSH", STACK - 0x1000),
        ("the hot loop's store", L),
    ] {
        assert!(
            first.contains(&gpa),
            "{what} at {gpa:#x} was not marked: {first:x?}"
        );
    }
    // The next round: only the loop writes, from translated code on the emulator.
    until_out(v.as_mut());
    backend.collect_dirty(&log).unwrap();
    let second = pages(&log);
    v.sync_dirty();
    assert!(
        second.contains(&L),
        "a store after the round was not marked again: {second:x?}"
    );
    for gpa in [A, S, F] {
        assert!(
            !second.contains(&gpa),
            "{gpa:#x} was not written in the second round: {second:x?}"
        );
    }
    if backend.name() == "emu" {
        let stats = v.stats();
        let translated = stats
            .iter()
            .find(|(n, _)| n == "emu blocks translated")
            .map(|s| s.1)
            .unwrap_or(0);
        assert!(translated > 0, "the loop was not translated: {stats:?}");
    }
    // A device's DMA and the VMM write through vm-memory.
    mem.write_obj(0x55aa_u16, GuestAddress(DMA + 0xfff))
        .unwrap();
    let dma = pages(&log);
    assert_eq!(
        dma,
        vec![DMA, DMA + 0x1000],
        "a write across a page boundary marks both"
    );
    // A loader.
    let image2 =
        palacios::boot::elf::build_test_elf(true, LOADED, &[(LOADED, &[0x90; 0x2100], 0x2100)]);
    palacios::boot::load(&mem, &map, &params(&image2)).unwrap();
    let loaded = pages(&log);
    for gpa in [LOADED, LOADED + 0x1000, LOADED + 0x2000] {
        assert!(
            loaded.contains(&gpa),
            "the loader's write at {gpa:#x} was not marked: {loaded:x?}"
        );
    }
    // Off: nothing is marked.
    log.set_enabled(false);
    backend.set_dirty_log(None).unwrap();
    mem.write_obj(1u8, GuestAddress(DMA)).unwrap();
    assert!(pages(&log).is_empty());
}

#[test]
fn every_write_path_marks_its_page_on_the_emulator() {
    run(Box::new(palacios_emu::EmuBackend::new(
        palacios_emu::EmuOptions {
            jit_threshold: Some(16),
            ..Default::default()
        },
    )));
}

#[test]
fn every_write_path_marks_its_page_on_kvm() {
    if !common::kvm() {
        return;
    }
    run(Box::new(palacios::kvm::KvmBackend::new("kvm").unwrap()));
}
