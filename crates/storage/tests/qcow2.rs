//! qcow2 against QEMU's own tools: images made by `qemu-img create`, written here, must pass
//! `qemu-img check` and convert to the same bytes; images written by `qemu-io` must read
//! back right; backing files stay untouched; corrupt images give errors, never panics.

mod common;

use common::{
    Rng, TempDir, assert_same, have_tool, qemu_check, qemu_check_allow_leaks, qemu_convert_raw,
    qemu_img, run,
};
use palacios_storage::{BlockBackend, DiskError, open_image, open_qcow2, parse_qcow2_header};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(img);
    let out = run(&mut c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
}

fn read_all(b: &dyn BlockBackend) -> Vec<u8> {
    let mut all = vec![0u8; b.capacity() as usize];
    b.read_at(&mut all, 0).unwrap();
    all
}

/// Random writes and write-zeroes over `b`, mirrored in `model`.
fn scribble(b: &dyn BlockBackend, model: &mut [u8], seed: u64, count: usize, max_len: u64) {
    let cap = b.capacity();
    let mut rng = Rng(seed);
    for i in 0..count {
        let len = 1 + rng.below(max_len);
        let off = rng.below(cap - len);
        if i % 7 == 3 {
            b.write_zeroes(off, len, i % 2 == 0).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = rng.bytes(len as usize);
            b.write_at(&data, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
}

/// Our reads, a read-only reopen, `qemu-img check` and `qemu-img convert` all agree with `model`.
fn verify(img: &Path, model: &[u8], dir: &TempDir, what: &str) {
    let b = open_qcow2(img, false).unwrap();
    assert_same(
        &read_all(&*b),
        model,
        &format!("{what}: read back after reopen"),
    );
    drop(b);
    qemu_check(img);
    assert_same(
        &qemu_convert_raw(img, dir),
        model,
        &format!("{what}: qemu-img convert"),
    );
}

#[test]
fn writes_pass_qemu_img_check_and_convert() {
    if !have_tool("qemu-img", "writes_pass_qemu_img_check_and_convert") {
        return;
    }
    let dir = TempDir::new("q-write");
    for (i, opts) in [
        "cluster_size=65536,compat=1.1",
        "cluster_size=4096,compat=0.10",
        "cluster_size=512,compat=1.1",
        "cluster_size=2097152,compat=1.1",
        "cluster_size=65536,compat=1.1,lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.join(&format!("w{i}.qcow2"));
        let size = 24u64 << 20;
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            img.to_str().unwrap(),
            &size.to_string(),
        ]);
        let b = open_image(&img, true).unwrap();
        assert_eq!(b.kind(), "qcow2");
        assert_eq!(b.capacity(), size);
        assert!(!b.read_only());
        let mut model = vec![0u8; size as usize];
        assert_same(&read_all(&*b), &model, "fresh image");
        scribble(&*b, &mut model, 42 + i as u64, 120, 150_000);
        // Sector-aligned requests as the frontends send them, and a few big ones.
        b.write_at(&vec![0x11u8; 1 << 20], 3 << 20).unwrap();
        model[3 << 20..4 << 20].fill(0x11);
        b.write_at(&vec![0x22u8; 512], size - 512).unwrap();
        model[size as usize - 512..].fill(0x22);
        b.flush().unwrap();
        b.discard(0, 4096).unwrap(); // allowed to keep the data
        assert_same(&read_all(&*b), &model, &format!("{opts}: read back"));
        drop(b);
        verify(&img, &model, &dir, opts);
    }
}

#[test]
fn refcount_table_grows() {
    if !have_tool("qemu-img", "refcount_table_grows") {
        return;
    }
    let dir = TempDir::new("q-grow");
    // 512-byte clusters: one refcount table cluster covers 8 MiB of file.
    let img = dir.join("grow.qcow2");
    let size = 64u64 << 20;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
    let before = parse_qcow2_header(&std::fs::read(&img).unwrap()).unwrap();
    let b = open_qcow2(&img, true).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(7);
    for i in 0..40u64 {
        // 512 KiB every 1.5 MiB, unaligned: 20 MiB of data clusters plus L2 tables.
        let data = rng.bytes(512 << 10);
        let off = i * (3 << 19) + 13;
        b.write_at(&data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    drop(b);
    let after = parse_qcow2_header(&std::fs::read(&img).unwrap()).unwrap();
    assert!(
        after.refcount_table_clusters > before.refcount_table_clusters,
        "refcount table did not grow: {} -> {}",
        before.refcount_table_clusters,
        after.refcount_table_clusters
    );
    assert_ne!(after.refcount_table_offset, before.refcount_table_offset);
    verify(&img, &model, &dir, "grown refcount table");
    // And writing on after the growth, in a second session.
    let b = open_qcow2(&img, true).unwrap();
    scribble(&*b, &mut model, 99, 60, 300_000);
    drop(b);
    verify(&img, &model, &dir, "after growth, second session");
}

#[test]
fn every_refcount_width() {
    if !have_tool("qemu-img", "every_refcount_width") {
        return;
    }
    let dir = TempDir::new("q-rcw");
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let img = dir.join(&format!("rc{bits}.qcow2"));
        let size = 16u64 << 20;
        let opts = format!("cluster_size=512,refcount_bits={bits}");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            img.to_str().unwrap(),
            &size.to_string(),
        ]);
        let b = open_qcow2(&img, true).unwrap();
        let mut model = vec![0u8; size as usize];
        scribble(&*b, &mut model, bits, 80, 100_000);
        drop(b);
        verify(&img, &model, &dir, &opts);
    }
}

