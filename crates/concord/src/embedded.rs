//! The embedded directory: a [`Table`] served on a host-wide Unix socket (mode 0600). There
//! is nothing to start: the first VM process whose tracker finds no directory takes a lock
//! next to the socket and serves it from a thread; when that process ends, the next tracker
//! to notice takes over, and every tracker sends its whole content again to a new directory.
//! `v3 concord serve` runs one on its own.

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::directory::{DirError, Directory, EntityInfo, Table};
use crate::wire::{self, Reply, Request};

/// The default socket: next to the VMs' API sockets.
pub fn default_socket() -> PathBuf {
    palacios_api::socket_dir().join("concord.sock")
}

/// A running directory server.
pub struct Server {
    pub path: PathBuf,
    table: Arc<Mutex<Table>>,
    stop: Arc<AtomicBool>,
    /// Frames refused (garbage, truncated, unknown).
    pub refused: Arc<AtomicU64>,
    _lock: std::fs::File,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock(t: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// Serve at `path` if no other process does (`Ok(None)`: one does).
    pub fn try_start(path: &Path) -> std::io::Result<Option<Server>> {
        use std::os::fd::AsRawFd;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let lockp = path.with_extension("lock");
        let lockf = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lockp)?;
        // SAFETY: flock on a descriptor we own; an advisory lock, released when it closes.
        if unsafe { libc::flock(lockf.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let table = Arc::new(Mutex::new(Table::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (t, s, r) = (table.clone(), stop.clone(), refused.clone());
        std::thread::Builder::new()
            .name("concord-dir".into())
            .spawn(move || {
                for c in listener.incoming() {
                    if s.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(c) = c else { continue };
                    let (t, r) = (t.clone(), r.clone());
                    let _ = std::thread::Builder::new()
                        .name("concord-conn".into())
                        .spawn(move || serve_conn(c, &t, &r));
                }
            })?;
        tracing::info!("ConCORD directory serving at {}", path.display());
        Ok(Some(Server {
            path: path.to_path_buf(),
            table,
            stop,
            refused,
            _lock: lockf,
        }))
    }

    /// Distinct contents in the table.
    pub fn distinct(&self) -> usize {
        lock(&self.table).distinct()
    }
}

fn serve_conn(c: UnixStream, table: &Mutex<Table>, refused: &AtomicU64) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(600)));
    let mut w = match c.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(c);
    loop {
        let body = match wire::read_frame(&mut r) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                refused.fetch_add(1, Ordering::Relaxed);
                let _ = wire::write_frame(&mut w, &Reply::Error(e.to_string()).encode());
                return;
            }
        };
        let reply = match Request::decode(&body) {
            Ok(req) => lock(table).apply(req),
            Err(e) => {
                // The stream cannot be trusted after a bad frame: answer and hang up.
                refused.fetch_add(1, Ordering::Relaxed);
                let _ = wire::write_frame(&mut w, &Reply::Error(e.to_string()).encode());
                return;
            }
        };
        if wire::write_frame(&mut w, &reply.encode()).is_err() {
            return;
        }
    }
}

/// A client of the embedded directory at a socket; a tracker's client may also host it.
pub struct UnixDirectory {
    path: PathBuf,
    may_host: bool,
    conn: Option<(BufReader<UnixStream>, UnixStream)>,
    hosted: Option<Server>,
}

impl UnixDirectory {
    pub fn new(path: PathBuf, may_host: bool) -> Self {
        UnixDirectory {
            path,
            may_host,
            conn: None,
            hosted: None,
        }
    }

