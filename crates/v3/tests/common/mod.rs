//! Shared helpers for the integration tests: run `v3` with a hard time limit, find the guests
//! built by guests/build.sh (through build.rs), skip KVM tests where KVM is unusable.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn out(&self) -> String {
        format!(
            "status {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// The running test's name (the harness names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

/// Path of a built guest.
pub fn guest(name: &str) -> PathBuf {
    let p = Path::new(env!("PALACIOS_GUEST_DIR")).join(name);
    assert!(
        p.is_file(),
        "guest {} was not built: run `bash guests/build.sh` and check that gcc/as/ld are installed",
        p.display()
    );
    p
}

/// True where KVM works; otherwise prints why the test is skipped.
pub fn kvm() -> bool {
    match palacios::kvm::probe() {
        None => true,
        Some(reason) => {
            palacios::vmm::test_support::skip_machine(
                &test_name(),
                &format!(
                    "KVM is not usable here ({reason}); the KVM half of this test did not run"
                ),
            );
            false
        }
    }
}

thread_local! {
    /// The backend `v3` runs and `backend_choice` use inside [`each_backend`].
    static CURRENT: std::cell::RefCell<Option<&'static str>> = const { std::cell::RefCell::new(None) };
    /// (status, PASS/FAIL lines) of every `v3` run of the current backend.
    static RUNS: std::cell::RefCell<Vec<(i32, Vec<String>)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The backends to test on: the emulator always, KVM where it is usable.
pub fn backends() -> Vec<&'static str> {
    let mut v = vec!["emu"];
    if kvm() {
        v.push("kvm");
    }
    v
}

/// The backend of the current [`each_backend`] iteration (`auto` outside one).
pub fn current_backend() -> &'static str {
    CURRENT.with(|c| c.borrow().unwrap_or("auto"))
}

