//! The API server: a thread accepting connections on a Unix socket (mode 0600), one request
//! per connection, each answered by the handler on its own short-lived thread so that a slow
//! request (a save) does not block a status query.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::http::{Request, Response, parse_request};

/// Answers one request.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// A running API server; stopping (or dropping) it removes the socket.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

impl Server {
    /// Listen on `path` (its directory is created 0700 if missing; a stale socket is
    /// replaced, a live one is an error).
    pub fn start(path: &Path, handler: Handler) -> std::io::Result<Server> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            if dir == crate::socket_dir() {
                // The shared default directory must be ours and closed to others, or another
                // user could have put a socket of theirs where we look for ours.
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(dir)?;
                // SAFETY: getuid cannot fail and has no side effects.
                let uid = unsafe { libc::getuid() };
                if m.uid() != uid || m.mode() & 0o077 != 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "{} must belong to you and be closed to others (mode 0700)",
                            dir.display()
                        ),
                    ));
                }
            }
        }
        if path.exists() {
            use std::os::unix::fs::FileTypeExt;
            if !std::fs::symlink_metadata(path)?.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running VM", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, handler, stop2))?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Most connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 16;

fn accept_loop(listener: UnixListener, handler: Handler, stop: Arc<AtomicBool>) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.write_all(
                        &Response::error(503, "too many API connections at once").encode(),
                    );
                    continue;
                }
                let h = handler.clone();
                let a = active.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            serve_one(conn, &h);
                            a.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::debug!("api: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Read one request, answer it, close.
pub fn serve_one(mut conn: UnixStream, handler: &Handler) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(READ_TIMEOUT));
    // The whole request must arrive within READ_TIMEOUT (not each read).
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let resp = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break Response::error(408, "the request did not arrive in time");
        }
        let _ = conn.set_read_timeout(Some(left));
        match parse_request(&buf) {
            Ok(Some((req, _))) => {
                // A panicking handler must not take the VMM down.
                break std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&req)))
                    .unwrap_or_else(|_| {
                        Response::error(500, "internal error handling the request")
                    });
            }
            Ok(None) => {}
            Err(e) => break Response::error(e.status(), e),
        }
        match conn.read(&mut chunk) {
            Ok(0) => {
                if buf.is_empty() {
                    return;
                }
                break Response::error(400, "malformed request: the connection closed mid-request");
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break Response::error(408, "the request did not arrive in time");
            }
            Err(_) => return,
        }
    };
    let _ = conn.write_all(&resp.encode());
    let _ = conn.flush();
}
