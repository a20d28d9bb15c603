//! Every config in examples/ works straight after the README's set-up: `v3 check` accepts
//! each (linux.xml once the Linux guest is fetched), the bundled-guest examples run to their
//! verdict on the emulator, and no example writes into the source tree.

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "examples/ has {v:?}");
    v
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn every_example_checks_and_the_bundled_ones_run_without_writing_files() {
    let linux = linux_guest().is_some();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let before = listing(&dir);
    for ex in examples() {
        let name = ex.file_name().unwrap().to_string_lossy().into_owned();
        let path = ex.display().to_string();
        if name.starts_with("linux") && !linux {
            continue;
        }
        let r = v3(&["check", &path], b"", LIMIT);
        assert_eq!(r.status, 0, "v3 check {name}\n{}", r.out());
        assert!(r.stdout.contains(": OK ("), "{}", r.out());
        if name.starts_with("linux") {
            continue; // booted by tests/linux.rs and tests/virtio.rs
        }
        // The test kernels exit through the debug-exit port: status 1 when every check passed.
        let r = v3(&["run", "--backend", "emu", &path], b"", LIMIT);
        assert_eq!(r.status, 1, "v3 run {name}\n{}", r.out());
        assert!(!r.stdout.contains("FAIL"), "{name}\n{}", r.out());
        if name == "multiboot.xml" {
            // COM2 reaches the console through its CHAR_STREAM.
            assert!(r.stdout.contains("com2 says hi"), "{}", r.out());
        }
    }
    assert_eq!(listing(&dir), before, "an example wrote into examples/");
}
