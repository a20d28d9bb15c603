#![no_main]
//! The control API's request parser: any bytes are a request, "read more", or a 4xx/5xx
//! error, never a panic; a parsed request never claims more bytes than it was given.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match palacios_api::http::parse_request(data) {
        Ok(Some((req, used))) => {
            assert!(used <= data.len());
            assert!(req.body.len() <= palacios_api::http::MAX_BODY);
            let _ = req.segments();
        }
        Ok(None) => assert!(data.len() <= palacios_api::http::MAX_HEAD + palacios_api::http::MAX_BODY + 4),
        Err(e) => assert!((400..600).contains(&e.status())),
    }
});
