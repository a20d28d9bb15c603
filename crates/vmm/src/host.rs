//! The host interface: everything the VMM needs from the machine it runs on.
//!
//! The core, devices and loaders reach the outside world only through [`Host`]. [`LinuxHost`]
//! is the default implementation; an embedder can supply its own (a test host with virtual
//! time, a kernel-module host, ...).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::control::Kick;

/// A thread started through the host.
pub trait HostThread: Send {
    /// Make a blocking backend call on this thread return (for example KVM_RUN with EINTR).
    fn kicker(&self) -> Arc<dyn Kick>;
    fn is_finished(&self) -> bool;
    /// Wait for the thread; `Err` if it panicked.
    fn join(self: Box<Self>) -> Result<(), String>;
}

/// Input half of a host stream, polled with a timeout so its pump can stop cleanly.
pub trait StreamInput: Send {
    /// `Ok(None)` on timeout, `Ok(Some(0))` at end of stream.
    fn read_timeout(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>>;
}

/// A host character stream: output, and optionally input.
pub struct HostStream {
    pub name: String,
    pub output: Box<dyn Write + Send>,
    pub input: Option<Box<dyn StreamInput>>,
}

/// What the VMM needs from its host.
pub trait Host: Send + Sync {
    /// Monotonic time since the host object was created.
    fn now(&self) -> Duration;
    /// Start a named thread.
    fn spawn(&self, name: &str, f: Box<dyn FnOnce() + Send>) -> io::Result<Box<dyn HostThread>>;
    /// A host that only validates configs (nothing runs; helper threads are not started).
    fn is_dry_run(&self) -> bool {
        false
    }
    /// Read a whole file.
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The user's console (the `v3` terminal).
    fn console(&self) -> io::Result<HostStream>;
    /// Open a named stream: `file:PATH` (output appended to a file), `unix:PATH` (a Unix socket,
    /// both directions), `console` or `stdio`, or `null`.
    fn open_stream(&self, spec: &str) -> io::Result<HostStream>;
}

/// A file name that names a guest image bundled into the program (`guest:pctest.elf`), not a
/// path. Configs keep such names as they are; [`LinuxHost::read_file`] serves them.
pub const BUNDLED_PREFIX: &str = "guest:";

/// Files compiled into the program, by name.
pub type Bundled = &'static [(&'static str, &'static [u8])];

/// The bundled file a `guest:NAME` path names: `Ok(None)` for an ordinary path, an error
/// listing what is bundled for an unknown name.
pub fn bundled_file(bundled: Bundled, path: &Path) -> io::Result<Option<&'static [u8]>> {
    let Some(name) = path.to_str().and_then(|p| p.strip_prefix(BUNDLED_PREFIX)) else {
        return Ok(None);
    };
    match bundled.iter().find(|(n, _)| *n == name) {
        Some((_, data)) => Ok(Some(data)),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            if bundled.is_empty() {
                format!("no bundled guest '{name}': this program was built without its guests")
            } else {
                format!(
                    "no bundled guest '{name}' (bundled: {})",
                    bundled
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        )),
    }
}

/// Type of the callback run when the user types the console's stop key (Ctrl-A x).
pub type ConsoleStop = Arc<dyn Fn() + Send + Sync>;

/// The Linux host.
pub struct LinuxHost {
    start: Instant,
    raw_console: bool,
    bundled: Bundled,
    on_console_stop: Option<ConsoleStop>,
}

impl LinuxHost {
    /// `raw_console`: put a terminal stdin into raw mode while the console is open.
    pub fn new(raw_console: bool) -> Self {
        LinuxHost {
            start: Instant::now(),
            raw_console,
            bundled: &[],
            on_console_stop: None,
        }
    }

    /// Serve these files for `guest:NAME` paths.
    pub fn with_bundled(mut self, bundled: Bundled) -> Self {
        self.bundled = bundled;
        self
    }

