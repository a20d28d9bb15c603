#![no_main]
//! The elf64 loader on arbitrary images: loaded or an error, never a panic or a write outside RAM.
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use palacios_boot::{BootParams, Module};
use palacios_vmm::config::BootFormat;
use palacios_vmm::{GuestMem, MemoryMap};

fn vm() -> &'static (GuestMem, MemoryMap) {
    static VM: OnceLock<(GuestMem, MemoryMap)> = OnceLock::new();
    VM.get_or_init(|| {
        let map = MemoryMap::pc(16 << 20);
        (map.create_memory().unwrap(), map)
    })
}

fuzz_target!(|data: &[u8]| {
    let (mem, map) = vm();
    let module = [1u8, 2, 3];
    let p = BootParams {
        format: BootFormat::Elf64,
        image: data,
        load_addr: None,
        entry: None,
        cmdline: "fuzz",
        modules: if BootFormat::Elf64 == BootFormat::Flat { vec![] } else { vec![Module { data: &module, cmdline: "m" }] },
    };
    let _ = palacios_boot::load(mem, map, &p);
    let auto = BootParams { format: BootFormat::Auto, modules: vec![], ..p };
    let _ = palacios_boot::load(mem, map, &auto);
});
