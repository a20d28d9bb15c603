//! Raw file, RAM and scratch backends: round trips, read-only and range refusal, discard
//! and write-zeroes, concurrent use.

mod common;

use common::{Rng, TempDir, assert_same};
use palacios_storage::{BlockBackend, DiskError, open_file, open_image, ram_from_bytes, tmp_disk};
use std::sync::Arc;

/// Exercise a writable backend of `cap` bytes whose initial contents are `model`; returns
/// the expected final contents.
fn exercise(b: &dyn BlockBackend, mut model: Vec<u8>, zeroes_on_discard: bool) -> Vec<u8> {
    let cap = b.capacity();
    assert_eq!(cap, model.len() as u64);
    assert!(!b.read_only());
    let mut rng = Rng(0x1234_5678);

    // Writes of any size and alignment, inside and across 512-byte sectors.
    for _ in 0..64 {
        let len = 1 + rng.below(20_000) as usize;
        let off = rng.below(cap - len as u64);
        let data = rng.bytes(len);
        b.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    // Edges: first and last byte, empty requests.
    b.write_at(&[0x5a], 0).unwrap();
    model[0] = 0x5a;
    b.write_at(&[0xa5], cap - 1).unwrap();
    model[cap as usize - 1] = 0xa5;
    b.write_at(&[], cap).unwrap();
    b.read_at(&mut [], cap).unwrap();

    let mut all = vec![0u8; cap as usize];
    b.read_at(&mut all, 0).unwrap();
    assert_same(&all, &model, "after writes");
    let mut piece = vec![0u8; 777];
    b.read_at(&mut piece, 12_345).unwrap();
    assert_same(&piece, &model[12_345..12_345 + 777], "unaligned read");

    // Out of range, including offset overflow: refused, nothing written.
    let oor = |r: Result<(), DiskError>| {
        assert!(matches!(r, Err(DiskError::OutOfRange { .. })), "{r:?}");
    };
    oor(b.read_at(&mut [0u8; 2], cap - 1));
    oor(b.read_at(&mut [0u8; 1], cap));
    oor(b.write_at(&[1u8; 512], cap - 511));
    oor(b.write_at(&[1u8; 2], u64::MAX));
    oor(b.discard(cap - 10, 11));
    oor(b.write_zeroes(u64::MAX, 2, false));
    oor(b.write_zeroes(0, cap + 1, true));

    // write_zeroes, with and without unmap, aligned and not.
    for (off, len, unmap) in [
        (4096u64, 65536u64, false),
        (100_001, 9_999, true),
        (0, 512, true),
        (cap - 1000, 1000, false),
    ] {
        b.write_zeroes(off, len, unmap).unwrap();
        model[off as usize..(off + len) as usize].fill(0);
    }
    // discard: for these backends the range reads as zeroes afterwards.
    b.discard(200_000, 131_072).unwrap();
    if zeroes_on_discard {
        model[200_000..331_072].fill(0);
    }
    b.discard(0, 0).unwrap();
    b.flush().unwrap();

    b.read_at(&mut all, 0).unwrap();
    assert_same(&all, &model, "after write_zeroes and discard");
    let s = b.serial();
    assert!(
        !s.is_empty() && s.len() <= 20 && s.is_ascii(),
        "serial {s:?}"
    );
    model
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn file_round_trip_and_contents_on_disk() {
    let dir = TempDir::new("file");
    let p = dir.join("disk.img");
    let init = pattern(1 << 20);
    std::fs::write(&p, &init).unwrap();
    let b = open_file(&p, true).unwrap();
    assert_eq!(b.kind(), "file");
    let model = exercise(&*b, init, true);
    drop(b);
    assert_same(&std::fs::read(&p).unwrap(), &model, "file on disk");
    // open_image: raw.
    let b = open_image(&p, false).unwrap();
    assert_eq!(b.kind(), "file");
    assert_eq!(b.capacity(), 1 << 20);
}

#[test]
fn file_read_only_refuses_writes() {
    let dir = TempDir::new("file-ro");
    let p = dir.join("ro.img");
    std::fs::write(&p, pattern(8192)).unwrap();
    let b = open_file(&p, false).unwrap();
    assert!(b.read_only());
    let mut buf = [0u8; 512];
    b.read_at(&mut buf, 512).unwrap();
    assert_same(&buf, &pattern(8192)[512..1024], "read-only read");
    assert!(matches!(b.write_at(&buf, 0), Err(DiskError::ReadOnly)));
    assert!(matches!(b.discard(0, 512), Err(DiskError::ReadOnly)));
    assert!(matches!(
        b.write_zeroes(0, 512, true),
        Err(DiskError::ReadOnly)
    ));
    b.flush().unwrap();
    assert_same(&std::fs::read(&p).unwrap(), &pattern(8192), "untouched");
}

#[test]
fn file_odd_size_and_errors_name_the_path() {
    let dir = TempDir::new("file-odd");
    let p = dir.join("odd.img");
    std::fs::write(&p, pattern(1000)).unwrap();
    let b = open_file(&p, true).unwrap();
    assert_eq!(b.capacity(), 1000, "byte capacity, not rounded");
    b.write_at(&[9u8; 8], 992).unwrap();
    assert!(b.write_at(&[9u8; 9], 992).is_err());

    let missing = dir.join("missing.img");
    let e = open_file(&missing, false)
        .err()
        .expect("opening a missing file");
    let msg = e.to_string();
    assert!(
        msg.contains("missing.img") && msg.contains("No such file"),
        "{msg}"
    );
    let e = open_file(dir.path(), false)
        .err()
        .expect("opening a directory");
    assert!(e.to_string().contains("neither a regular file"), "{e}");
}

#[test]
fn ram_round_trip_and_read_only() {
    let b = ram_from_bytes(pattern(512 * 1024), true);
    assert_eq!(b.kind(), "ram");
    exercise(&*b, pattern(512 * 1024), true);

    let ro = ram_from_bytes(pattern(4096), false);
    assert!(ro.read_only());
    assert!(matches!(ro.write_at(&[1], 0), Err(DiskError::ReadOnly)));
    assert!(matches!(
        ro.write_zeroes(0, 1, false),
        Err(DiskError::ReadOnly)
    ));
    assert!(matches!(ro.discard(0, 1), Err(DiskError::ReadOnly)));
    let mut buf = [0u8; 4096];
    ro.read_at(&mut buf, 0).unwrap();
    assert_same(&buf, &pattern(4096), "ram read-only");
    let empty = ram_from_bytes(Vec::new(), true);
    assert_eq!(empty.capacity(), 0);
    assert!(empty.read_at(&mut [0u8; 1], 0).is_err());
}

#[test]
fn tmp_disk_is_zeroed_scratch() {
    let b = tmp_disk(3 << 20).unwrap();
    assert_eq!(b.kind(), "tmp");
    assert_eq!(b.capacity(), 3 << 20);
    let mut all = vec![0xffu8; 3 << 20];
    b.read_at(&mut all, 0).unwrap();
    assert!(all.iter().all(|&x| x == 0), "scratch disk is zero-filled");
    exercise(&*b, vec![0u8; 3 << 20], true);
    let other = tmp_disk(4096).unwrap();
    assert_ne!(b.serial(), other.serial());
    // A huge sparse scratch disk costs nothing.
    let big = tmp_disk(1 << 40).unwrap();
    big.write_at(b"end", (1 << 40) - 3).unwrap();
    let mut end = [0u8; 3];
    big.read_at(&mut end, (1 << 40) - 3).unwrap();
    assert_eq!(&end, b"end");
}

#[test]
fn concurrent_writers_and_readers() {
    let dir = TempDir::new("file-mt");
    let p = dir.join("mt.img");
    std::fs::write(&p, vec![0u8; 4 << 20]).unwrap();
    let backends: Vec<Arc<dyn BlockBackend>> = vec![
        open_file(&p, true).unwrap(),
        ram_from_bytes(vec![0u8; 4 << 20], true),
        tmp_disk(4 << 20).unwrap(),
    ];
    for b in backends {
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    // Thread t owns every 4th 4 KiB block.
                    for i in 0..256u64 {
                        let blk = i * 4 + u64::from(t);
                        let data = vec![t.wrapping_mul(37).wrapping_add(i as u8); 4096];
                        b.write_at(&data, blk * 4096).unwrap();
                        let mut back = vec![0u8; 4096];
                        b.read_at(&mut back, blk * 4096).unwrap();
                        assert_eq!(back, data);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut all = vec![0u8; 4 << 20];
        b.read_at(&mut all, 0).unwrap();
        for blk in 0..1024u64 {
            let (t, i) = ((blk % 4) as u8, blk / 4);
            let want = t.wrapping_mul(37).wrapping_add(i as u8);
            assert!(
                all[blk as usize * 4096..][..4096]
                    .iter()
                    .all(|&x| x == want),
                "{} block {blk}",
                b.kind()
            );
        }
    }
}
