//! The per-VM control API of `v3 run` / `v3 load`: routes of the HTTP/JSON API (docs/api.md,
//! docs/openapi.json) onto the VM's control handle.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use palacios_api::{Request, Response};
use palacios_vmm::{Outcome, VmHandle};
use serde_json::json;

/// Largest guest-memory read one request may ask for.
pub const MAX_MEMORY_READ: u64 = 64 * 1024;
/// How long a pause or a core command may take before the API gives up.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the API serves: the VM of the moment (it changes when the guest reboots).
pub struct ApiState {
    pub name: String,
    pub backend: String,
    pub started: Instant,
    handle: Mutex<Option<VmHandle>>,
    /// The last (or current) outgoing migration.
    migration: Arc<Mutex<palacios_vmm::migrate::Progress>>,
    /// Set once the VM process is ending: the outcome.
    ended: Mutex<Option<Outcome>>,
}

impl ApiState {
    pub fn new(name: &str, backend: &str) -> Arc<Self> {
        Arc::new(ApiState {
            name: name.to_string(),
            backend: backend.to_string(),
            started: Instant::now(),
            handle: Mutex::new(None),
            migration: Arc::new(Mutex::new(palacios_vmm::migrate::Progress {
                state: "idle".into(),
                ..Default::default()
            })),
            ended: Mutex::new(None),
        })
    }

    pub fn set_handle(&self, h: VmHandle) {
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    pub fn set_ended(&self, o: Outcome) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(o);
    }

