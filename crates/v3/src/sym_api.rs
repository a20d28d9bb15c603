//! Control-API routes of the extension and symbiotic interfaces (docs/api.md): SymCall,
//! SymSpy, SymMod, the hypercall table, the extensions and the inspector tree.

use std::time::Duration;

use palacios_api::{Request, Response};
use palacios_vmm::VmHandle;
use palacios_vmm::extension::Extensions;
use palacios_vmm::hypercall::Hypercalls;
use palacios_vmm::symbiotic::{SymCallError, SymCallRequest, Symbiotic};
use serde_json::json;

/// Largest SymMod blob through the API (the request body carries it as hex).
pub const MAX_API_MODULE: usize = 32 * 1024 - 64;

/// The routes of this module, or `None` for a path it does not serve.
pub fn route(h: &VmHandle, req: &Request) -> Option<Response> {
    let segs = req.segments();
    Some(match (req.method.as_str(), segs.as_slice()) {
        ("PUT", ["vm", "symcall"]) => symcall(h, req),
        ("GET", ["vm", "symspy"]) => symspy(h),
        ("PUT", ["vm", "symmod"]) => symmod(h, req),
        ("GET", ["vm", "hypercalls"]) => match control::<Hypercalls>(h) {
            Some(t) => Response::ok(json!({
                "hypercalls": t.list().into_iter().map(|(id, owner)| json!({
                    "id": format!("{id:#x}"), "owner": owner
                })).collect::<Vec<_>>()
            })),
            None => Response::error(503, "the VM is not built yet"),
        },
        ("GET", ["vm", "extensions"]) => match control::<Extensions>(h) {
            Some(e) => Response::ok(json!({ "extensions": e.inspect() })),
            None => Response::error(503, "the VM is not built yet"),
        },
        ("GET", ["vm", "inspect"]) => inspect(h),
        (
            _,
            [
                "vm",
                "symcall" | "symspy" | "symmod" | "hypercalls" | "extensions" | "inspect",
            ],
        ) => Response::error(
            405,
            format!("{} is not allowed on {}", req.method, req.path),
        ),
        _ => return None,
    })
}

fn control<T: std::any::Any + Send + Sync>(h: &VmHandle) -> Option<std::sync::Arc<T>> {
    h.controls::<T>().into_iter().next()
}

fn sym(h: &VmHandle) -> Result<std::sync::Arc<Symbiotic>, Response> {
    control::<Symbiotic>(h).ok_or_else(|| Response::error(503, "the VM is not built yet"))
}

/// `PUT /vm/symcall` `{"cpu": 0, "call": N, "args": [..], "timeout_ms": 2000, "repeat": 1}`.
fn symcall(h: &VmHandle, req: &Request) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        cpu: u32,
        #[serde(flatten)]
        call: SymCallRequest,
    }
    let b: Body = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return Response::error(400, format!("bad symcall request: {e}")),
    };
    if b.call.args.len() > 5 {
        return Response::error(400, "a SymCall takes at most 5 arguments");
    }
    if b.call.timeout_ms == 0 || b.call.timeout_ms > 600_000 || b.call.repeat == 0 {
        return Response::error(400, "timeout_ms must be 1 to 600000 and repeat at least 1");
    }
    if h.is_paused() {
        return Response::error(409, "the VM is paused: continue it first");
    }
    let s = match sym(h) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match s.call(h, b.cpu, b.call) {
        Ok(r) => Response::ok(json!(r)),
        Err(e) => {
            let code = match e {
                SymCallError::NotRegistered(_) | SymCallError::Nested(_) => 409,
                SymCallError::GuestError(_) | SymCallError::Fault(_) => 422,
                SymCallError::Timeout(_) => 504,
                SymCallError::Failed(_) => 500,
            };
            Response::error(code, e)
        }
    }
}

