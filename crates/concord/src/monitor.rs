//! The memory update monitor of one VM: a thread that hashes the VM's 4 KiB pages with xxh3
//! and publishes, per content, how many of its pages hold it. After one full pass at start it
//! rehashes only the pages the dirty-page log reports written since its previous round (its
//! own consumer of the log, beside migration's), every `interval`. Updates are absolute counts,
//! batched per round; a directory that is down costs nothing but staleness: tracking goes on,
//! the status says what failed, and the whole content is sent again once the directory answers
//! (with a growing back-off between attempts).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use palacios_vmm::VmHandle;
use palacios_vmm::dirty::DirtySet;
use vm_memory::{Bytes, GuestAddress};

use crate::lock;
use crate::spec::DirSpec;

/// What the monitor is told by the config.
#[derive(Clone, Debug)]
pub struct MonitorConfig {
    pub directory: DirSpec,
    pub entity: String,
    pub host: String,
    /// The VM's control-API socket, if it has one.
    pub api: String,
    pub interval: Duration,
}

#[derive(Default)]
struct State {
    /// Per page (dirty-log order): its content hash.
    hashes: Vec<u64>,
    counts: HashMap<u64, u32>,
    /// Contents whose count changed since the last publish that reached the directory.
    pending: HashSet<u64>,
    need_full: bool,
    rounds: u64,
    connected: bool,
    hosting: bool,
    last_error: Option<String>,
    /// Rounds done since the directory last took an update.
    unpublished_rounds: u64,
    last_publish: Option<Instant>,
    started: bool,
}

/// A VM's update monitor (its control is offered to the control API).
pub struct Monitor {
    pub cfg: MonitorConfig,
    state: Mutex<State>,
    cv: Condvar,
    wake: AtomicBool,
    /// A sync asked for a publish now, back-off or not.
    force: AtomicBool,
    pub pages_hashed: AtomicU64,
    pub hash_ns: AtomicU64,
    pub updates_published: AtomicU64,
    pub publish_ns: AtomicU64,
    pub publish_errors: AtomicU64,
}

/// What the collective phase did in this VM.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CollectReport {
    pub asked: u64,
    pub written: u64,
    /// No page holds this content any more (the directory was stale).
    pub missing: u64,
    /// The page changed since it was hashed (left to the local phase).
    pub changed: u64,
}

impl Monitor {
    pub fn new(cfg: MonitorConfig) -> Arc<Monitor> {
        Arc::new(Monitor {
            cfg,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            wake: AtomicBool::new(false),
            force: AtomicBool::new(false),
            pages_hashed: AtomicU64::new(0),
            hash_ns: AtomicU64::new(0),
            updates_published: AtomicU64::new(0),
            publish_ns: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
        })
    }

    /// The monitor's state for the control API and the inspector.
    pub fn status(&self) -> serde_json::Value {
        let s = lock(&self.state);
        let hashed = self.pages_hashed.load(Ordering::Relaxed);
        let ns = self.hash_ns.load(Ordering::Relaxed);
        serde_json::json!({
            "entity": self.cfg.entity,
            "host": self.cfg.host,
            "directory": self.cfg.directory.to_string(),
            "interval_ms": self.cfg.interval.as_millis() as u64,
            "started": s.started,
            "rounds": s.rounds,
            "pages": s.hashes.len(),
            "distinct": s.counts.len(),
            "connected": s.connected,
            "hosting_directory": s.hosting,
            "unpublished_rounds": s.unpublished_rounds,
            "pending_updates": if s.need_full { s.counts.len() } else { s.pending.len() },
            "last_error": s.last_error,
            "pages_hashed": hashed,
            "hash_ns_per_page": if hashed == 0 { 0 } else { ns / hashed },
            "hash_ns": ns,
            "publish_ns": self.publish_ns.load(Ordering::Relaxed),
            "updates_published": self.updates_published.load(Ordering::Relaxed),
            "publish_ms": self.publish_ns.load(Ordering::Relaxed) / 1_000_000,
            "publish_errors": self.publish_errors.load(Ordering::Relaxed),
        })
    }

    /// Rounds completed.
    pub fn rounds(&self) -> u64 {
        lock(&self.state).rounds
    }

