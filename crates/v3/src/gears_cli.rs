//! `v3 gears`: the GEARS services and guarded modules of a running VM, through its control API.
//!
//! ```text
//! v3 gears VM                                  what the VM has (services, guest layout)
//! v3 gears VM ps                               the guest's processes (needs gears.ko)
//! v3 gears VM SERVICE [list]                   rules/jobs/modules and their results
//! v3 gears VM SERVICE start JSON|@FILE         add a rule, an injection, a module manifest
//! v3 gears VM SERVICE stop ID                  remove it
//! v3 gears VM SERVICE set JSON                 settings (guard_mods)
//! ```
//! SERVICE is syscall_intercept, env_inject, code_inject or guard_mods.

use std::time::Duration;

use serde_json::Value;

use crate::status;

#[derive(clap::Args, Debug)]
pub struct GearsArgs {
    /// The VM: its --name, or its API socket path.
    pub vm: String,
    /// `ps`, or a service: syscall_intercept, env_inject, code_inject, guard_mods.
    pub what: Option<String>,
    /// list (default), start, stop or set.
    pub action: Option<String>,
    /// start/set: a JSON object or @FILE holding one; stop: the id.
    pub arg: Option<String>,
}

fn json_arg(a: Option<&str>) -> Result<Value, String> {
    let a = a.ok_or("give the request as JSON or @FILE")?;
    let text = match a.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?
        }
        None => a.to_string(),
    };
    serde_json::from_str(&text).map_err(|e| format!("the request is not JSON: {e}"))
}

/// Run the verb; returns the exit status.
pub fn run(a: &GearsArgs) -> u8 {
    let req = match (a.what.as_deref(), a.action.as_deref()) {
        (None, _) => Ok(("GET", "/vm/gears".to_string(), None)),
        (Some("ps"), None) => Ok(("GET", "/vm/gears/processes".to_string(), None)),
        (Some(s), None | Some("list")) => Ok(("GET", format!("/vm/gears/{s}"), None)),
        (Some(s), Some("start")) => {
            json_arg(a.arg.as_deref()).map(|b| ("POST", format!("/vm/gears/{s}"), Some(b)))
        }
        (Some(s), Some("set")) => {
            json_arg(a.arg.as_deref()).map(|b| ("PUT", format!("/vm/gears/{s}"), Some(b)))
        }
        (Some(s), Some("stop")) => match a.arg.as_deref().map(str::parse::<u64>) {
            Some(Ok(id)) => Ok(("DELETE", format!("/vm/gears/{s}/{id}"), None)),
            _ => Err("stop needs the numeric id that start printed".to_string()),
        },
        (Some(_), Some(o)) => Err(format!("unknown action '{o}' (list, start, stop, set)")),
    };
    let (method, path, body) = match req {
        Ok(r) => r,
        Err(e) => {
            eprintln!("v3 gears: {e}");
            return status::CONFIG_ERROR;
        }
    };
    let sock = palacios_api::resolve(&a.vm);
    match palacios_api::request(&sock, method, &path, body.as_ref(), Duration::from_secs(60)) {
        Ok((200, v)) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            status::OK
        }
        Ok((code, v)) => {
            eprintln!(
                "v3 gears: {}: {} (HTTP {code})",
                a.vm,
                v.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("request refused")
            );
            status::CONFIG_ERROR
        }
        Err(e) => {
            eprintln!("v3 gears: {e}");
            status::CONFIG_ERROR
        }
    }
}