    /// What the console's stop key (Ctrl-A x on a raw terminal) does; without it the key is
    /// passed to the guest like any other.
    pub fn on_console_stop(mut self, f: ConsoleStop) -> Self {
        self.on_console_stop = Some(f);
        self
    }
}

impl Default for LinuxHost {
    fn default() -> Self {
        Self::new(true)
    }
}

const KICK_SIGNAL_OFFSET: i32 = 0;

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// A function the kick signal handler calls on the kicked thread (for example to set KVM's
/// `immediate_exit` of the vCPU that thread runs, so that a kick arriving just before
/// `KVM_RUN` is not lost). It must be async-signal-safe.
static KICK_HOOK: std::sync::atomic::AtomicPtr<()> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Install the kick hook (one per process; a later call replaces it).
pub fn set_kick_hook(hook: fn()) {
    KICK_HOOK.store(hook as *mut (), std::sync::atomic::Ordering::Release);
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KICK_HOOK.load(std::sync::atomic::Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: the only non-null value ever stored is a `fn()` cast to a pointer
        // (set_kick_hook); function pointers and data pointers have the same size here.
        let hook: fn() = unsafe { std::mem::transmute::<*mut (), fn()>(p) };
        hook();
    }
}

fn install_kick_handler() -> io::Result<()> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    // The handler's purpose is that a blocking call returns EINTR (and the kick hook).
    let r = DONE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    });
    r.map_err(io::Error::from_raw_os_error)
}

struct LinuxThread {
    handle: std::thread::JoinHandle<()>,
    kicker: Arc<SignalKick>,
}

struct SignalKick {
    thread: libc::pthread_t,
    /// True until the thread's function has returned; the thread sets it false (under the
    /// lock) as its last act, so a kick that holds the lock signals a thread that has not
    /// finished, whose pthread_t is therefore valid.
    alive: Arc<Mutex<bool>>,
}

impl Kick for SignalKick {
    fn kick(&self) {
        let alive = self.alive.lock().unwrap_or_else(|p| p.into_inner());
        if *alive {
            // SAFETY: `alive` is true while we hold its lock, so the thread has not returned
            // from its function and cannot have been joined: its pthread_t is valid.
            // Signalling it with the handled kick signal has no effect but EINTR (and the hook).
            unsafe {
                libc::pthread_kill(self.thread, kick_signal());
            }
        }
    }
}

impl HostThread for LinuxThread {
    fn kicker(&self) -> Arc<dyn Kick> {
        self.kicker.clone()
    }
    fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
    fn join(self: Box<Self>) -> Result<(), String> {
        self.handle.join().map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    }
}

impl Host for LinuxHost {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn spawn(&self, name: &str, f: Box<dyn FnOnce() + Send>) -> io::Result<Box<dyn HostThread>> {
        install_kick_handler()?;
        let alive = Arc::new(Mutex::new(true));
        let alive2 = alive.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // Marks the thread finished even if `f` panics.
                struct Done(Arc<Mutex<bool>>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = false;
                    }
                }
                let _done = Done(alive2);
                f()
            })?;
        let thread = std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle);
        Ok(Box::new(LinuxThread {
            handle,
            kicker: Arc::new(SignalKick { thread, alive }),
        }))
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        if let Some(data) = bundled_file(self.bundled, path)? {
            return Ok(data.to_vec());
        }
        if path.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "it is a directory, not a file",
            ));
        }
        std::fs::read(path)
    }

    fn console(&self) -> io::Result<HostStream> {
        let tty = is_tty(0);
        let raw = tty && self.raw_console;
        // With a stop key, Ctrl-C goes to the guest (no ISIG) and Ctrl-A x stops the VM.
        let escape = raw.then(|| self.on_console_stop.clone()).flatten();
        if raw {
            set_raw_terminal(escape.is_none())?;
        }
        let fd = FdInput { fd: None, raw: 0 };
        Ok(HostStream {
            name: "console".into(),
            output: Box::new(ConsoleOut { raw }),
            input: Some(match escape {
                Some(stop) => Box::new(EscapeInput::new(fd, stop)),
                None => Box::new(fd),
            }),
        })
    }

    fn open_stream(&self, spec: &str) -> io::Result<HostStream> {
        let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
        match kind {
            "console" | "stdio" => self.console(),
            "null" => Ok(HostStream {
                name: spec.into(),
                output: Box::new(io::sink()),
                input: None,
            }),
            "file" if !arg.is_empty() => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(arg)?;
                Ok(HostStream {
                    name: spec.into(),
                    output: Box::new(f),
                    input: None,
                })
            }
            "unix" if !arg.is_empty() => {
                let s = std::os::unix::net::UnixStream::connect(arg)?;
                let r = s.try_clone()?;
                let fd = OwnedFd::from(r);
                let raw = fd.as_raw_fd();
                Ok(HostStream {
                    name: spec.into(),
                    output: Box::new(s),
                    input: Some(Box::new(FdInput { fd: Some(fd), raw })),
                })
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown stream '{spec}' (expected file:PATH, unix:PATH, console or null)"),
            )),
        }
    }
}