    /// Run rounds now until one that started after this call has been hashed and offered to
    /// the directory; the status afterwards.
    pub fn sync(&self, timeout: Duration) -> Result<serde_json::Value, String> {
        let t = Instant::now();
        let target = {
            let s = lock(&self.state);
            if !s.started {
                return Err("tracking has not started yet (the VM is not running)".into());
            }
            s.rounds + 2
        };
        loop {
            self.force.store(true, Ordering::Release);
            self.wake.store(true, Ordering::Release);
            self.cv.notify_all();
            let s = lock(&self.state);
            if s.rounds >= target {
                if !s.connected || s.need_full || !s.pending.is_empty() {
                    return Err(format!(
                        "tracking finished the round, but the directory did not take it: {}",
                        s.last_error.as_deref().unwrap_or("not connected")
                    ));
                }
                break;
            }
            let left = timeout.saturating_sub(t.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "tracking did not complete a round within {} ms",
                    timeout.as_millis()
                ));
            }
            let _ = self
                .cv
                .wait_timeout(s, left.min(Duration::from_millis(20)))
                .map_err(|e| e.to_string())?;
        }
        Ok(self.status())
    }

    /// The content hash of the page at `gpa`, as last hashed.
    pub fn hash_at(&self, handle: &VmHandle, gpa: u64) -> Option<u64> {
        let parts = handle.parts()?;
        let i = parts
            .dirty
            .regions()
            .iter()
            .find(|r| gpa >= r.0 && gpa < r.0 + r.1)
            .map(|r| r.2 + ((gpa - r.0) / 4096) as usize)?;
        lock(&self.state).hashes.get(i).copied()
    }

    /// The collective phase's share of this VM: write each content in `hashes` that one of
    /// its pages still holds into its segment of the shared store at `store`.
    pub fn collect(
        &self,
        handle: &VmHandle,
        store: &std::path::Path,
        hashes: &[u64],
    ) -> Result<CollectReport, String> {
        let parts = handle.parts().ok_or("the VM is not built yet")?;
        let where_: HashMap<u64, usize> = {
            let s = lock(&self.state);
            let want: HashSet<u64> = hashes.iter().copied().collect();
            let mut m = HashMap::new();
            for (i, h) in s.hashes.iter().enumerate() {
                if want.contains(h) {
                    m.entry(*h).or_insert(i);
                }
            }
            m
        };
        let mut w = palacios_checkpoint::shared::SegmentWriter::open(store, &self.cfg.entity)
            .map_err(|e| e.to_string())?;
        let mut rep = CollectReport {
            asked: hashes.len() as u64,
            ..Default::default()
        };
        let mut buf = vec![0u8; 4096];
        for h in hashes {
            let Some(gpa) = where_.get(h).and_then(|&i| parts.dirty.page_gpa(i)) else {
                rep.missing += 1;
                continue;
            };
            if parts.mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
                rep.missing += 1;
                continue;
            }
            if crate::page_hash(&buf) != *h {
                rep.changed += 1;
                continue;
            }
            w.append(*h, &buf)
                .map_err(|e| format!("write the shared store: {e}"))?;
            rep.written += 1;
        }
        w.sync()
            .map_err(|e| format!("fsync the shared store: {e}"))?;
        Ok(rep)
    }

    /// The monitor thread: runs until `stop` or the VM ends.
    pub fn run(self: &Arc<Self>, handle: VmHandle, stop: &AtomicBool) {
        // Wait for the VM to be built and started.
        let parts = loop {
            if stop.load(Ordering::Acquire) || handle.outcome().is_some() {
                return;
            }
            if let Some(p) = handle.parts()
                && handle.has_started()
            {
                break p.clone();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let tap = match handle.dirty_tap() {
            Ok(t) => t,
            Err(e) => {
                lock(&self.state).last_error = Some(format!("no dirty-page log: {e}"));
                return;
            }
        };
        let npages = parts.dirty.pages();
        {
            let mut s = lock(&self.state);
            s.hashes = vec![0; npages];
            s.need_full = true;
            s.started = true;
        }
        let mut dir = self.cfg.directory.open(true);
        let mut set = DirtySet::all(npages);
        let mut first = true;
        let mut retry_at = Instant::now();
        let mut backoff = Duration::from_millis(250);
        let mut buf = vec![0u8; 4096];
        loop {
            // Hash what changed.
            let t0 = Instant::now();
            let mut changed: Vec<(usize, u64)> = Vec::new();
            for (n, i) in set.iter().enumerate() {
                if n % 4096 == 4095 && (stop.load(Ordering::Acquire) || handle.outcome().is_some())
                {
                    return;
                }
                let Some(gpa) = parts.dirty.page_gpa(i) else {
                    continue;
                };
                if parts.mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
                    continue;
                }
                changed.push((i, crate::page_hash(&buf)));
            }
            self.pages_hashed
                .fetch_add(changed.len() as u64, Ordering::Relaxed);
            self.hash_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let publish = {
                let mut s = lock(&self.state);
                for (i, h) in changed {
                    let old = s.hashes[i];
                    if !first && old == h {
                        continue;
                    }
                    if !first {
                        dec(&mut s.counts, old);
                        s.pending.insert(old);
                    }
                    *s.counts.entry(h).or_insert(0) += 1;
                    s.pending.insert(h);
                    s.hashes[i] = h;
                }
                first = false;
                let heartbeat = s
                    .last_publish
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                let forced = self.force.swap(false, Ordering::AcqRel);
                if (Instant::now() < retry_at && !forced)
                    || (s.pending.is_empty() && !s.need_full && !heartbeat)
                {
                    None
                } else if s.need_full {
                    Some((
                        true,
                        s.counts.iter().map(|(h, c)| (*h, *c)).collect::<Vec<_>>(),
                    ))
                } else {
                    let c = &s.counts;
                    Some((
                        false,
                        s.pending
                            .iter()
                            .map(|h| (*h, c.get(h).copied().unwrap_or(0)))
                            .collect(),
                    ))
                }
            };
            let mut s_err = None;
            if let Some((full, updates)) = publish {
                let t1 = Instant::now();
                let r = dir.publish(
                    &self.cfg.entity,
                    &self.cfg.host,
                    &self.cfg.api,
                    full,
                    &updates,
                );
                self.publish_ns
                    .fetch_add(t1.elapsed().as_nanos() as u64, Ordering::Relaxed);
                let mut s = lock(&self.state);
                match r {
                    Ok(()) => {
                        self.updates_published
                            .fetch_add(updates.len() as u64, Ordering::Relaxed);
                        // Counts that changed again meanwhile cannot have: the state lock
                        // is only taken by this thread between hashing and here.
                        for (h, _) in &updates {
                            s.pending.remove(h);
                        }
                        if full {
                            s.pending.clear();
                        }
                        s.need_full = false;
                        s.connected = true;
                        s.last_error = None;
                        s.unpublished_rounds = 0;
                        s.last_publish = Some(Instant::now());
                        backoff = Duration::from_millis(250);
                    }
                    Err(e) => {
                        self.publish_errors.fetch_add(1, Ordering::Relaxed);
                        s.need_full = true;
                        s.connected = false;
                        s_err = Some(e.to_string());
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        // The client reconnects by itself at the next publish (and, for an
                        // embedded directory nobody serves any more, serves it from here);
                        // it is kept, so a directory this process serves is not dropped.
                    }
                }
            }
            {
                let mut s = lock(&self.state);
                if let Some(e) = s_err {
                    if s.last_error.as_deref() != Some(&e) {
                        tracing::warn!("ConCORD: {e} (tracking goes on)");
                    }
                    s.last_error = Some(e);
                }
                if !s.connected {
                    s.unpublished_rounds += 1;
                }
                s.hosting = dir.hosting();
                s.rounds += 1;
            }
            self.cv.notify_all();
            // Sleep until the next round (or a sync request).
            let until = Instant::now() + self.cfg.interval;
            while Instant::now() < until {
                if stop.load(Ordering::Acquire) || handle.outcome().is_some() {
                    return;
                }
                if self.wake.swap(false, Ordering::AcqRel) {
                    break;
                }
                let g = lock(&self.state);
                let left = until.saturating_duration_since(Instant::now());
                let _ = self.cv.wait_timeout(g, left.min(Duration::from_millis(20)));
            }
            set = match tap.round() {
                Ok(s) => s,
                Err(e) => {
                    if handle.outcome().is_some() {
                        return;
                    }
                    lock(&self.state).last_error = Some(format!("dirty-page log: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    DirtySet::all(0)
                }
            };
        }
    }
}

fn dec(counts: &mut HashMap<u64, u32>, h: u64) {
    if let Some(c) = counts.get_mut(&h) {
        *c -= 1;
        if *c == 0 {
            counts.remove(&h);
        }
    }
}