#[test]
fn reads_images_written_by_qemu_io() {
    if !have_tool("qemu-img", "reads_images_written_by_qemu_io")
        || !have_tool("qemu-io", "reads_images_written_by_qemu_io")
    {
        return;
    }
    let dir = TempDir::new("q-qio");
    for opts in ["compat=1.1", "compat=0.10", "cluster_size=4096"] {
        let img = dir.join("qio.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            img.to_str().unwrap(),
            "8M",
        ]);
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0xab 0 64k",
                "write -P 0xcd 1M 4k",
                "write -P 0xef 3000000 7000",
                "write -P 0x77 6M 256k",
                "write -z 6M 64k",
            ],
        );
        let b = open_image(&img, false).unwrap();
        assert!(b.read_only());
        let all = read_all(&*b);
        let mut want = vec![0u8; 8 << 20];
        want[..65536].fill(0xab);
        want[1 << 20..(1 << 20) + 4096].fill(0xcd);
        want[3_000_000..3_007_000].fill(0xef);
        want[6 << 20..(6 << 20) + (256 << 10)].fill(0x77);
        want[6 << 20..(6 << 20) + 65536].fill(0);
        assert_same(&all, &want, &format!("qemu-io image ({opts})"));
        assert!(matches!(b.write_at(&[1], 0), Err(DiskError::ReadOnly)));
        drop(b);
        // Then we write to it and qemu-io reads our data.
        let b = open_qcow2(&img, true).unwrap();
        b.write_at(&[0x5au8; 4096], 1 << 20).unwrap();
        b.write_at(&[0x5bu8; 100], 70_000).unwrap();
        drop(b);
        qemu_io(
            &img,
            "qcow2",
            &[
                "read -P 0x5a 1M 4k",
                "read -P 0x5b 70000 100",
                "read -P 0xab 0 64k",
            ],
        );
        qemu_check(&img);
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn backing_file_overlay_leaves_base_untouched() {
    if !have_tool("qemu-img", "backing_file_overlay_leaves_base_untouched") {
        return;
    }
    let dir = TempDir::new("q-backing");
    let base = dir.join("base.raw");
    let base_data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(7) % 251) as u8)
        .collect();
    std::fs::write(&base, &base_data).unwrap();
    // Relative backing name, resolved against the overlay's directory; the overlay is
    // larger than its base (reads past the base's end are zeroes).
    let ov = dir.join("ov.qcow2");
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2", "12M",
    ]));
    let h = parse_qcow2_header(&std::fs::read(&ov).unwrap()).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));

    let b = open_image(&ov, true).unwrap();
    let mut model = base_data.clone();
    model.resize(12 << 20, 0);
    assert_same(&read_all(&*b), &model, "overlay before writes");
    // Partial-cluster writes copy the rest of the cluster from the base.
    for (off, len, v) in [
        (100u64, 10usize, 1u8),
        (65536 + 4096, 512, 2),
        (5 << 20, 65536, 3),
        ((8 << 20) - 100, 300, 4),
        (11 << 20, 7, 5),
    ] {
        b.write_at(&vec![v; len], off).unwrap();
        model[off as usize..off as usize + len].fill(v);
    }
    // Zeroes over backing data: whole clusters (zero flag) and parts.
    for (off, len) in [
        (2u64 << 20, 3 * 65536u64),
        ((3 << 20) + 1000, 5000),
        (1 << 20, 65536),
    ] {
        b.write_zeroes(off, len, true).unwrap();
        model[off as usize..(off + len) as usize].fill(0);
    }
    scribble(&*b, &mut model, 5, 40, 70_000);
    b.flush().unwrap();
    assert_same(&read_all(&*b), &model, "overlay after writes");
    drop(b);
    assert_same(&std::fs::read(&base).unwrap(), &base_data, "base file");
    verify(&ov, &model, &dir, "overlay");

    // A qcow2 base under a qcow2 overlay (written by qemu-io), three levels deep.
    if !have_tool("qemu-io", "backing_file_overlay_leaves_base_untouched") {
        return;
    }
    let b1 = dir.join("b1.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", b1.to_str().unwrap(), "4M"]);
    qemu_io(
        &b1,
        "qcow2",
        &["write -P 0x31 0 128k", "write -P 0x32 1M 64k"],
    );
    let b2 = dir.join("b2.qcow2");
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "b2.qcow2",
    ]));
    qemu_io(&b2, "qcow2", &["write -P 0x41 64k 4k", "write -z 1M 64k"]);
    let top = dir.join("top.qcow2");
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b2.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]));
    let b1_before = std::fs::read(&b1).unwrap();
    let b2_before = std::fs::read(&b2).unwrap();
    let t = open_image(&top, true).unwrap();
    let mut want = vec![0u8; 4 << 20];
    want[..128 << 10].fill(0x31);
    want[64 << 10..68 << 10].fill(0x41);
    assert_same(&read_all(&*t), &want, "three-level chain");
    t.write_at(&[0x51; 10], 65536 + 10).unwrap();
    want[65536 + 10..65536 + 20].fill(0x51);
    drop(t);
    assert_same(&std::fs::read(&b1).unwrap(), &b1_before, "b1 untouched");
    assert_same(&std::fs::read(&b2).unwrap(), &b2_before, "b2 untouched");
    verify(&top, &want, &dir, "three-level chain");
}

