//! Code cached by the emulator is dropped when something other than the guest — a device's
//! DMA or the VMM, writing through vm-memory — changes the page it was decoded from.

use palacios_emu::EmuBackend;
use palacios_vmm::MemoryMap;
use palacios_vmm::backend::{Backend, Exit};
use palacios_x86::CpuState;
use vm_memory::{Bytes, GuestAddress};

fn next_out(vcpu: &mut dyn palacios_vmm::Vcpu) -> u8 {
    for _ in 0..1000 {
        match vcpu.run().unwrap() {
            Exit::IoOut { port: 0xe9, data } => return data.as_slice()[0],
            Exit::Interrupted => continue,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("no output");
}

#[test]
fn a_vmm_write_to_cached_code_is_seen_by_the_guest() {
    let mem = MemoryMap::pc(16 << 20).create_memory().unwrap();
    // L: mov al, 0x11 ; out 0xe9, al ; jmp L
    mem.write_slice(&[0xb0, 0x11, 0xe6, 0xe9, 0xeb, 0xfa], GuestAddress(0x8000))
        .unwrap();
    let b = EmuBackend::default();
    b.map_memory(&mem).unwrap();
    let mut v = b.create_vcpu(0).unwrap();
    v.set_state(&CpuState::real_mode_at(0x8000)).unwrap();
    assert_eq!(next_out(v.as_mut()), 0x11);
    assert_eq!(
        next_out(v.as_mut()),
        0x11,
        "the loop runs from the block cache"
    );
    // Patch the immediate behind the guest's back, as a DMA transfer would.
    mem.write_obj(0x22u8, GuestAddress(0x8001)).unwrap();
    assert_eq!(next_out(v.as_mut()), 0x22);
    assert_eq!(next_out(v.as_mut()), 0x22);
}
