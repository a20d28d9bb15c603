#![no_main]
//! The checkpoint reader: any bytes are a verified checkpoint or an error, never a panic,
//! and nothing is trusted before the CRC is checked. Also decodes every section the way a
//! restore does (the core state), which must not panic either.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = palacios_checkpoint::format::Meta::decode(data);
    // As a single file, and as a dir store's state file with an empty memory image.
    let empty: &[u8] = &[];
    let a = palacios_checkpoint::store::verify(&data, None, &mut |_, _| {});
    let b = palacios_checkpoint::store::verify(&data, Some(&empty), &mut |_, _| {});
    for (_, meta) in a.into_iter().chain(b) {
        for s in meta.sections("core") {
            let _ = serde_json::from_value::<palacios_vmm::backend::VcpuState>(s.state.clone());
        }
        let _ = serde_json::from_value::<palacios_vmm::VmConfig>(meta.config.clone());
    }
});