#[test]
fn concurrent_allocating_writes() {
    if !have_tool("qemu-img", "concurrent_allocating_writes") {
        return;
    }
    let dir = TempDir::new("q-mt");
    let img = dir.join("mt.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        img.to_str().unwrap(),
        "16M",
    ]);
    let b: Arc<dyn BlockBackend> = open_qcow2(&img, true).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                // Thread t owns every 4th 1536-byte piece: pieces share clusters, so the
                // threads race to allocate the same clusters.
                for i in 0..2000u64 {
                    let piece = i * 4 + u64::from(t);
                    let data = vec![t.wrapping_add(1).wrapping_mul(i as u8 | 1); 1536];
                    b.write_at(&data, piece * 1536).unwrap();
                    let mut back = vec![0u8; 1536];
                    b.read_at(&mut back, piece * 1536).unwrap();
                    assert_eq!(back, data, "thread {t} piece {piece}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(b);
    let mut model = vec![0u8; 16 << 20];
    for piece in 0..8000u64 {
        let (t, i) = ((piece % 4) as u8, piece / 4);
        model[piece as usize * 1536..][..1536].fill(t.wrapping_add(1).wrapping_mul(i as u8 | 1));
    }
    verify(&img, &model, &dir, "concurrent writes");
}

#[test]
fn snapshots_dirty_and_corrupt_images_refuse_writing() {
    if !have_tool(
        "qemu-img",
        "snapshots_dirty_and_corrupt_images_refuse_writing",
    ) {
        return;
    }
    let dir = TempDir::new("q-snap");
    let img = dir.join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    let b = open_qcow2(&img, true).unwrap();
    b.write_at(&[7u8; 4096], 0).unwrap();
    drop(b);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    let e = open_qcow2(&img, true)
        .err()
        .expect("writable open with snapshots");
    assert!(e.to_string().contains("snapshots"), "{e}");
    let b = open_qcow2(&img, false).unwrap();
    let mut buf = [0u8; 4096];
    b.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7u8; 4096]);

    // Dirty (bit 0) and corrupt (bit 1) images: read-only only.
    for (bit, word) in [(1u8, "dirty"), (2u8, "corrupt")] {
        let img = dir.join("flag.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[79] |= bit;
        std::fs::write(&img, &bytes).unwrap();
        let e = open_qcow2(&img, true)
            .err()
            .expect("writable open of a flagged image");
        assert!(e.to_string().contains(word), "{e}");
        assert!(open_qcow2(&img, false).is_ok());
    }
}