/// A host for validating configs: streams are checked for syntax and opened as nothing,
/// threads are refused. Files are read normally.
pub struct DryRunHost;

impl Host for DryRunHost {
    fn is_dry_run(&self) -> bool {
        true
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
    fn spawn(&self, name: &str, _f: Box<dyn FnOnce() + Send>) -> io::Result<Box<dyn HostThread>> {
        Err(io::Error::other(format!(
            "dry run: thread '{name}' not started"
        )))
    }
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn console(&self) -> io::Result<HostStream> {
        Ok(HostStream {
            name: "console".into(),
            output: Box::new(io::sink()),
            input: None,
        })
    }
    fn open_stream(&self, spec: &str) -> io::Result<HostStream> {
        let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
        match kind {
            "console" | "stdio" | "null" => {}
            "file" if !arg.is_empty() => {
                let p = Path::new(arg);
                if p.is_dir() {
                    return Err(io::Error::new(
                        io::ErrorKind::IsADirectory,
                        format!("{arg} is a directory, not a file"),
                    ));
                }
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.is_dir() {
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("the directory {} does not exist", dir.display()),
                        ));
                    }
                }
            }
            "unix" if !arg.is_empty() => {
                use std::os::unix::fs::FileTypeExt;
                match std::fs::metadata(arg) {
                    Ok(m) if m.file_type().is_socket() => {}
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{arg} is not a Unix socket"),
                        ));
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "no Unix socket at {arg} ({e}); the program that listens on \
                                 it must be started first"
                            ),
                        ));
                    }
                }
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "unknown stream '{spec}' (expected file:PATH, unix:PATH, console or null)"
                    ),
                ));
            }
        }
        Ok(HostStream {
            name: spec.into(),
            output: Box::new(io::sink()),
            input: None,
        })
    }
}

/// A file descriptor read with poll(2) and a timeout.
struct FdInput {
    /// Owned descriptor, or `None` for stdin (fd `raw`).
    fd: Option<OwnedFd>,
    raw: RawFd,
}

impl StreamInput for FdInput {
    fn read_timeout(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let fd = self.fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(self.raw);
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `p` is a valid pollfd for the duration of the call; nfds is 1.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: `buf` is valid writable memory of `buf.len()` bytes; `fd` is open.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as usize))
    }
}

/// The keys of the console's escape sequences (QEMU's): Ctrl-A then a letter.
pub const ESCAPE_HELP: &str = "Console keys (Ctrl-A then):\r\n  x        stop the VM\r\n  h        this help\r\n  Ctrl-A   send Ctrl-A to the guest\r\n(Ctrl-C goes to the guest)\r\n";

const CTRL_A: u8 = 0x01;

