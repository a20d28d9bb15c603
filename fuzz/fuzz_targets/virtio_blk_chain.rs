#![no_main]
//! virtio-blk request parsing and the virtio-net transmit check: any header and descriptor
//! list (as a guest may build them) is a request whose pieces lie inside the chain, or an
//! error, never a panic.
use libfuzzer_sys::fuzz_target;
use palacios_virtio::blk_req::{Desc, ReqError, parse, MAX_REQUEST_BYTES};

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let header: [u8; 16] = data[..16].try_into().unwrap();
    let descs: Vec<Desc> = data[16..]
        .chunks_exact(13)
        .map(|c| Desc {
            addr: u64::from_le_bytes(c[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(c[8..12].try_into().unwrap()),
            write_only: c[12] & 1 != 0,
        })
        .collect();
    if let Ok(n) = palacios_virtio::net::tx_len(&descs) {
        assert!((palacios_virtio::net::HDR..=palacios_virtio::net::MAX_FRAME).contains(&n));
        assert!(descs.iter().all(|d| !d.write_only));
    }
    match parse(header, &descs) {
        Ok(r) => {
            assert!(r.data_len <= MAX_REQUEST_BYTES);
            assert_eq!(r.data_len, r.data.iter().map(|d| u64::from(d.len)).sum::<u64>());
            let last = descs.last().unwrap();
            assert!(last.write_only);
            assert_eq!(r.status, last.addr + u64::from(last.len) - 1);
        }
        Err(ReqError::Bad { status, .. }) => {
            let last = descs.last().unwrap();
            assert_eq!(status, last.addr + u64::from(last.len) - 1);
        }
        Err(ReqError::NoStatus) => {}
    }
});
