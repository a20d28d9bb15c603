//! Live migration (Palacios' `v3_send` / `v3_receive`): pre-copy over a byte stream.
//!
//! The source opens with a [`wire::Hello`] (stream version, config, CPU model); the
//! destination builds the VM and answers `Ready` or refuses, before the source pauses. Then a
//! full pass of guest memory while the guest runs, rounds of the pages it dirtied (the core's
//! [`crate::dirty`] service) until what is left fits the downtime limit at the measured
//! bandwidth (or a round limit; a guest that dirties faster than the link is slowed), and a
//! stop-and-copy of the last pages and all state. The destination restores and runs the VM,
//! says `Resumed`, and only then does the source end. Any failure before that leaves the
//! source running; see `docs/migration.md` for what each side is left with after one.

pub mod wire;

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::backend::missing_features;
use crate::control::{Outcome, VmHandle};
use crate::dirty::DirtySet;
use crate::snapshot::{MemSource, VmParts};
use crate::vm::Vm;
use wire::{Hello, Kind, WireError};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the source gave up: {0}")]
    SourceAborted(String),
    #[error("cannot reach the destination {dest}: {source}")]
    Connect {
        dest: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Vm(String),
    #[error("{0}")]
    Incompatible(String),
}

/// How to migrate.
#[derive(Clone, Debug)]
pub struct SendOpts {
    /// The longest the guest may be paused for the last copy.
    pub downtime: Duration,
    /// Cap on the link use, bytes per second (`None`: as fast as it goes).
    pub bandwidth: Option<u64>,
    /// Copy rounds before the stop-and-copy, at most.
    pub max_rounds: u32,
}

impl Default for SendOpts {
    fn default() -> Self {
        SendOpts {
            downtime: Duration::from_millis(50),
            bandwidth: None,
            max_rounds: 30,
        }
    }
}

/// Where a migration stands (the API's `GET /migrate`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Progress {
    /// idle, connecting, copying, stop-and-copy, done, failed
    pub state: String,
    pub dest: String,
    pub round: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Pages dirtied in the last round, and per second.
    pub dirty_pages: u64,
    pub dirty_rate: f64,
    /// Measured link throughput, bytes per second.
    pub bandwidth: f64,
    /// What the stop-and-copy would take now, ms.
    pub expected_downtime_ms: f64,
    /// Auto-converge: the share of time (%) the guest is held paused while the copy catches up.
    pub throttle_percent: u64,
    /// The guest's pause for the last copy, ms (when done).
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub error: Option<String>,
}

type Shared = Arc<Mutex<Progress>>;