#[test]
fn persistent_bitmaps_are_invalidated_by_writers() {
    if !have_tool("qemu-img", "persistent_bitmaps_are_invalidated_by_writers") {
        return;
    }
    let dir = TempDir::new("q-bitmap");
    let img = dir.join("bm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b0"]);
    let h = parse_qcow2_header(&std::fs::read(&img).unwrap()).unwrap();
    assert_eq!(h.autoclear_features & 1, 1, "qemu-img set the bitmaps bit");
    let b = open_qcow2(&img, true).unwrap();
    b.write_at(&[3u8; 1000], 5000).unwrap();
    drop(b);
    let h = parse_qcow2_header(&std::fs::read(&img).unwrap()).unwrap();
    assert_eq!(
        h.autoclear_features, 0,
        "autoclear bits cleared by a writer"
    );
    // The bitmap directory's clusters are now unreferenced: qemu-img reports them as
    // leaked (harmless), but there must be no errors.
    qemu_check_allow_leaks(&img);
    let mut model = vec![0u8; 4 << 20];
    model[5000..6000].fill(3);
    assert_same(
        &qemu_convert_raw(&img, &dir),
        &model,
        "bitmap image: qemu-img convert",
    );
}

/// Patch big-endian bytes into a file.
fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn corrupt_images_give_errors() {
    if !have_tool("qemu-img", "corrupt_images_give_errors") {
        return;
    }
    let dir = TempDir::new("q-corrupt");
    let fresh = |name: &str| {
        let p = dir.join(name);
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
        let b = open_qcow2(&p, true).unwrap();
        b.write_at(&[9u8; 70000], 0).unwrap();
        drop(b);
        p
    };
    let header = |p: &Path| parse_qcow2_header(&std::fs::read(p).unwrap()).unwrap();

    // Garbage after the magic.
    let g = dir.join("garbage.qcow2");
    let mut bytes = vec![0u8; 65536];
    Rng(3)
        .bytes(65536)
        .iter()
        .enumerate()
        .for_each(|(i, &x)| bytes[i] = x);
    bytes[..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
    std::fs::write(&g, &bytes).unwrap();
    assert!(open_qcow2(&g, false).is_err());
    assert!(
        open_image(&g, false).is_err(),
        "a qcow2 magic is not opened as raw"
    );
    // Truncated header.
    std::fs::write(&g, &bytes[..50]).unwrap();
    let e = open_qcow2(&g, false).err().unwrap();
    assert!(matches!(e, DiskError::Format(_)), "{e}");

    // L1 table offset: unaligned, then past the end of the file.
    let p = fresh("l1off.qcow2");
    patch(&p, 40, &(header(&p).l1_table_offset + 8).to_be_bytes());
    let e = open_qcow2(&p, false).err().expect("unaligned L1 offset");
    assert!(e.to_string().contains("L1"), "{e}");
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    let e = open_qcow2(&p, false).err().expect("L1 past EOF");
    assert!(e.to_string().contains("past the end"), "{e}");

    // An L1 entry past the end of the file, or unaligned: reads and writes fail cleanly.
    for (what, entry) in [
        ("past EOF", (1u64 << 63) | (1 << 40)),
        ("unaligned", (1u64 << 63) | 0x30200),
    ] {
        let p = fresh("l1entry.qcow2");
        patch(&p, header(&p).l1_table_offset, &entry.to_be_bytes());
        let b = open_qcow2(&p, true).unwrap();
        let mut buf = [0u8; 512];
        let e = b
            .read_at(&mut buf, 0)
            .err()
            .unwrap_or_else(|| panic!("read through an L1 entry {what}"));
        assert!(matches!(e, DiskError::Format(_)), "{e}");
        assert!(b.write_at(&buf, 0).is_err());
    }

    // An L2 entry past the end of the file.
    let p = fresh("l2entry.qcow2");
    let l1 = u64::from_be_bytes(
        std::fs::read(&p).unwrap()[header(&p).l1_table_offset as usize..][..8]
            .try_into()
            .unwrap(),
    );
    let l2 = l1 & 0x00ff_ffff_ffff_fe00;
    patch(&p, l2 + 8, &((1u64 << 63) | (1 << 45)).to_be_bytes());
    let b = open_qcow2(&p, false).unwrap();
    let mut buf = [0u8; 512];
    b.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [9u8; 512], "the first cluster is fine");
    assert!(matches!(
        b.read_at(&mut buf, 65536),
        Err(DiskError::Format(_))
    ));

    // Unknown incompatible feature; extended L2 entries.
    let p = fresh("incompat.qcow2");
    patch(&p, 72, &(1u64 << 40).to_be_bytes());
    let e = open_qcow2(&p, false).err().unwrap();
    assert!(e.to_string().contains("unknown incompatible"), "{e}");
    let p = dir.join("extl2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        p.to_str().unwrap(),
        "4M",
    ]);
    let e = open_qcow2(&p, false).err().unwrap();
    assert!(e.to_string().contains("extended L2"), "{e}");
}