    fn handle(&self) -> Option<VmHandle> {
        self.handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The handler to give [`palacios_api::Server::start`].
pub fn handler(state: Arc<ApiState>) -> palacios_api::server::Handler {
    Arc::new(move |req: &Request| route(&state, req))
}

fn vm_state(h: &VmHandle) -> &'static str {
    if h.outcome().is_some() {
        "stopped"
    } else if h.is_paused() {
        "paused"
    } else {
        "running"
    }
}

fn route(st: &ApiState, req: &Request) -> Response {
    let segs = req.segments();
    let m = req.method.as_str();
    let Some(h) = st.handle() else {
        return Response::error(503, "the VM is not built yet");
    };
    if let Some(r) = crate::sched_api::route(&h, req) {
        return r;
    }
    if let Some(r) = crate::gears_api::route(&h, req) {
        return r;
    }
    if let Some(r) = crate::concord_api::route(&h, req) {
        return r;
    }
    if let Some(r) = crate::sym_api::route(&h, req) {
        return r;
    }
    match (m, segs.as_slice()) {
        ("GET", ["vm"]) => info(st, &h),
        ("PUT", ["vm", "pause"]) => match h.pause(TIMEOUT) {
            Ok(took) => Response::ok(json!({
                "state": vm_state(&h),
                "pause_latency_us": took.as_micros() as u64,
            })),
            Err(e) => Response::error(409, e),
        },
        ("PUT", ["vm", "resume"]) => {
            if h.outcome().is_some() {
                return Response::error(409, "the VM has ended");
            }
            match h.try_resume() {
                Ok(()) => Response::ok(json!({ "state": vm_state(&h) })),
                Err(e) => Response::error(409, e),
            }
        }
        ("PUT", ["vm", "stop"]) => {
            h.stop(Outcome::Stopped);
            Response::ok(json!({ "state": "stopped" }))
        }
        ("GET", ["vm", "cores", n]) => {
            let Ok(cpu) = n.parse::<u32>() else {
                return Response::error(400, format!("core '{n}' is not a number"));
            };
            if cpu >= h.cores() {
                return Response::error(404, format!("no core {cpu} (the VM has {})", h.cores()));
            }
            match h.save_core(cpu, TIMEOUT) {
                Ok(s) => Response::ok(json!({
                    "core": cpu,
                    "mode": s.mode,
                    "regs": s.regs,
                    "sregs": s.sregs,
                    "debug": s.debug,
                    "events": s.events,
                })),
                Err(e) => Response::error(409, e),
            }
        }
        ("GET", ["vm", "memory"]) => memory(&h, req),
        ("GET" | "PUT", ["vm", "balloon"]) => balloon(&h, req),
        ("PUT", ["snapshot", "create"]) => snapshot(&h, req),
        ("PUT", ["migrate"]) => migrate(st, &h, req),
        ("PUT" | "GET", ["vm", "dirty"]) if migrating(st) => Response::error(
            409,
            "a migration uses the dirty log: try again when it is done",
        ),
        ("PUT", ["vm", "dirty"]) => dirty_switch(&h, req),
        ("GET", ["vm", "dirty"]) => match h.dirty_round() {
            Ok(set) => Response::ok(json!({
                "on": h.parts().is_some_and(|p| p.dirty.is_enabled()),
                "pages": set.count(),
            })),
            Err(e) => Response::error(409, e),
        },
        ("GET", ["migrate"]) => Response::ok(
            serde_json::to_value(&*st.migration.lock().unwrap_or_else(|p| p.into_inner()))
                .unwrap_or_default(),
        ),
        (
            _,
            ["vm"] | ["vm", "pause" | "resume" | "stop" | "memory" | "dirty"] | ["vm", "cores", _],
        )
        | (_, ["snapshot", "create"] | ["migrate"]) => {
            Response::error(405, format!("{m} is not allowed on {}", req.path))
        }
        _ => Response::error(404, format!("no such endpoint: {m} {}", req.path)),
    }
}

fn info(st: &ApiState, h: &VmHandle) -> Response {
    let parts = h.parts();
    let outcome = h
        .outcome()
        .or_else(|| st.ended.lock().unwrap_or_else(|p| p.into_inner()).clone());
    Response::ok(json!({
        "name": st.name,
        "state": vm_state(h),
        "backend": parts.map(|p| p.backend).unwrap_or(st.backend.as_str()),
        "cores": h.cores(),
        "mem_mib": parts.map(|p| p.config.mem_mib),
        "uptime_ms": st.started.elapsed().as_millis() as u64,
        "guest_ns": parts.map(|p| p.clock.now()),
        "outcome": outcome.map(|o| o.to_string()),
        "pid": std::process::id(),
    }))
}

fn parse_num(s: &str) -> Option<u64> {
    palacios_vmm::config::parse_number(s)
}

fn memory(h: &VmHandle, req: &Request) -> Response {
    let (Some(addr), Some(len)) = (
        req.query("addr").and_then(parse_num),
        req.query("len").and_then(parse_num),
    ) else {
        return Response::error(400, "give addr and len (decimal or 0x hex) in the query");
    };
    if len == 0 || len > MAX_MEMORY_READ {
        return Response::error(400, format!("len must be 1 to {MAX_MEMORY_READ}"));
    }
    let Some(parts) = h.parts() else {
        return Response::error(503, "the VM is not built yet");
    };
    let mut buf = vec![0u8; len as usize];
    use vm_memory::Bytes;
    match parts
        .mem
        .read_slice(&mut buf, vm_memory::GuestAddress(addr))
    {
        Ok(()) => Response::ok(json!({
            "addr": format!("{addr:#x}"),
            "len": len,
            "hex": buf.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        })),
        Err(_) => Response::error(
            400,
            format!("{addr:#x}+{len:#x} is not entirely in guest RAM"),
        ),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotReq {
    path: String,
    #[serde(default = "default_store")]
    store: String,
    /// Stop the VM after the save (a migration or a `v3 save --stop`).
    #[serde(default)]
    stop: bool,
}

fn default_store() -> String {
    "file".into()
}

fn snapshot(h: &VmHandle, req: &Request) -> Response {
    let r: SnapshotReq = match serde_json::from_slice(&req.body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, format!("bad snapshot request: {e}")),
    };
    let store = match palacios_checkpoint::store(&r.store) {
        Ok(s) => s,
        Err(e) => return Response::error(400, e),
    };
    let path = std::path::PathBuf::from(&r.path);
    if !path.is_absolute() {
        return Response::error(
            400,
            "the snapshot path must be absolute (the VM's working directory is not the client's)",
        );
    }
    match palacios_vmm::snapshot::save(h, store.as_ref(), &path, r.stop, &mut |_, _| {}) {
        Ok(rep) => {
            if r.stop {
                h.stop(Outcome::Stopped);
            }
            Response::ok(json!({
                "path": r.path,
                "store": r.store,
                "ram_bytes": rep.ram,
                "stored_bytes": rep.stored,
                "pause_latency_us": rep.pause.as_micros() as u64,
                "total_ms": rep.total.as_millis() as u64,
            }))
        }
        Err(e) => {
            use palacios_checkpoint::CheckpointError as C;
            use palacios_vmm::snapshot::SnapshotError as S;
            let status = match &e {
                S::Checkpoint(C::Usage(_)) => 400,
                S::Checkpoint(C::Io { .. }) | S::Backend(_) | S::Core(_) => 500,
                _ => 409,
            };
            Response::error(status, e)
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateReq {
    /// HOST:PORT of a `v3 receive`.
    dest: String,
    #[serde(default)]
    downtime_ms: Option<u64>,
    #[serde(default)]
    bandwidth_mbps: Option<u64>,
}

fn migrating(st: &ApiState) -> bool {
    let p = st.migration.lock().unwrap_or_else(|p| p.into_inner());
    matches!(p.state.as_str(), "connecting" | "copying" | "stop-and-copy")
}

/// Start a migration in the background; `GET /migrate` follows it.
fn migrate(st: &ApiState, h: &VmHandle, req: &Request) -> Response {
    let r: MigrateReq = match serde_json::from_slice(&req.body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, format!("bad migrate request: {e}")),
    };
    if r.downtime_ms == Some(0) || r.bandwidth_mbps == Some(0) {
        return Response::error(400, "downtime_ms and bandwidth_mbps must be positive");
    }
    {
        let mut p = st.migration.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(p.state.as_str(), "connecting" | "copying" | "stop-and-copy") {
            return Response::error(409, format!("a migration to {} is under way", p.dest));
        }
        p.state = "connecting".into();
        p.dest = r.dest.clone();
        p.error = None;
    }
    let opts = palacios_vmm::migrate::SendOpts {
        downtime: Duration::from_millis(r.downtime_ms.unwrap_or(50)),
        bandwidth: r.bandwidth_mbps.map(|m| m * 1_000_000 / 8),
        ..Default::default()
    };
    let (h, p, dest) = (h.clone(), st.migration.clone(), r.dest.clone());
    let spawned = std::thread::Builder::new()
        .name("migrate".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                palacios_vmm::migrate::send(&h, &dest, &opts, &p)
            }));
            if r.is_err() {
                // A bug, not the guest's doing: report it and keep the VM running here.
                h.stop_dirty_tracking();
                h.resume();
                let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
                g.state = "failed".into();
                g.error = Some("internal error in the migration (the VM runs on here)".into());
            }
        });
    match spawned {
        Ok(_) => Response {
            status: 202,
            body: json!({ "state": "connecting", "dest": r.dest }),
        },
        Err(e) => Response::error(500, format!("cannot start the migration: {e}")),
    }
}

