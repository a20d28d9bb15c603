#![no_main]
//! The XML config parser and VM model: any input is a config or an error, never a panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = palacios_vmm::VmConfig::parse(text, std::path::Path::new("/nonexistent"));
    }
});