/// Run `f` once per backend, with every `v3 run` inside it on that backend; then check that
/// the backends agree: the same exit statuses and the same PASS/FAIL lines, run by run.
pub fn each_backend(f: impl Fn(&'static str)) {
    let mut results: Vec<(&str, Vec<(i32, Vec<String>)>)> = Vec::new();
    for b in backends() {
        CURRENT.with(|c| *c.borrow_mut() = Some(b));
        RUNS.with(|r| r.borrow_mut().clear());
        eprintln!("--- backend {b}");
        f(b);
        results.push((b, RUNS.with(|r| std::mem::take(&mut *r.borrow_mut()))));
        CURRENT.with(|c| *c.borrow_mut() = None);
    }
    for w in results.windows(2) {
        let (a, ra) = &w[0];
        let (b, rb) = &w[1];
        assert_eq!(
            ra, rb,
            "backends {a} and {b} disagree (exit status, PASS/FAIL lines)"
        );
    }
}

/// A scratch directory for one test.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("v3-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run v3 with `args`, feeding `stdin`, killing it after `limit`.
pub fn v3(args: &[&str], stdin: &[u8], limit: Duration) -> Run {
    let mut args: Vec<&str> = args.to_vec();
    let backend = CURRENT.with(|c| *c.borrow());
    if let (Some(b), Some(&"run")) = (backend, args.first()) {
        args.insert(1, "--backend");
        args.insert(2, b);
    }
    let r = v3_raw(&args, stdin, limit);
    if backend.is_some() {
        let lines = r
            .stdout
            .lines()
            .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
            .map(str::to_string)
            .collect();
        RUNS.with(|x| x.borrow_mut().push((r.status, lines)));
    }
    r
}

/// The Linux guest built by scripts/fetch-linux-guest.sh (bzImage, initramfs, release), or
/// None (with a SKIP message) where it cannot be built here.
pub fn linux_guest() -> Option<(PathBuf, PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("scripts/fetch-linux-guest.sh");
    let run = Command::new("bash")
        .arg(&script)
        .current_dir(&root)
        .stdin(Stdio::null())
        .output();
    let (ok, log) = match &run {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run bash: {e}")),
    };
    let dir = root.join("guests/linux");
    let release = std::fs::read_to_string(dir.join("release")).ok();
    match (ok, release) {
        (true, Some(r)) => Some((
            dir.join("bzImage"),
            dir.join("initramfs.cpio.gz"),
            r.trim().to_string(),
        )),
        _ => {
            palacios::vmm::test_support::missing_prerequisite(
                &test_name(),
                &format!(
                    "scripts/fetch-linux-guest.sh could not build the Linux guest here:\n{}",
                    log.trim_end()
                ),
            );
            None
        }
    }
}

fn v3_raw(args: &[&str], stdin: &[u8], limit: Duration) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_v3"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start v3");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
        // Keep stdin open a little so that input is not an immediate EOF.
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "v3 {args:?} exceeded its {limit:?} limit; stderr: {}",
                e.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = feeder.join();
    Run {
        status: status.code().unwrap_or(-1),
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

/// A pseudo-terminal pair (master, slave).
fn open_pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; name, termios and winsize
    // may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

pub const LIMIT: Duration = Duration::from_secs(120);

/// An interactive `v3` run: the test types on its console and reads what it prints.
pub struct Session {
    child: std::process::Child,
    input: Option<Box<dyn Write + Send>>,
    seen: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    start: Instant,
}

impl Session {
    /// `v3` with its console on pipes (not a terminal: no raw mode, no escape keys).
    pub fn start(args: &[&str]) -> Session {
        Self::spawn(args, false)
    }

    /// `v3` with its console on a pseudo-terminal (stdin and stdout; stderr stays a pipe), in
    /// a new session with the terminal as its controlling terminal, as a user would run it.
    pub fn start_pty(args: &[&str]) -> Session {
        Self::spawn(args, true)
    }

    /// `v3` run through a wrapper command (`prefix`, for example `ip netns exec NS`).
    pub fn start_in(prefix: &[&str], args: &[&str]) -> Session {
        if prefix.is_empty() {
            return Self::start(args);
        }
        let mut all: Vec<&str> = prefix[1..].to_vec();
        all.push(env!("CARGO_BIN_EXE_v3"));
        all.extend_from_slice(args);
        Self::spawn_cmd(Command::new(prefix[0]), &all, false)
    }

    fn spawn(args: &[&str], pty: bool) -> Session {
        Self::spawn_cmd(Command::new(env!("CARGO_BIN_EXE_v3")), args, pty)
    }

    fn spawn_cmd(mut cmd: Command, args: &[&str], pty: bool) -> Session {
        cmd.args(args).stderr(Stdio::piped());
        let (input, output): (Box<dyn Write + Send>, Box<dyn Read + Send>);
        let mut child = if pty {
            let (master, slave) = open_pty();
            let slave2 = slave.try_clone().unwrap();
            cmd.stdin(Stdio::from(slave)).stdout(Stdio::from(slave2));
            // SAFETY: setsid and ioctl are async-signal-safe; the closure touches no memory
            // shared with the parent.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().expect("start v3");
            input = Box::new(master.try_clone().unwrap());
            output = Box::new(master);
            child
        } else {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
            let mut child = cmd.spawn().expect("start v3");
            input = Box::new(child.stdin.take().unwrap());
            output = Box::new(child.stdout.take().unwrap());
            child
        };
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for (mut r, sink) in [
            (output, seen.clone()),
            (
                Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
                stderr.clone(),
            ),
        ] {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // A pty master reads EIO once the child has gone: the end either way.
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Session {
            child,
            input: Some(input),
            seen,
            stderr,
            start: Instant::now(),
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.seen.lock().unwrap().clone()
    }

    pub fn describe(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.output(),
            self.stderr.lock().unwrap()
        )
    }

    /// Wait until `needle` appears at or after byte `from` of the output; returns the offset
    /// just past it. Panics (with the output) after `limit` or if v3 exits first.
    pub fn wait_for(&mut self, needle: &str, from: usize, limit: Duration) -> usize {
        let t = Instant::now();
        loop {
            {
                let s = self.seen.lock().unwrap();
                if let Some(p) = s.get(from..).and_then(|tail| tail.find(needle)) {
                    return from + p + needle.len();
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "v3 exited ({st}) before printing {needle:?}\n{}",
                    self.describe()
                );
            }
            if t.elapsed() > limit {
                panic!(
                    "no {needle:?} within {limit:?} ({:?} into the run)\n{}",
                    self.start.elapsed(),
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Type a line on the console.
    pub fn send(&mut self, line: &str) {
        self.send_raw(line.as_bytes());
        self.send_raw(b"\n");
    }

    /// Type bytes on the console (control keys included).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let i = self.input.as_mut().expect("stdin open");
        i.write_all(bytes).unwrap();
        i.flush().unwrap();
    }

    /// Wait for v3 to exit; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if t.elapsed() > limit {
                panic!("v3 did not exit within {limit:?}\n{}", self.describe());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill v3 with SIGKILL (no clean-up of any kind).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Linux guest's VM (examples/linux.xml's platform on the emulator) with a PCI bus
/// (`pci0`, i440FX, PIIX3) and `devices` added.
pub fn linux_pci_vm(kernel: &Path, initrd: &Path, devices: &str) -> String {
    format!(
        r#"<vm class="PC">
  <memory>256</memory>
  <cores count="1"><core/></cores>
  <backend>emu</backend>
  <files>
    <file id="kernel" filename="{}"/>
    <file id="initrd" filename="{}"/>
  </files>
  <devices>
    <device class="8259A" id="pic"/>
    <device class="8254_PIT" id="pit"/>
    <device class="LAPIC" id="lapic"/>
    <device class="IOAPIC" id="ioapic"/>
    <device class="NVRAM" id="nvram"><start_time>now</start_time></device>
    <device class="KEYBOARD" id="keyboard" on_reset="stop"/>
    <device class="PM_TIMER" id="pm_timer"/>
    <device class="ACPI" id="acpi"/>
    <device class="SERIAL" id="serial"/>
    <device class="PCI" id="pci0"/>
    <device class="i440FX" id="northbridge"><bus>pci0</bus></device>
    <device class="PIIX3" id="southbridge"><bus>pci0</bus></device>
{devices}
  </devices>
  <boot format="linux" kernel="kernel" initrd="initrd"
        cmdline="console=ttyS0 nokaslr cryptomgr.notests"/>
</vm>
"#,
        kernel.display(),
        initrd.display()
    )
}

/// A control-API request to the VM at `sock` (panics if the socket cannot be used).
pub fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    palacios_api::request(sock, method, path, body.as_ref(), Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// `v3 load CHECKPOINT [extra..] --api-sock SOCK`, once its API answers.
pub fn load_vm(ck: &Path, sock: &Path, extra: &[&str]) -> Session {
    let mut args = vec!["load", ck.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--api-sock", sock.to_str().unwrap()]);
    let s = Session::start(&args);
    wait_socket(sock, &s);
    s
}

/// Wait until the VM of `s` has created its API socket and built its VM
/// (the API answers 503 until then, e.g. while `v3 load` restores).
pub fn wait_socket(sock: &Path, s: &Session) {
    let t = Instant::now();
    loop {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no API socket, or the VM was never built\n{}",
            s.describe()
        );
        if sock.exists() {
            if let Ok((st, _)) =
                palacios_api::request(sock, "GET", "/vm", None, Duration::from_secs(10))
            {
                if st != 503 {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
