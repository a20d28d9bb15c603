//! Control-API routes of the GEARS services and guarded modules (docs/gears.md):
//! `GET /vm/gears`, `GET /vm/gears/processes`, and per service (`syscall_intercept`,
//! `env_inject`, `code_inject`, `guard_mods`): `GET` (list and results), `POST` (start),
//! `PUT` (settings), `DELETE /vm/gears/<service>/<id>` (stop).

use palacios_api::{Request, Response};
use palacios_gears::{Gears, ServiceHandle};
use palacios_vmm::VmHandle;
use serde_json::{Value, json};

/// The routes of this module, or `None` for a path it does not serve.
pub fn route(h: &VmHandle, req: &Request) -> Option<Response> {
    let segs = req.segments();
    if segs.len() < 2 || segs[0] != "vm" || segs[1] != "gears" {
        return None;
    }
    let services = h.controls::<ServiceHandle>();
    let hub = h.controls::<Gears>().into_iter().next();
    Some(match (req.method.as_str(), &segs[2..]) {
        ("GET", []) => Response::ok(json!({
            "linux": hub.as_ref().and_then(|g| g.linux()),
            // "ok", or why the backend cannot do all of GEARS ("syscalls": the part it can).
            "backend": hub.as_ref().map(|g| status(g.check_user())),
            "syscalls": hub.as_ref().map(|g| status(g.check_backend())),
            "services": services.iter().map(|s| s.0.name()).collect::<Vec<_>>(),
        })),
        ("GET", ["processes"]) => match &hub {
            None => Response::error(404, "no GEARS extension is configured"),
            Some(g) => match g.kernel(|k| k.processes()) {
                Err(e) => Response::error(409, e),
                Ok(Err(e)) => Response::error(500, format!("reading the process list: {e}")),
                Ok(Ok(ps)) => Response::ok(json!({ "processes": ps })),
            },
        },
        (m, [name, rest @ ..]) => {
            let Some(svc) = services.iter().find(|s| s.0.name() == *name) else {
                return Some(Response::error(
                    404,
                    format!(
                        "no GEARS service '{name}' in this VM (configured: {})",
                        services
                            .iter()
                            .map(|s| s.0.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            };
            let s = &svc.0;
            let parse = || -> Result<Value, Response> {
                serde_json::from_slice(&req.body)
                    .map_err(|e| Response::error(400, format!("the body is not JSON: {e}")))
            };
            let result = match (m, rest) {
                ("GET", []) => Ok(s.list()),
                ("POST", []) => match parse() {
                    Ok(b) => s.start(&b),
                    Err(r) => return Some(r),
                },
                ("PUT", []) => match parse() {
                    Ok(b) => s.set(&b),
                    Err(r) => return Some(r),
                },
                ("DELETE", [id]) => match id.parse::<u64>() {
                    Ok(id) => s.stop(id).map(|()| json!({ "stopped": id })),
                    Err(_) => return Some(Response::error(400, format!("'{id}' is not an id"))),
                },
                _ => {
                    return Some(Response::error(
                        405,
                        format!("{} is not allowed on {}", req.method, req.path),
                    ));
                }
            };
            match result {
                Ok(v) => Response::ok(v),
                Err(e) => Response::error(e.status, e.msg),
            }
        }
        _ => Response::error(
            405,
            format!("{} is not allowed on {}", req.method, req.path),
        ),
    })
}

fn status(r: Result<(), String>) -> Value {
    match r {
        Ok(()) => Value::from("ok"),
        Err(e) => Value::from(e),
    }
}
