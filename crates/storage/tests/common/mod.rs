//! Helpers shared by the integration tests: temporary directories, external tools (skipped
//! when missing, except under CI), deterministic pseudo-random data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("palacios-storage-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temporary directory");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True if `tool` can be run. When it cannot: under CI (`CI=true`) the test fails naming
/// the tool; elsewhere it prints `SKIP: ...` and the caller returns.
pub fn have_tool(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: required tool `{tool}` is missing (install Debian's qemu-utils)");
        }
        eprintln!("SKIP: {test}: `{tool}` not found (install qemu-utils)");
    }
    ok
}

/// Run a command; panic with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn qemu_img(args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-img check` must find no errors and no leaks.
pub fn qemu_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("running qemu-img check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {} is not clean ({}):\n{text}",
        path.display(),
        out.status
    );
}

/// `qemu-img check` must find no errors; leaked clusters (exit status 3) are allowed.
pub fn qemu_check_allow_leaks(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("running qemu-img check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code();
    assert!(
        (code == Some(0) || code == Some(3))
            && !text.contains("ERROR")
            && !text.contains("corrupt"),
        "qemu-img check {} found errors ({}):\n{text}",
        path.display(),
        out.status
    );
}

/// The image's contents as qemu-img sees them.
pub fn qemu_convert_raw(path: &Path, dir: &TempDir) -> Vec<u8> {
    let out = dir.join("converted.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(&out));
    let data = std::fs::read(&out).expect("reading the converted image");
    let _ = std::fs::remove_file(&out);
    data
}

/// xorshift64*: deterministic test data and offsets.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Where two buffers first differ, for readable assertion failures.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}