/// Console input on a raw terminal with escape sequences: Ctrl-A x stops the VM, Ctrl-A h
/// prints the keys, Ctrl-A Ctrl-A sends one Ctrl-A; any other key after Ctrl-A is passed on
/// with the Ctrl-A. Everything else, Ctrl-C included, goes to the guest.
pub struct EscapeInput<I> {
    inner: I,
    stop: ConsoleStop,
    /// The previous byte was an unconsumed Ctrl-A.
    armed: bool,
}

impl<I> EscapeInput<I> {
    pub fn new(inner: I, stop: ConsoleStop) -> Self {
        EscapeInput {
            inner,
            stop,
            armed: false,
        }
    }

    /// Filter `buf[..n]` in place; returns the bytes for the guest. A Ctrl-A followed by an
    /// unknown key becomes both bytes, so it may need one byte more than it consumed: that
    /// The caller reads at most half its buffer, so the result always fits.
    fn filter(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for &b in data {
            if !self.armed {
                if b == CTRL_A {
                    self.armed = true;
                } else {
                    out.push(b);
                }
                continue;
            }
            self.armed = false;
            match b {
                b'x' | b'X' => (self.stop)(),
                b'h' | b'H' | b'?' => {
                    let mut e = io::stderr().lock();
                    let _ = e.write_all(ESCAPE_HELP.as_bytes());
                    let _ = e.flush();
                }
                CTRL_A => out.push(CTRL_A),
                other => {
                    out.push(CTRL_A);
                    out.push(other);
                }
            }
        }
    }
}

impl<I: StreamInput> StreamInput for EscapeInput<I> {
    fn read_timeout(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if buf.len() < 2 {
            return self.inner.read_timeout(buf, timeout);
        }
        // Read at most half the buffer: the output is at most one byte longer than the input.
        let half = buf.len() / 2;
        let Some(n) = self.inner.read_timeout(&mut buf[..half], timeout)? else {
            return Ok(None);
        };
        if n == 0 {
            return Ok(Some(0));
        }
        let mut out = Vec::with_capacity(n + 1);
        let data = buf[..n].to_vec();
        self.filter(&data, &mut out);
        if out.is_empty() {
            // Only escape keys: nothing for the guest (not end of input).
            return Ok(None);
        }
        buf[..out.len()].copy_from_slice(&out);
        Ok(Some(out.len()))
    }
}