    fn connect(&mut self) -> Result<(), DirError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let c = match UnixStream::connect(&self.path) {
            Ok(c) => c,
            Err(e) if self.may_host => {
                match Server::try_start(&self.path) {
                    Ok(Some(s)) => self.hosted = Some(s),
                    Ok(None) => {}
                    Err(e2) => {
                        return Err(DirError::Unavailable(format!(
                            "{}: {e}; cannot serve it here either: {e2}",
                            self.path.display()
                        )));
                    }
                }
                // Another process may hold the lock and be about to bind: give it a moment.
                let mut tries = 0;
                loop {
                    match UnixStream::connect(&self.path) {
                        Ok(c) => break c,
                        Err(e) if tries < 25 && self.hosted.is_none() => {
                            let _ = e;
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            return Err(DirError::Unavailable(format!(
                                "{}: {e}",
                                self.path.display()
                            )));
                        }
                    }
                }
            }
            Err(e) => {
                return Err(DirError::Unavailable(format!(
                    "{}: {e} (no VM with ConCORD tracking runs on this host, and no `v3 concord serve`)",
                    self.path.display()
                )));
            }
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = c.set_write_timeout(Some(Duration::from_secs(30)));
        let w = c
            .try_clone()
            .map_err(|e| DirError::Unavailable(e.to_string()))?;
        self.conn = Some((BufReader::new(c), w));
        Ok(())
    }

    fn call(&mut self, req: &Request) -> Result<Reply, DirError> {
        self.connect()?;
        let Some((r, w)) = self.conn.as_mut() else {
            return Err(DirError::Unavailable("not connected".into()));
        };
        let res = wire::write_frame(w, &req.encode()).and_then(|_| wire::read_frame(r));
        let body = match res {
            Ok(Some(b)) => b,
            Ok(None) => {
                self.conn = None;
                return Err(DirError::Unavailable(
                    "the directory closed the connection".into(),
                ));
            }
            Err(e) => {
                self.conn = None;
                return Err(DirError::Unavailable(e.to_string()));
            }
        };
        match Reply::decode(&body) {
            Ok(Reply::Error(m)) => Err(DirError::Refused(m)),
            Ok(r) => Ok(r),
            Err(e) => {
                self.conn = None;
                Err(DirError::Unavailable(format!("garbled reply: {e}")))
            }
        }
    }
}

fn unexpected(r: Reply) -> DirError {
    DirError::Refused(format!("unexpected reply {r:?}"))
}

impl Directory for UnixDirectory {
    fn describe(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    fn publish(
        &mut self,
        entity: &str,
        host: &str,
        api: &str,
        full: bool,
        updates: &[(u64, u32)],
    ) -> Result<(), DirError> {
        // Large publishes go in frames of at most 1 M updates (the first carries `full`).
        const CHUNK: usize = 1 << 20;
        let mut first = true;
        let mut rest = updates;
        loop {
            let n = rest.len().min(CHUNK);
            let req = Request::Publish {
                entity: entity.into(),
                host: host.into(),
                api: api.into(),
                full: full && first,
                updates: rest[..n].to_vec(),
            };
            match self.call(&req)? {
                Reply::Ok => {}
                r => return Err(unexpected(r)),
            }
            rest = &rest[n..];
            first = false;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    fn entities(&mut self) -> Result<Vec<EntityInfo>, DirError> {
        match self.call(&Request::Entities)? {
            Reply::Json(v) => {
                serde_json::from_value(v).map_err(|e| DirError::Refused(e.to_string()))
            }
            r => Err(unexpected(r)),
        }
    }

    fn holders(&mut self, hash: u64) -> Result<Vec<(String, u32)>, DirError> {
        match self.call(&Request::Holders(hash))? {
            Reply::Json(v) => {
                serde_json::from_value(v).map_err(|e| DirError::Refused(e.to_string()))
            }
            r => Err(unexpected(r)),
        }
    }

    fn contents(&mut self, entity: &str) -> Result<HashMap<u64, u32>, DirError> {
        match self.call(&Request::Contents(entity.into())) {
            Ok(Reply::Contents(v)) => Ok(v.into_iter().collect()),
            Ok(r) => Err(unexpected(r)),
            Err(DirError::Refused(m)) if m.starts_with("no entity") => {
                Err(DirError::NoEntity(entity.into()))
            }
            Err(e) => Err(e),
        }
    }

    fn remove(&mut self, entity: &str) -> Result<(), DirError> {
        self.call(&Request::Remove(entity.into())).map(|_| ())
    }

    fn hosting(&self) -> bool {
        self.hosted.is_some()
    }
}