/// Auto-converge: pauses the guest for a share of every 20 ms while it runs, so the copy can
/// catch up with a guest that dirties memory faster than the link carries it. Each pause is
/// short (at most 18 ms), so the guest never stops for long. Stops when dropped.
struct Throttle {
    percent: Arc<std::sync::atomic::AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn new(handle: VmHandle) -> Self {
        use std::sync::atomic::Ordering;
        let percent = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("auto-converge".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let pct = u64::from(p.load(Ordering::Acquire));
                    // A VM paused by someone else is left alone (and left paused).
                    if pct > 0
                        && !handle.is_paused()
                        && handle.pause(Duration::from_secs(1)).is_ok()
                    {
                        std::thread::sleep(Duration::from_micros(200 * pct));
                        handle.resume();
                    }
                    std::thread::sleep(Duration::from_micros(200 * (100 - pct)));
                }
            })
            .ok();
        Throttle {
            percent,
            stop,
            thread,
        }
    }

    fn percent(&self) -> u32 {
        self.percent.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Slow the guest further: 20 %, then 40, 60, 80, 90 % of the time paused.
    fn harder(&self) {
        let p = self.percent();
        let next = if p == 0 { 20 } else { (p + 20).min(90) };
        self.percent
            .store(next, std::sync::atomic::Ordering::Release);
        tracing::info!("auto-converge: the guest is paused {next}% of the time");
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set(p: &Shared, f: impl FnOnce(&mut Progress)) {
    f(&mut p.lock().unwrap_or_else(|e| e.into_inner()));
}

/// Sends frames, honouring a bandwidth cap and counting what went out.
struct Link {
    s: TcpStream,
    cap: Option<u64>,
    start: Instant,
    sent: u64,
}

impl Link {
    fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrateError> {
        let (head, tail) = wire::frame_parts(kind, payload);
        self.s.write_all(&head).map_err(WireError::Io)?;
        self.s.write_all(payload).map_err(WireError::Io)?;
        self.s.write_all(&tail).map_err(WireError::Io)?;
        self.sent += (head.len() + payload.len() + tail.len()) as u64;
        if let Some(cap) = self.cap {
            let due = Duration::from_secs_f64(self.sent as f64 / cap as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

/// Whether a page is all zero (OR-folded in 64-byte blocks, which vectorizes).
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|b| {
        b.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap_or_default())
        }) == 0
    })
}

/// Send the pages of `set` (page indices of the dirty log) in batches, each page read from
/// guest memory straight into the frame; zero pages as markers (`skip_zero`: not at all, for
/// the first pass to a destination whose RAM is still zero; pages the source never touched
/// are not even read then). Returns the pages sent.
fn send_pages(
    link: &mut Link,
    parts: &VmParts,
    src: &MemSource,
    set: &DirtySet,
    skip_zero: bool,
) -> Result<u64, MigrateError> {
    use palacios_checkpoint::MemorySource;
    const CHUNK: u64 = 256 * wire::PAGE as u64;
    let mut payload: Vec<u8> = Vec::with_capacity(4 + wire::BATCH * (8 + wire::PAGE));
    payload.extend_from_slice(&[0; 4]);
    let mut count = 0u32;
    let mut sent = 0u64;
    // Never-touched pages of the chunk being sent (the first pass).
    let mut untouched: (u64, Option<Vec<bool>>) = (u64::MAX, None);
    for idx in set.iter() {
        let Some(gpa) = parts.dirty.page_gpa(idx) else {
            continue;
        };
        if skip_zero {
            let chunk = gpa & !(CHUNK - 1);
            if untouched.0 != chunk {
                untouched = (chunk, src.known_zero(chunk, CHUNK));
            }
            let k = ((gpa - chunk) / wire::PAGE as u64) as usize;
            if untouched
                .1
                .as_ref()
                .is_some_and(|z| z.get(k) == Some(&true))
            {
                continue;
            }
        }
        let at = payload.len();
        payload.extend_from_slice(&gpa.to_le_bytes());
        payload.resize(at + 8 + wire::PAGE, 0);
        parts
            .mem
            .read_slice(&mut payload[at + 8..], GuestAddress(gpa))
            .map_err(|e| MigrateError::Vm(format!("read guest memory at {gpa:#x}: {e}")))?;
        if is_zero(&payload[at + 8..]) {
            // A marker even in the first pass: the destination's devices may have written
            // that page while it was built (ACPI and MP tables).
            payload.truncate(at + 8);
            payload[at] |= 1;
        }
        count += 1;
        sent += 1;
        if count as usize == wire::BATCH {
            payload[..4].copy_from_slice(&count.to_le_bytes());
            link.frame(Kind::Pages, &payload)?;
            payload.truncate(4);
            count = 0;
        }
    }
    if count > 0 {
        payload[..4].copy_from_slice(&count.to_le_bytes());
        link.frame(Kind::Pages, &payload)?;
    }
    Ok(sent)
}

/// Migrate the VM behind `handle` to `dest` (`HOST:PORT`). On success the VM has ended here
/// ([`Outcome::Migrated`]); on failure before the destination took over, it runs on here.
pub fn send(
    handle: &VmHandle,
    dest: &str,
    opts: &SendOpts,
    progress: &Shared,
) -> Result<(), MigrateError> {
    let t0 = Instant::now();
    set(progress, |p| {
        *p = Progress {
            state: "connecting".into(),
            dest: dest.into(),
            ..Default::default()
        }
    });
    let r = send_inner(handle, dest, opts, progress, t0);
    handle.stop_dirty_tracking();
    match &r {
        Ok(()) => set(progress, |p| {
            p.state = "done".into();
            p.total_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        }),
        Err(e) => {
            let msg = e.to_string();
            tracing::warn!("migration to {dest} failed: {msg}");
            set(progress, |p| {
                p.state = "failed".into();
                p.error = Some(msg);
            });
        }
    }
    r
}

fn send_inner(
    handle: &VmHandle,
    dest: &str,
    opts: &SendOpts,
    progress: &Shared,
    t0: Instant,
) -> Result<(), MigrateError> {
    let parts = handle
        .parts()
        .cloned()
        .ok_or_else(|| MigrateError::Vm("the VM is not built yet".into()))?;
    if handle.outcome().is_some() {
        return Err(MigrateError::Vm("the VM has ended".into()));
    }
    if !parts.without_state.is_empty() {
        return Err(MigrateError::Vm(format!(
            "device(s) {} keep state this build cannot move",
            parts.without_state.join(", ")
        )));
    }
    let addr = std::net::ToSocketAddrs::to_socket_addrs(dest)
        .map_err(|source| MigrateError::Connect {
            dest: dest.into(),
            source,
        })?
        .next()
        .ok_or_else(|| MigrateError::Connect {
            dest: dest.into(),
            source: std::io::Error::other("the name has no address"),
        })?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|source| {
        MigrateError::Connect {
            dest: dest.into(),
            source,
        }
    })?;
    let _ = s.set_nodelay(true);
    // A link that stops moving (a cut cable, a dead peer) fails the migration, never hangs it.
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(30))))
        .map_err(WireError::Io)?;
    let mut reader = s.try_clone().map_err(WireError::Io)?;
    let mut link = Link {
        s,
        cap: opts.bandwidth,
        start: Instant::now(),
        sent: 0,
    };
    let hello = Hello {
        version: wire::VERSION.into(),
        config: serde_json::to_value(&parts.config).unwrap_or_default(),
        cpuid: parts.cpuid.clone(),
        backend: parts.backend.into(),
        regions: parts.dirty.regions().iter().map(|r| (r.0, r.1)).collect(),
    };
    link.frame(Kind::Hello, &serde_json::to_vec(&hello).unwrap_or_default())?;
    let reply = wire::read_frame(&mut reader)?;
    match reply.kind {
        Kind::Ready => {}
        Kind::Refuse => return Err(MigrateError::Refused(wire::refusal(&reply.payload))),
        k => {
            return Err(MigrateError::Vm(format!(
                "the destination answered {k:?} instead of Ready"
            )));
        }
    }
    handle
        .start_dirty_tracking()
        .map_err(|e| MigrateError::Vm(format!("cannot track dirty pages: {e}")))?;
    let src = MemSource {
        mem: &parts.mem,
        anonymous: !parts.mem_from_file,
        pagemap: std::fs::File::open("/proc/self/pagemap").ok(),
    };
    set(progress, |p| p.state = "copying".into());
    // The full pass.
    let pass = Instant::now();
    let n = send_pages(
        &mut link,
        &parts,
        &src,
        &DirtySet::all(parts.dirty.pages()),
        true,
    )?;
    let mut bw = link.sent as f64 / pass.elapsed().as_secs_f64().max(1e-6);
    set(progress, |p| {
        p.round = 1;
        p.pages_sent += n;
        p.bytes_sent = link.sent;
        p.bandwidth = bw;
    });
    let mut round = 1;
    let mut prev_dirty = u64::MAX;
    let mut extra = 0;
    let throttle = Throttle::new(handle.clone());
    let mut last = Instant::now();
    // Rounds of dirty pages while the guest runs.
    let leftover = loop {
        let set_ = handle
            .dirty_round()
            .map_err(|e| MigrateError::Vm(format!("dirty log: {e}")))?;
        let dirty = set_.count() as u64;
        let secs = last.elapsed().as_secs_f64().max(1e-6);
        last = Instant::now();
        let expected = dirty as f64 * wire::PAGE as f64 / bw.max(1.0);
        set(progress, |p| {
            p.dirty_pages = dirty;
            p.dirty_rate = dirty as f64 / secs;
            p.expected_downtime_ms = expected * 1e3;
            p.throttle_percent = throttle.percent() as u64;
        });
        // Within the limit: stop, unless the rounds still shrink fast (then up to two more
        // rounds make the pause shorter still).
        let shrinking = dirty.saturating_mul(4) <= prev_dirty.saturating_mul(3);
        if round >= opts.max_rounds
            || (expected <= opts.downtime.as_secs_f64() && (!shrinking || extra >= 2))
        {
            break set_;
        }
        if expected <= opts.downtime.as_secs_f64() {
            extra += 1;
        }
        // Auto-converge: the guest dirties about as fast as the link carries; slow it.
        if round >= 4 && dirty.saturating_mul(10) >= prev_dirty.saturating_mul(9) {
            throttle.harder();
        }
        prev_dirty = dirty;
        let (sent0, t) = (link.sent, Instant::now());
        let n = send_pages(&mut link, &parts, &src, &set_, false)?;
        bw = (link.sent - sent0) as f64 / t.elapsed().as_secs_f64().max(1e-6);
        round += 1;
        set(progress, |p| {
            p.round = round;
            p.pages_sent += n;
            p.bytes_sent = link.sent;
            p.bandwidth = bw;
        });
    };
    drop(throttle);
    // Stop and copy.
    set(progress, |p| p.state = "stop-and-copy".into());
    let paused_at = Instant::now();
    handle
        .pause(Duration::from_secs(10))
        .map_err(|e| MigrateError::Vm(e.to_string()))?;
    // Nobody resumes the VM while its last pages and state go out.
    handle.hold_paused(true);
    let resume_here = |e: MigrateError| {
        handle.release_and_resume();
        e
    };
    let mut last_set = leftover;
    last_set.union(
        &handle
            .dirty_round()
            .map_err(|e| resume_here(MigrateError::Vm(format!("dirty log: {e}"))))?,
    );
    let n = send_pages(&mut link, &parts, &src, &last_set, false).map_err(resume_here)?;
    let meta = crate::snapshot::meta_of(handle, &parts).map_err(|e| {
        resume_here(MigrateError::Vm(format!(
            "cannot collect the VM's state: {e}"
        )))
    })?;
    link.frame(Kind::State, &meta.encode())
        .map_err(resume_here)?;
    link.frame(Kind::Done, b"").map_err(resume_here)?;
    set(progress, |p| {
        p.pages_sent += n;
        p.bytes_sent = link.sent;
    });
    // The destination restores and resumes: only then does the VM end here.
    match wire::read_frame(&mut reader) {
        Ok(f) if f.kind == Kind::Resumed => {
            let down = paused_at.elapsed();
            set(progress, |p| p.downtime_ms = Some(down.as_secs_f64() * 1e3));
            tracing::info!(
                "migrated to {dest} in {:.0} ms ({round} rounds), downtime {:.1} ms",
                t0.elapsed().as_secs_f64() * 1e3,
                down.as_secs_f64() * 1e3
            );
            handle.stop(Outcome::Migrated(dest.into()));
            Ok(())
        }
        Ok(f) if f.kind == Kind::Refuse => {
            handle.release_and_resume();
            Err(MigrateError::Refused(wire::refusal(&f.payload)))
        }
        Ok(f) => {
            handle.release_and_resume();
            Err(MigrateError::Vm(format!(
                "the destination answered {:?} instead of Resumed",
                f.kind
            )))
        }
        // After Done the destination may be running the VM already: running it here too would
        // make two. The source stays paused for the operator to decide.
        Err(e) => Err(MigrateError::Vm(format!(
            "no answer from the destination after the last copy ({e}): it may or may not be \
             running the VM, so this one stays paused; check the destination, then `v3 continue` \
             or `v3 stop` this VM"
        ))),
    }
}

