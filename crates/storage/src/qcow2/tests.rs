use super::*;

/// A minimal valid v3 header in a 64 KiB cluster.
fn v3() -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, 16);
    put64(&mut b, 24, 64 << 20);
    put32(&mut b, 36, 1);
    put64(&mut b, 40, 3 << 16);
    put64(&mut b, 48, 1 << 16);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 104);
    b
}

#[test]
fn parses_a_minimal_header() {
    let h = Header::parse(&v3()).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.size, 64 << 20);
    assert_eq!(h.backing_file, None);
}

#[test]
fn parses_backing_name_and_format() {
    let mut b = v3();
    // extension: backing format "raw", then end; name at 0x200.
    b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    b[108..112].copy_from_slice(&3u32.to_be_bytes());
    b[112..115].copy_from_slice(b"raw");
    b[8..16].copy_from_slice(&0x200u64.to_be_bytes());
    b[16..20].copy_from_slice(&8u32.to_be_bytes());
    b[0x200..0x208].copy_from_slice(b"base.img");
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("base.img"));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
}

#[test]
fn refuses_bad_headers() {
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("magic", Box::new(|b| b[0] = 0)),
        ("version", Box::new(|b| b[7] = 4)),
        ("cluster", Box::new(|b| b[23] = 22)),
        ("cluster8", Box::new(|b| b[23] = 8)),
        ("crypt", Box::new(|b| b[35] = 1)),
        ("incompat", Box::new(|b| b[72] = 0x80)),
        ("data file", Box::new(|b| b[79] = 4)),
        ("extl2", Box::new(|b| b[79] = 16)),
        ("refcount order", Box::new(|b| b[99] = 7)),
        ("l1 unaligned", Box::new(|b| b[47] = 8)),
        ("l1 zero", Box::new(|b| b[40..48].fill(0))),
        ("l1 small", Box::new(|b| b[39] = 0)),
        ("l1 huge", Box::new(|b| b[36..40].fill(0xff))),
        ("rt empty", Box::new(|b| b[59] = 0)),
        ("rt huge", Box::new(|b| b[56..60].fill(0xff))),
        ("header length", Box::new(|b| b[103] = 100)),
        (
            "extension overflow",
            Box::new(|b| {
                b[104..108].copy_from_slice(&1u32.to_be_bytes());
                b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
            }),
        ),
        (
            "backing name past cluster",
            Box::new(|b| {
                b[8..16].copy_from_slice(&0xfff0u64.to_be_bytes());
                b[16..20].copy_from_slice(&100u32.to_be_bytes());
            }),
        ),
        ("size", Box::new(|b| b[24..32].fill(0xff))),
    ];
    for (what, f) in cases {
        let mut b = v3();
        f(&mut b);
        assert!(Header::parse(&b).is_err(), "{what} accepted");
    }
}

#[test]
fn never_panics_on_truncation() {
    let b = v3();
    for n in 0..200 {
        let _ = Header::parse(&b[..n]);
    }
    // No end marker within a short buffer.
    let mut b = v3();
    b[104..112].copy_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0]);
    assert!(Header::parse(&b[..112]).is_err());
}