/// `GET /vm/symspy`: the page's address, the VMM's and the guest's halves.
fn symspy(h: &VmHandle) -> Response {
    let s = match sym(h) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let gpa = s.symspy_page();
    if gpa == 0 {
        return Response::error(
            404,
            "the guest has not registered a SymSpy page (MSR 0x534)",
        );
    }
    let (seq, kv) = s.symspy_guest().unwrap_or_default();
    let guest: serde_json::Map<String, serde_json::Value> =
        kv.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Response::ok(json!({
        "page": format!("{gpa:#x}"),
        "guest_seq": seq,
        "guest": guest,
    }))
}

/// `PUT /vm/symmod` `{"hex": "..."}`: queue a module blob for the guest.
fn symmod(h: &VmHandle, req: &Request) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        hex: String,
    }
    let b: Body = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return Response::error(400, format!("bad symmod request: {e}")),
    };
    let blob = match decode_hex(&b.hex) {
        Some(v) if !v.is_empty() && v.len() <= MAX_API_MODULE => v,
        Some(v) => {
            return Response::error(
                400,
                format!(
                    "a module through the API is 1 to {MAX_API_MODULE} bytes, not {}",
                    v.len()
                ),
            );
        }
        None => return Response::error(400, "'hex' is not an even-length hex string"),
    };
    let s = match sym(h) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let len = blob.len();
    match s.queue_module(blob) {
        Ok(waiting) => Response::ok(json!({ "bytes": len, "waiting": waiting })),
        Err(e) => Response::error(409, e),
    }
}

pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `GET /vm/inspect` (the `inspector` extension): the VM, its cores, devices and extensions.
/// The VM is paused for the read (unless it already is) so the tree is consistent.
fn inspect(h: &VmHandle) -> Response {
    let Some(insp) = control::<palacios_devices::ext::inspector::Inspector>(h) else {
        return Response::error(
            404,
            "this VM has no inspector: add <extension name=\"inspector\"/> to its <extensions>",
        );
    };
    let Some(parts) = h.parts().cloned() else {
        return Response::error(503, "the VM is not built yet");
    };
    let was_paused = h.is_paused();
    if !was_paused {
        if let Err(e) = h.pause(Duration::from_secs(10)) {
            return Response::error(409, e);
        }
    }
    let mut cores = Vec::new();
    if insp.cores {
        for cpu in 0..h.cores() {
            let c = h.with_core(cpu, Duration::from_secs(10), |v| {
                let regs = v.regs().ok();
                let sregs = v.sregs().ok();
                json!({
                    "regs": regs,
                    "cr0": sregs.map(|s| format!("{:#x}", s.cr0)),
                    "cr3": sregs.map(|s| format!("{:#x}", s.cr3)),
                    "cr4": sregs.map(|s| format!("{:#x}", s.cr4)),
                    "efer": sregs.map(|s| format!("{:#x}", s.efer)),
                    "cs": sregs.map(|s| s.cs),
                })
            });
            cores.push(match c {
                Ok(mut v) => {
                    v["mode"] = json!(format!("{:?}", h.core_mode(cpu)));
                    v
                }
                Err(e) => json!({ "error": e.to_string() }),
            });
        }
    }
    let devices: serde_json::Map<String, serde_json::Value> = parts
        .devices
        .iter()
        .map(|d| {
            (
                d.id.clone(),
                json!({ "class": d.class, "version": d.state.version(), "state": d.state.save() }),
            )
        })
        .collect();
    let exts = control::<Extensions>(h)
        .map(|e| e.inspect())
        .unwrap_or_default();
    if !was_paused {
        let _ = h.try_resume();
    }
    Response::ok(json!({
        "vm": {
            "cores": h.cores(),
            "memory_mib": parts.config.mem_mib,
            "backend": parts.backend,
            "time_dilation": parts.config.time.dilation,
        },
        "cores": cores,
        "devices": devices,
        "extensions": exts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decoding_refuses_junk() {
        assert_eq!(decode_hex("90c3"), Some(vec![0x90, 0xc3]));
        assert_eq!(decode_hex("9"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex(""), Some(vec![]));
    }
}
