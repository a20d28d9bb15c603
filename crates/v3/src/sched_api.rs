//! Control-API routes and the `v3 sched` verb of VSched (docs/api.md): `GET /vm/sched` (each
//! core's reservation, mechanism, achieved utilization and misses) and `PUT /vm/sched`
//! (`{"cpu": N, "period_us": P, "slice_us": S}`, `cpu` omitted for every core, or
//! `{"cpu": N, "clear": true}`), checked against the host's limit as a set.

use std::sync::Arc;
use std::time::Duration;

use palacios_api::{Request, Response};
use palacios_vmm::VmHandle;
use palacios_vmm::sched::{Reservation, VSched};
use serde_json::json;

use crate::status;

/// The routes of this module, or `None` for a path it does not serve.
pub fn route(h: &VmHandle, req: &Request) -> Option<Response> {
    if req.segments() != ["vm", "sched"] {
        return None;
    }
    let Some(vs) = h.controls::<VSched>().into_iter().next() else {
        return Some(Response::error(503, "the VM is not built yet"));
    };
    Some(match req.method.as_str() {
        "GET" => show(&vs),
        "PUT" => set(&vs, req),
        _ => Response::error(
            405,
            format!("{} is not allowed on {}", req.method, req.path),
        ),
    })
}

fn show(vs: &Arc<VSched>) -> Response {
    let (limit, how) = palacios_vmm::sched::host_limit();
    Response::ok(json!({
        "host_limit": limit,
        "host_limit_from": how,
        "cores": vs.reports().iter().enumerate().map(|(i, r)| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["cpu"] = json!(i);
            v
        }).collect::<Vec<_>>(),
    }))
}

fn set(vs: &Arc<VSched>, req: &Request) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        cpu: Option<u32>,
        period_us: Option<u64>,
        slice_us: Option<u64>,
        #[serde(default)]
        clear: bool,
    }
    let b: Body = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return Response::error(400, format!("bad sched request: {e}")),
    };
    let r = match (b.clear, b.period_us, b.slice_us) {
        (true, None, None) => None,
        (false, Some(period_us), Some(slice_us)) => Some(Reservation {
            period_us,
            slice_us,
        }),
        _ => {
            return Response::error(
                400,
                "give period_us and slice_us, or clear: true (not both)",
            );
        }
    };
    let cpus: Vec<u32> = match b.cpu {
        Some(c) => vec![c],
        None => (0..vs.cores() as u32).collect(),
    };
    let changes: Vec<(u32, Option<Reservation>)> = cpus.iter().map(|c| (*c, r)).collect();
    match vs.set(&changes) {
        Ok(()) => show(vs),
        Err(e) if e.contains("no vCPU") => Response::error(404, e),
        Err(e) => Response::error(409, e),
    }
}

/// `v3 sched VM [--cpu N] [--period P --slice S | --clear]`.
#[derive(clap::Args, Debug)]
pub struct SchedArgs {
    /// The VM: its --name, or its API socket path.
    pub vm: String,
    /// Only this vCPU (default: every vCPU).
    #[arg(long)]
    pub cpu: Option<u32>,
    /// Period in µs.
    #[arg(long)]
    pub period: Option<u64>,
    /// Slice (CPU time per period) in µs.
    #[arg(long)]
    pub slice: Option<u64>,
    /// Remove the reservation.
    #[arg(long)]
    pub clear: bool,
}

/// Run the verb: show the reservations, or change them.
pub fn run(a: &SchedArgs) -> u8 {
    let body = if a.period.is_none() && a.slice.is_none() && !a.clear {
        None
    } else {
        let mut b = json!({});
        if let Some(c) = a.cpu {
            b["cpu"] = json!(c);
        }
        if a.clear {
            b["clear"] = json!(true);
        }
        if let Some(p) = a.period {
            b["period_us"] = json!(p);
        }
        if let Some(s) = a.slice {
            b["slice_us"] = json!(s);
        }
        Some(b)
    };
    let method = if body.is_some() { "PUT" } else { "GET" };
    let sock = palacios_api::resolve(&a.vm);
    match palacios_api::request(
        &sock,
        method,
        "/vm/sched",
        body.as_ref(),
        Duration::from_secs(30),
    ) {
        Ok((200, v)) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            status::OK
        }
        Ok((code, v)) => {
            eprintln!(
                "v3 sched: {}: {} (HTTP {code})",
                a.vm,
                v.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("request refused")
            );
            status::CONFIG_ERROR
        }
        Err(e) => {
            eprintln!("v3 sched: {e}");
            status::CONFIG_ERROR
        }
    }
}
