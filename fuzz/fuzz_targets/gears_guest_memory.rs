#![no_main]
//! What GEARS reads from a guest: the helper module's layout structure, a guarded module's
//! manifest, and guest memory walked as page tables and kernel task lists. Any bytes give an
//! answer or an error, never a panic or a hang (lists and strings are bounded).
use libfuzzer_sys::fuzz_target;
use palacios_gears::linux::{Kernel, LinuxInfo};
use palacios_gears::walk;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let _ = LinuxInfo::parse(data);
    let _ = palacios_gears::guard::check_manifest(data);
    if data.len() < 16 {
        return;
    }
    let va = u64::from_le_bytes(data[..8].try_into().unwrap());
    let root = u64::from_le_bytes(data[8..16].try_into().unwrap()) & 0xf_f000;
    let mem: palacios_vmm::GuestMem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    mem.write_slice(&data[16..data.len().min(16 + (1 << 20))], GuestAddress(0))
        .unwrap();
    let _ = walk::walk(&mem, root, va);
    let mut buf = [0u8; 64];
    let _ = walk::read(&mem, root, va, &mut buf, true);
    let _ = walk::read_cstr(&mem, root, va, 300, false);
    // A plausible layout over the fuzzed memory: the task list walk ends.
    let info = LinuxInfo {
        current_task: 0x100,
        init_task: 0xffff_8880_0000_0000 | (va & 0xf_fff8),
        page_offset: 0xffff_8880_0000_0000,
        kernel_pgd: root,
        off_pid: 0x10,
        off_tgid: 0x14,
        off_comm: 0x20,
        off_mm: 0x30,
        off_tasks: 0x40,
        off_stack: 0x50,
        off_mm_pgd: 0x8,
        thread_size: 16384,
        off_real_parent: 0x58,
    };
    let k = Kernel { mem: &mem, info: &info };
    let _ = k.processes();
    let _ = k.current(va);
});