/// Standard output; in raw mode a lone LF becomes CR LF so lines start at column 0.
struct ConsoleOut {
    raw: bool,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        if self.raw {
            for &b in buf {
                if b == b'\n' {
                    out.write_all(b"\r\n")?;
                } else {
                    out.write_all(&[b])?;
                }
            }
        } else {
            out.write_all(buf)?;
        }
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Put the terminal on stdin into raw mode (no echo, no line editing). With `keep_signals`
/// Ctrl-C still raises SIGINT (and stops the VM); without it Ctrl-C is an ordinary byte for the
/// guest. The previous mode is restored by [`restore_terminal`].
pub fn set_raw_terminal(keep_signals: bool) -> io::Result<()> {
    let mut saved = SAVED_TERMIOS.lock().unwrap_or_else(|p| p.into_inner());
    if saved.is_some() {
        return Ok(());
    }
    // SAFETY: termios is plain old data; tcgetattr fills it completely on success.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 and a valid termios pointer.
    if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let orig = t;
    t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
    if !keep_signals {
        t.c_lflag &= !libc::ISIG;
    }
    t.c_iflag &= !(libc::ICRNL | libc::IXON);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: fd 0 and a valid termios pointer.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    *saved = Some(orig);
    Ok(())
}

/// Restore the terminal mode saved by [`set_raw_terminal`]; harmless if none was saved.
pub fn restore_terminal() {
    let mut saved = SAVED_TERMIOS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = saved.take() {
        // SAFETY: fd 0 and a termios obtained from tcgetattr.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
    }
}

/// Read helper for tests and embedders: drain a [`StreamInput`] into a Vec until EOF.
pub fn read_all(input: &mut dyn StreamInput) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    while let Some(n) = input.read_timeout(&mut buf, Duration::from_secs(5))? {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.input {
            Some(i) => loop {
                if let Some(n) = i.read_timeout(buf, Duration::from_secs(3600))? {
                    return Ok(n);
                }
            },
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input from a script of chunks (one per read).
    struct Script(std::collections::VecDeque<Vec<u8>>);
    impl StreamInput for Script {
        fn read_timeout(&mut self, buf: &mut [u8], _: Duration) -> io::Result<Option<usize>> {
            let Some(mut c) = self.0.pop_front() else {
                return Ok(Some(0));
            };
            if c.len() > buf.len() {
                let rest = c.split_off(buf.len());
                self.0.push_front(rest);
            }
            buf[..c.len()].copy_from_slice(&c);
            Ok(Some(c.len()))
        }
    }

    #[test]
    fn console_escape_keys() {
        let stops = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let s2 = stops.clone();
        let chunks = [
            &b"ab\x03c"[..], // Ctrl-C is an ordinary byte for the guest
            b"\x01",         // Ctrl-A at the end of one read ...
            b"\x01d",        // ... then Ctrl-A: one literal Ctrl-A
            b"\x01h",        // help: nothing for the guest
            b"\x01z",        // unknown key: both bytes
            b"e\x01x",       // stop
            b"f",
        ];
        let mut input = EscapeInput::new(
            Script(chunks.iter().map(|c| c.to_vec()).collect()),
            Arc::new(move || {
                s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        );
        let mut got = Vec::new();
        let mut buf = [0u8; 2];
        loop {
            match input.read_timeout(&mut buf, Duration::ZERO).unwrap() {
                None => continue,
                Some(0) => break,
                Some(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        assert_eq!(got, b"ab\x03c\x01d\x01zef");
        assert_eq!(stops.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn bundled_guests_are_served_by_name() {
        static FILES: Bundled = &[("tiny.bin", b"\xfa\xf4")];
        let host = LinuxHost::new(false).with_bundled(FILES);
        assert_eq!(
            host.read_file(Path::new("guest:tiny.bin")).unwrap(),
            b"\xfa\xf4"
        );
        let e = host.read_file(Path::new("guest:nope.elf")).unwrap_err();
        assert!(
            e.to_string()
                .contains("no bundled guest 'nope.elf' (bundled: tiny.bin)"),
            "{e}"
        );
        let e = host.read_file(&std::env::temp_dir()).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn file_stream_appends_and_unknown_stream_is_refused() {
        let dir = std::env::temp_dir().join(format!("palacios-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.txt");
        let host = LinuxHost::new(false);
        let mut s = host
            .open_stream(&format!("file:{}", path.display()))
            .unwrap();
        s.output.write_all(b"hello").unwrap();
        drop(s);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        let e = host.open_stream("tcp:1.2.3.4").err().unwrap();
        assert!(e.to_string().contains("unknown stream"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unix_stream_both_directions() {
        let dir = std::env::temp_dir().join(format!("palacios-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let host = LinuxHost::new(false);
        let mut s = host
            .open_stream(&format!("unix:{}", path.display()))
            .unwrap();
        let (mut peer, _) = l.accept().unwrap();
        s.output.write_all(b"out").unwrap();
        let mut b = [0u8; 3];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"out");
        peer.write_all(b"in").unwrap();
        drop(peer);
        assert_eq!(read_all(s.input.as_mut().unwrap().as_mut()).unwrap(), b"in");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kick_interrupts_a_blocking_call() {
        let host = LinuxHost::new(false);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = host
            .spawn(
                "sleeper",
                Box::new(move || {
                    // SAFETY: plain sleep; returns early with the remaining time on a signal.
                    let left = unsafe { libc::sleep(30) };
                    tx.send(left).unwrap();
                }),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let k = t.kicker();
        let left = loop {
            k.kick();
            if let Ok(v) = rx.recv_timeout(Duration::from_millis(20)) {
                break v;
            }
        };
        assert!(left > 0, "sleep was not interrupted");
        t.join().unwrap();
    }
}