#[test]
fn compressed_clusters_are_refused() {
    if !have_tool("qemu-img", "compressed_clusters_are_refused") {
        return;
    }
    let dir = TempDir::new("q-comp");
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; 1 << 20];
    data[..65536].fill(0x61);
    data[200_000..300_000].fill(0x62);
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let b = open_qcow2(&img, false).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = b
        .read_at(&mut buf, 0)
        .expect_err("reading a compressed cluster");
    assert!(e.to_string().contains("compressed"), "{e}");
    // An unallocated (all-zero) cluster still reads.
    b.read_at(&mut buf, 900_000).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    drop(b);
    let b = open_qcow2(&img, true).unwrap();
    let e = b
        .write_at(&buf, 100)
        .expect_err("writing into a compressed cluster");
    assert!(e.to_string().contains("compressed"), "{e}");
    drop(b);
    qemu_check(&img);
}

#[test]
fn mutated_images_never_panic() {
    if !have_tool("qemu-img", "mutated_images_never_panic") {
        return;
    }
    let dir = TempDir::new("q-mutate");
    let img = dir.join("m.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        img.to_str().unwrap(),
        "1M",
    ]);
    let b = open_qcow2(&img, true).unwrap();
    let mut rng = Rng(11);
    for i in 0..20u64 {
        b.write_at(&rng.bytes(3000), i * 50_000).unwrap();
    }
    drop(b);
    let good = std::fs::read(&img).unwrap();
    let meta_len = good.len().min(8 * 4096);
    let case = dir.join("case.qcow2");
    for _ in 0..400 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(meta_len as u64) as usize;
            bytes[at] = match rng.below(3) {
                0 => rng.next() as u8,
                1 => bytes[at] ^ (1 << rng.below(8)),
                _ => 0xff,
            };
        }
        std::fs::write(&case, &bytes).unwrap();
        let _ = parse_qcow2_header(&bytes);
        for writable in [false, true] {
            let Ok(b) = open_qcow2(&case, writable) else {
                continue;
            };
            let cap = b.capacity().min(2 << 20);
            let mut buf = vec![0u8; cap as usize];
            let _ = b.read_at(&mut buf, 0);
            if writable {
                let _ = b.write_at(&[1u8; 5000], rng.below(cap.saturating_sub(5000).max(1)));
                let _ = b.write_zeroes(0, cap.min(8192), false);
                let _ = b.read_at(&mut buf, 0);
            }
        }
    }
}
