#![no_main]
//! The receiving side of a live migration: any bytes are frames (checked), page batches,
//! a Hello and a state block, or an error, never a panic.
use libfuzzer_sys::fuzz_target;
use palacios_vmm::migrate::wire;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((f, used)) = wire::parse_frame(rest) {
        rest = &rest[used..];
        match f.kind {
            wire::Kind::Pages => {
                let _ = wire::decode_pages(&f.payload, |gpa, d| {
                    assert!(d.is_none_or(|d| d.len() == wire::PAGE));
                    assert!(d.is_none() || gpa % wire::PAGE as u64 == 0);
                    Ok(())
                });
            }
            wire::Kind::Hello => {
                let _ = serde_json::from_slice::<wire::Hello>(&f.payload);
            }
            wire::Kind::State => {
                let _ = palacios_checkpoint::Meta::decode(&f.payload);
            }
            _ => {
                let _ = wire::refusal(&f.payload);
            }
        }
    }
    // Raw page batches too (most random frames fail their CRC).
    let _ = wire::decode_pages(data, |_, _| Ok(()));
});
