//! Control-API routes of ConCORD (docs/concord.md, docs/api.md), for a VM with the `concord`
//! extension:
//! - `GET /vm/concord`: the update monitor's status;
//! - `PUT /vm/concord/sync`: finish a tracking round that starts now (and publish it);
//! - `GET /vm/concord/page?gpa=A`: the content hash of a guest page;
//! - `GET /vm/concord/copies?hash=H` and `GET /vm/concord/sharing?entities=a,b&k=K&list=N`:
//!   the queries, answered through the VM's directory;
//! - `PUT /vm/concord/collect` (`{"store": DIR, "list": FILE}`): the collective phase of a
//!   collective checkpoint (FILE: little-endian u64 content hashes).

use std::sync::Arc;
use std::time::Duration;

use palacios_api::{Request, Response};
use palacios_concord::monitor::Monitor;
use palacios_vmm::VmHandle;
use serde_json::json;

/// The routes of this module, or `None` for a path it does not serve.
pub fn route(h: &VmHandle, req: &Request) -> Option<Response> {
    let segs = req.segments();
    if segs.first() != Some(&"vm") || segs.get(1) != Some(&"concord") {
        return None;
    }
    let Some(m) = h.controls::<Monitor>().into_iter().next() else {
        return Some(Response::error(
            404,
            "this VM has no ConCORD tracking (add <extension name=\"concord\"/> to its config)",
        ));
    };
    Some(match (req.method.as_str(), &segs[2..]) {
        ("GET", []) => Response::ok(m.status()),
        ("PUT", ["sync"]) => match m.sync(Duration::from_secs(30)) {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(409, e),
        },
        ("GET", ["page"]) => page(h, &m, req),
        ("GET", ["copies"]) => copies(&m, req),
        ("GET", ["sharing"]) => sharing(&m, req),
        ("PUT", ["collect"]) => collect(h, &m, req),
        _ => Response::error(404, format!("no route {} {}", req.method, req.path)),
    })
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn page(h: &VmHandle, m: &Arc<Monitor>, req: &Request) -> Response {
    let Some(gpa) = req.query("gpa").and_then(parse_num) else {
        return Response::error(400, "give gpa (decimal or 0x hex) in the query");
    };
    match m.hash_at(h, gpa) {
        Some(x) => Response::ok(json!({ "gpa": gpa, "hash": palacios_concord::hex(x) })),
        None => Response::error(404, format!("no tracked page at {gpa:#x}")),
    }
}

/// A directory error: 503 with what the VM's own tracking says (the answer is stale, not lost).
fn dir_error(m: &Monitor, e: palacios_concord::DirError) -> Response {
    let s = m.status();
    Response {
        status: 503,
        body: json!({
            "error": e.to_string(),
            "tracking": {
                "rounds": s["rounds"],
                "unpublished_rounds": s["unpublished_rounds"],
                "pending_updates": s["pending_updates"],
            },
        }),
    }
}

fn copies(m: &Arc<Monitor>, req: &Request) -> Response {
    let Some(hash) = req.query("hash").and_then(palacios_concord::parse_hash) else {
        return Response::error(400, "give hash (16 hex digits) in the query");
    };
    let mut d = m.cfg.directory.open(false);
    match palacios_concord::query::copies(d.as_mut(), hash) {
        Ok(v) => Response::ok(v),
        Err(e) => dir_error(m, e),
    }
}

fn sharing(m: &Arc<Monitor>, req: &Request) -> Response {
    let names: Vec<String> = req
        .query("entities")
        .map(|s| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let k = req.query("k").and_then(parse_num).unwrap_or(2) as u32;
    let list = req.query("list").and_then(parse_num).unwrap_or(10) as usize;
    let mut d = m.cfg.directory.open(false);
    match palacios_concord::query::sharing(d.as_mut(), &names, k, list.min(10_000)) {
        Ok(s) => Response::ok(serde_json::to_value(s).unwrap_or_default()),
        Err(e) => dir_error(m, e),
    }
}

fn collect(h: &VmHandle, m: &Arc<Monitor>, req: &Request) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        store: std::path::PathBuf,
        list: std::path::PathBuf,
    }
    let b: Body = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return Response::error(400, format!("bad collect request: {e}")),
    };
    if !b.store.is_absolute() || !b.list.is_absolute() {
        return Response::error(400, "store and list must be absolute paths");
    }
    let max = h.parts().map_or(0, |p| p.dirty.pages() as u64) * 8;
    let raw = match std::fs::metadata(&b.list) {
        Ok(md) if md.len() > max || md.len() % 8 != 0 => {
            return Response::error(
                400,
                format!(
                    "{}: {} bytes is not a list of at most {} hashes",
                    b.list.display(),
                    md.len(),
                    max / 8
                ),
            );
        }
        Ok(_) => match std::fs::read(&b.list) {
            Ok(r) => r,
            Err(e) => return Response::error(400, format!("{}: {e}", b.list.display())),
        },
        Err(e) => return Response::error(400, format!("{}: {e}", b.list.display())),
    };
    let hashes: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    match m.collect(h, &b.store, &hashes) {
        Ok(r) => Response::ok(serde_json::to_value(r).unwrap_or_default()),
        Err(e) => Response::error(409, e),
    }
}