/// Dirty-page tracking on or off (`{"on": true}`); `GET /vm/dirty` then reports the pages
/// written since the previous GET (a working-set measurement; migration uses the same log).
fn dirty_switch(h: &VmHandle, req: &Request) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Switch {
        on: bool,
    }
    let r: Switch = match serde_json::from_slice(&req.body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, format!("bad request: {e}")),
    };
    if r.on {
        if let Err(e) = h.start_dirty_tracking() {
            return Response::error(409, e);
        }
    } else {
        h.stop_dirty_tracking();
    }
    Response::ok(json!({ "on": r.on }))
}

/// `GET /vm/balloon`: target, actual and the guest's statistics; `PUT` with
/// `{"target_mib": N}` asks the guest to give N MiB back.
fn balloon(h: &VmHandle, req: &Request) -> Response {
    let Some(b) = h
        .controls::<palacios_virtio::balloon::BalloonControl>()
        .into_iter()
        .next()
    else {
        return Response::error(404, "this VM has no balloon (LNX_VIRTIO_BALLOON)");
    };
    if req.method == "PUT" {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Target {
            target_mib: u64,
        }
        let t: Target = match serde_json::from_slice(&req.body) {
            Ok(t) => t,
            Err(e) => return Response::error(400, format!("bad balloon request: {e}")),
        };
        let mem_mib = h.parts().map(|p| p.config.mem_mib).unwrap_or(u64::MAX);
        if t.target_mib >= mem_mib {
            return Response::error(
                400,
                format!(
                    "target {} MiB is not below the guest's {mem_mib} MiB",
                    t.target_mib
                ),
            );
        }
        b.set_target_mib(t.target_mib);
    }
    Response::ok(b.report())
}