/// The destination's side after the [`Hello`] was read and `vm` built from its config:
/// check compatibility, answer, receive memory and state, restore. On success the VM is
/// ready to run and the source has been told; on failure the source is told why.
pub fn receive(
    conn: &mut TcpStream,
    hello: &Hello,
    vm: &mut Vm,
    progress: &mut dyn FnMut(u64),
) -> Result<(), MigrateError> {
    let r = receive_inner(conn, hello, vm, progress);
    if let Err(e) = &r
        && !matches!(e, MigrateError::SourceAborted(_))
    {
        let _ = wire::write_frame(conn, Kind::Refuse, &wire::refuse_payload(&e.to_string()));
    }
    r
}

/// Check a [`Hello`] against a VM built for it (without talking to the source).
pub fn check_hello(hello: &Hello, vm: &Vm) -> Result<(), MigrateError> {
    let major = |v: &str| v.split('.').next().unwrap_or("").to_string();
    if major(&hello.version) != major(wire::VERSION) {
        return Err(MigrateError::Incompatible(format!(
            "migration stream {} is not supported here (this build speaks {})",
            hello.version,
            wire::VERSION
        )));
    }
    let parts = vm
        .handle()
        .parts()
        .cloned()
        .ok_or_else(|| MigrateError::Vm("the VM is not built".into()))?;
    let here: Vec<(u64, u64)> = parts.dirty.regions().iter().map(|r| (r.0, r.1)).collect();
    if here != hello.regions {
        return Err(MigrateError::Incompatible(format!(
            "guest RAM differs: the source has {:x?}, this VM {:x?}",
            hello.regions, here
        )));
    }
    let missing = missing_features(&hello.cpuid, &parts.cpuid);
    if !missing.is_empty() {
        return Err(MigrateError::Incompatible(format!(
            "the source's CPU model (backend {}) has features backend '{}' cannot present: {} \
             (run the VM with --cpu portable)",
            hello.backend,
            parts.backend,
            missing.join(", ")
        )));
    }
    Ok(())
}

