#![no_main]
//! What ConCORD parses from outside: the embedded directory's request and reply frames
//! (anything a local process sends to its socket), a directory table fed decoded requests,
//! and a shared-store page map. Any bytes give a value or an error, never a panic.
use libfuzzer_sys::fuzz_target;
use palacios_concord::directory::Table;
use palacios_concord::wire::{Reply, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode()).as_ref(), Ok(&r));
        let mut t = Table::default();
        let _ = t.apply(r);
    }
    let _ = Reply::decode(data);
    let _ = palacios_checkpoint::shared::decode_map(data);
    let mut c = std::io::Cursor::new(data);
    while let Ok(Some(_)) = palacios_concord::wire::read_frame(&mut c) {}
});
