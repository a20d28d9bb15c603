//! scripts/apt-fetch.sh (used by scripts/fetch-linux-guest.sh) against a fake `apt-get` on
//! PATH: a failed and a corrupt download are retried, a download that never verifies is an
//! error that leaves no .deb behind, and two fetches at once are serialised by the lock (the
//! second finds the verified file and downloads nothing).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FAKE_APT_GET: &str = r#"#!/usr/bin/env bash
# Fake apt-get for tests: `download --print-uris PKG` and `download PKG`.
# FAKE_STATE holds `good` (the right .deb bytes), `count` (downloads so far), `errors`.
# The first FAKE_FAIL downloads fail: odd ones exit 100 with a partial file, even ones
# "succeed" (exit 0) with corrupt bytes of the right size.
set -u
st=$FAKE_STATE
if [ "$1" = download ] && [ "$2" = --print-uris ]; then
  echo "'http://example.invalid/$3.deb' ${3}_1.0_all.deb $(stat -c %s "$st/good") SHA256:$(sha256sum "$st/good" | cut -d' ' -f1)"
  exit 0
fi
if [ "$1" = download ]; then
  if ! mkdir "$st/busy" 2>/dev/null; then echo "two downloads at once" >>"$st/errors"; fi
  n=$(( $(cat "$st/count" 2>/dev/null || echo 0) + 1 ))
  echo $n >"$st/count"
  sleep 0.3
  f="${2}_1.0_all.deb"
  if [ "$n" -le "${FAKE_FAIL:-0}" ]; then
    if [ $((n % 2)) = 1 ]; then
      head -c 100 "$st/good" >"$f"; touch "$f.FAILED"
      echo "E: Failed to fetch: File has unexpected size (100 != $(stat -c %s "$st/good")). Mirror sync in progress?"
      rmdir "$st/busy"; exit 100
    fi
    tr 'a-z' 'A-Z' <"$st/good" >"$f"
    rmdir "$st/busy"; exit 0
  fi
  cp "$st/good" "$f"
  rmdir "$st/busy"
  exit 0
fi
echo "fake apt-get: unexpected $*" >&2
exit 1
"#;

struct Fake {
    dir: PathBuf,
    bin: PathBuf,
    state: PathBuf,
    cache: PathBuf,
}

fn fake(tag: &str) -> Fake {
    let dir = common::tmpdir(&format!("fetch-{tag}"));
    let bin = dir.join("bin");
    let state = dir.join("state");
    let cache = dir.join("cache");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let apt = bin.join("apt-get");
    std::fs::write(&apt, FAKE_APT_GET).unwrap();
    let mut perm = std::fs::metadata(&apt).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&apt, perm).unwrap();
    std::fs::write(
        state.join("good"),
        "the right package contents\n".repeat(100),
    )
    .unwrap();
    Fake {
        dir,
        bin,
        state,
        cache,
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/apt-fetch.sh")
}

impl Fake {
    fn command(&self, fail: u32) -> Command {
        let mut c = Command::new("bash");
        c.arg(script())
            .arg(&self.cache)
            .arg("pkg")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("FAKE_STATE", &self.state)
            .env("FAKE_FAIL", fail.to_string())
            .env("APT_FETCH_TRIES", "4")
            .env("APT_FETCH_DELAY", "0");
        c
    }
    fn downloads(&self) -> u32 {
        std::fs::read_to_string(self.state.join("count"))
            .map(|s| s.trim().parse().unwrap())
            .unwrap_or(0)
    }
    fn debs(&self) -> Vec<String> {
        std::fs::read_dir(&self.cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".deb"))
            .collect()
    }
}

fn describe(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn failed_and_corrupt_downloads_are_retried_and_the_result_verified() {
    let f = fake("retry");
    let o = f.command(2).output().unwrap();
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(
        f.downloads(),
        3,
        "two failures, then success\n{}",
        describe(&o)
    );
    let path = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(path.ends_with("pkg_1.0_all.deb"), "{}", describe(&o));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(f.state.join("good")).unwrap()
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("try 1 of 4 failed"), "{err}");
    assert!(err.contains("try 2 of 4 failed"), "{err}");
    assert_eq!(
        f.debs(),
        vec!["pkg_1.0_all.deb".to_string()],
        "no .FAILED left behind"
    );
    // A second run finds the verified file and downloads nothing.
    let o = f.command(0).output().unwrap();
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(f.downloads(), 3);
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[test]
fn a_download_that_never_verifies_is_an_error_and_leaves_nothing() {
    let f = fake("never");
    let o = f.command(100).output().unwrap();
    assert!(!o.status.success(), "{}", describe(&o));
    assert_eq!(f.downloads(), 4);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("could not download a verified pkg after 4 tries"),
        "{err}"
    );
    assert!(f.debs().is_empty(), "left behind: {:?}", f.debs());
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[test]
fn concurrent_fetches_are_serialised_by_the_lock() {
    let f = fake("lock");
    let piped = |mut c: Command| {
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = piped(f.command(1));
    let b = piped(f.command(1));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", describe(&a));
    assert!(b.status.success(), "{}", describe(&b));
    let errors = std::fs::read_to_string(f.state.join("errors")).unwrap_or_default();
    assert!(errors.is_empty(), "downloads overlapped: {errors}");
    // One failure and one good download by whichever got the lock first; the other found the
    // verified file.
    assert_eq!(f.downloads(), 2);
    let _ = std::fs::remove_dir_all(&f.dir);
}