fn receive_inner(
    conn: &mut TcpStream,
    hello: &Hello,
    vm: &mut Vm,
    progress: &mut dyn FnMut(u64),
) -> Result<(), MigrateError> {
    check_hello(hello, vm)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(WireError::Io)?;
    wire::write_frame(conn, Kind::Ready, b"{}")?;
    let mem = vm.memory().clone();
    let map = vm.memory_map().clone();
    let zero = vec![0u8; wire::PAGE];
    let mut pages = 0u64;
    let mut meta = None;
    loop {
        let f = wire::read_frame(conn)?;
        match f.kind {
            Kind::Pages => {
                pages += wire::decode_pages(&f.payload, |gpa, data| {
                    if !map.is_backed(gpa, wire::PAGE as u64) {
                        return Err(WireError::Malformed {
                            what: "pages",
                            msg: format!("page {gpa:#x} is outside guest RAM"),
                        });
                    }
                    mem.write_slice(data.unwrap_or(&zero), GuestAddress(gpa))
                        .map_err(|e| WireError::Malformed {
                            what: "pages",
                            msg: e.to_string(),
                        })
                })? as u64;
                progress(pages);
            }
            Kind::State => {
                meta = Some(palacios_checkpoint::Meta::decode(&f.payload).map_err(|e| {
                    MigrateError::Vm(format!("the VM's state does not decode: {e}"))
                })?);
            }
            Kind::Done => {
                let meta = meta.ok_or_else(|| {
                    MigrateError::Vm("the source finished without sending the VM's state".into())
                })?;
                crate::snapshot::restore_meta(vm, &meta)
                    .map_err(|e| MigrateError::Vm(format!("cannot restore the VM: {e}")))?;
                wire::write_frame(conn, Kind::Resumed, b"{}")?;
                return Ok(());
            }
            Kind::Refuse => return Err(MigrateError::SourceAborted(wire::refusal(&f.payload))),
            k => {
                return Err(MigrateError::Vm(format!(
                    "unexpected {k:?} frame in the middle of a migration"
                )));
            }
        }
    }
}
