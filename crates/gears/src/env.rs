//! `env_inject`: add or replace environment variables of a named program when it is started.
//!
//! At an execve (SYSCALL 59) whose file name (or its last component) is the program, the
//! service builds a new environment array in the calling process's memory, below its stack
//! pointer (past the red zone): the old entries minus the replaced names, then the injected
//! ones, then NULL; and points the call's `envp` at it. The kernel copies that array onto the
//! new program's initial stack, so the program starts with the variables. Pages of that area
//! that are not present are faulted in by the guest kernel first: the service raises a page
//! fault at the execve instruction and sees the call again when it is re-executed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use palacios_vmm::backend::Exit;
use palacios_vmm::config::ExtensionConfig;
use palacios_vmm::extension::{CoreCtx, CoreHooks, ExitAction, Extension, ExtensionClass};
use palacios_vmm::intercept::{Intercepted, SyscallAbi, nr_add, space_of};
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption};
use serde_json::{Value, json};

use crate::hub::{Gears, Want};
use crate::lock;
use crate::service::{ApiError, Service, ServiceHandle, body};
use crate::walk::{self, WalkError};

const NAME: &str = "env_inject";
const EXECVE: u32 = 59;
const MAX_ENV: usize = 4096;
const MAX_ENV_BYTES: usize = 256 * 1024;
/// Below the stack pointer: the red zone and some room.
const GAP: u64 = 1024;
/// Page faults raised for one execve before giving up.
const MAX_FAULTS: u32 = 8;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The program: a file name as passed to execve, or its last component.
    pub program: String,
    /// Variables to add (replacing ones of the same name).
    pub vars: BTreeMap<String, String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Rule {
    id: u64,
    spec: RuleSpec,
    hits: u64,
    recent: VecDeque<String>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    next_id: u64,
    rules: Vec<Rule>,
    errors: VecDeque<String>,
}

pub struct Inner {
    hub: Arc<Gears>,
    state: Mutex<State>,
    /// Faults raised per (space, RIP) of an execve not yet rewritten.
    faults: Mutex<HashMap<(u64, u64), u32>>,
}

/// The extension object (it keeps the API's control alive).
pub struct EnvInject(Arc<Inner>, #[allow(dead_code)] Arc<ServiceHandle>);

fn check_spec(s: &RuleSpec) -> Result<(), String> {
    if s.program.is_empty() || s.program.len() > 4095 || s.program.contains('\0') {
        return Err("the program name must have 1 to 4095 bytes and no NUL".into());
    }
    if s.vars.is_empty() || s.vars.len() > 32 {
        return Err("give 1 to 32 variables".into());
    }
    for (k, v) in &s.vars {
        if k.is_empty() || k.len() > 128 || k.contains(['=', '\0']) {
            return Err(format!(
                "bad variable name '{k}' (1 to 128 bytes, no '=' or NUL)"
            ));
        }
        if v.len() > 4096 || v.contains('\0') {
            return Err(format!("the value of {k} is too long or has a NUL"));
        }
    }
    Ok(())
}

/// The new environment: `old` without the names `vars` sets, then `vars` as NAME=VALUE.
/// Returns (kept old pointers, new strings).
pub fn merge_env(
    old: &[(u64, String)],
    vars: &BTreeMap<String, String>,
) -> (Vec<u64>, Vec<String>) {
    let kept = old
        .iter()
        .filter(|(_, s)| {
            let name = s.split('=').next().unwrap_or("");
            !vars.contains_key(name)
        })
        .map(|(p, _)| *p)
        .collect();
    let new = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
    (kept, new)
}

impl Inner {
    fn publish(&self, s: &State) {
        let mut w = Want::default();
        if !s.rules.is_empty() {
            nr_add(
                &mut w.syscalls.everywhere[SyscallAbi::Syscall64 as usize],
                EXECVE,
            );
        }
        self.hub.want(NAME, w);
    }

    fn error(&self, msg: String) {
        tracing::warn!("env_inject: {msg}");
        let mut s = lock(&self.state);
        if s.errors.len() == 16 {
            s.errors.pop_front();
        }
        s.errors.push_back(msg);
    }

    fn on_execve(&self, core: &mut CoreCtx) -> ExitAction {
        let (Ok(mut regs), Ok(sregs)) = (core.vcpu.regs(), core.vcpu.sregs()) else {
            return ExitAction::Continue;
        };
        if regs.rax != u64::from(EXECVE) {
            return ExitAction::Continue;
        }
        let (mem, root) = (core.mem, sregs.cr3);
        let Ok(file) = walk::read_cstr(mem, root, regs.rdi, 4096, true) else {
            return ExitAction::Continue;
        };
        let base = file.rsplit('/').next().unwrap_or("");
        let mut vars = BTreeMap::new();
        let mut ids = Vec::new();
        for r in &lock(&self.state).rules {
            if r.spec.program == file || r.spec.program == base {
                vars.extend(r.spec.vars.clone());
                ids.push(r.id);
            }
        }
        if ids.is_empty() {
            return ExitAction::Continue;
        }
        // The old environment (a NULL envp is an empty one).
        let mut old = Vec::new();
        let mut bytes = 0usize;
        let mut p = regs.rdx;
        while p != 0 && old.len() < MAX_ENV {
            let mut b = [0u8; 8];
            if walk::read(mem, root, p, &mut b, true).is_err() {
                self.error(format!("{file}: unreadable environment array at {p:#x}"));
                return ExitAction::Continue;
            }
            let s = u64::from_le_bytes(b);
            if s == 0 {
                break;
            }
            let Ok(text) = walk::read_cstr(mem, root, s, 32 * 1024, true) else {
                self.error(format!("{file}: unreadable environment string at {s:#x}"));
                return ExitAction::Continue;
            };
            bytes += text.len() + 1;
            if bytes > MAX_ENV_BYTES {
                self.error(format!(
                    "{file}: the environment is over {MAX_ENV_BYTES} bytes"
                ));
                return ExitAction::Continue;
            }
            old.push((s, text));
            p += 8;
        }
        let (kept, new) = merge_env(&old, &vars);
        let strings: usize = new.iter().map(|s| s.len() + 1).sum();
        let count = kept.len() + new.len() + 1;
        // The caller's stack pointer is whatever it made it: no room is an error.
        let Some((top, str_lo, array)) = regs.rsp.checked_sub(GAP).and_then(|t| {
            let top = t & !15;
            let str_lo = top.checked_sub(strings as u64)?;
            let array = str_lo.checked_sub(8 * count as u64)? & !15;
            Some((top, str_lo, array))
        }) else {
            self.error(format!(
                "{file}: no room below the stack pointer {:#x}",
                regs.rsp
            ));
            return ExitAction::Continue;
        };
        let key = (space_of(root), regs.rip);
        if let Err(e) = walk::check(mem, root, array, top - array, true, true) {
            let (addr, code) = match e {
                WalkError::NotMapped(a) => (a, 6),
                WalkError::ReadOnly(a) => (a, 7),
                other => {
                    self.error(format!("{file}: no room below the stack: {other}"));
                    return ExitAction::Continue;
                }
            };
            let mut f = lock(&self.faults);
            let n = f.entry(key).or_default();
            *n += 1;
            if *n > MAX_FAULTS {
                f.remove(&key);
                drop(f);
                self.error(format!(
                    "{file}: the stack below {:#x} stays unmapped; not injected",
                    regs.rsp
                ));
                return ExitAction::Continue;
            }
            drop(f);
            // Let the guest kernel map it; the execve runs again afterwards.
            return match core.vcpu.inject_exception(14, Some(code), addr) {
                Ok(()) => ExitAction::Handled,
                Err(_) => ExitAction::Continue,
            };
        }
        lock(&self.faults).remove(&key);
        let mut ptrs = kept;
        let mut at = str_lo;
        let mut blob = Vec::with_capacity(strings);
        for s in &new {
            ptrs.push(at);
            blob.extend_from_slice(s.as_bytes());
            blob.push(0);
            at += s.len() as u64 + 1;
        }
        ptrs.push(0);
        let arr: Vec<u8> = ptrs.iter().flat_map(|p| p.to_le_bytes()).collect();
        if walk::write(mem, root, str_lo, &blob, true).is_err()
            || walk::write(mem, root, array, &arr, true).is_err()
        {
            self.error(format!("{file}: writing the new environment failed"));
            return ExitAction::Continue;
        }
        regs.rdx = array;
        if core.vcpu.set_regs(&regs).is_err() {
            return ExitAction::Continue;
        }
        let pid = self.hub.current(&*core.vcpu).map_or(0, |t| t.tgid);
        let mut s = lock(&self.state);
        for r in s.rules.iter_mut().filter(|r| ids.contains(&r.id)) {
            r.hits += 1;
            if r.recent.len() == 16 {
                r.recent.pop_front();
            }
            r.recent.push_back(format!("pid {pid}: {file}"));
        }
        ExitAction::Continue
    }
}

impl Service for Inner {
    fn name(&self) -> &'static str {
        NAME
    }
    fn list(&self) -> Value {
        let s = lock(&self.state);
        json!({ "rules": s.rules, "errors": s.errors })
    }
    fn start(&self, b: &Value) -> Result<Value, ApiError> {
        let spec: RuleSpec = body(NAME, b)?;
        check_spec(&spec).map_err(ApiError::bad)?;
        self.hub.check_user().map_err(|e| ApiError::new(409, e))?;
        Ok(json!({ "id": self.add(spec) }))
    }
    fn stop(&self, id: u64) -> Result<(), ApiError> {
        let mut s = lock(&self.state);
        let n = s.rules.len();
        s.rules.retain(|r| r.id != id);
        if s.rules.len() == n {
            return Err(ApiError::new(404, format!("no {NAME} rule {id}")));
        }
        self.publish(&s);
        Ok(())
    }
}

impl Inner {
    fn add(&self, spec: RuleSpec) -> u64 {
        let mut s = lock(&self.state);
        s.next_id += 1;
        let id = s.next_id;
        s.rules.push(Rule {
            id,
            spec,
            hits: 0,
            recent: VecDeque::new(),
        });
        self.publish(&s);
        id
    }
}

impl Extension for EnvInject {
    fn core(&self, _cpu: u32) -> Option<Box<dyn CoreHooks>> {
        Some(Box::new(Hooks(self.0.clone())))
    }
    fn inspect(&self) -> Value {
        self.0.list()
    }
}

struct Hooks(Arc<Inner>);

impl CoreHooks for Hooks {
    fn on_entry(&mut self, core: &mut CoreCtx) {
        self.0.hub.sync(core.cpu, core.vcpu);
    }
    fn on_exit(&mut self, core: &mut CoreCtx, exit: &Exit) -> ExitAction {
        match exit {
            Exit::Intercept(Intercepted::Syscall {
                abi: SyscallAbi::Syscall64,
                entered: false,
            }) => self.0.on_execve(core),
            _ => ExitAction::Continue,
        }
    }
}

pub struct EnvInjectClass;

impl ExtensionClass for EnvInjectClass {
    fn name(&self) -> &'static str {
        NAME
    }
    fn help(&self) -> &'static str {
        "GEARS: add or replace environment variables of a named program at its execve (emulator backend)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[DeviceOption {
            name: "inject",
            help: "<inject program=\"env\" var=\"NAME\" value=\"VALUE\"/>: a variable injected from the start",
        }]
    }
    fn create(
        &self,
        ctx: &mut BuildCtx,
        cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError> {
        let hub = Gears::get_or_create(ctx)?;
        let inner = Arc::new(Inner {
            hub,
            state: Mutex::new(State::default()),
            faults: Mutex::new(HashMap::new()),
        });
        for r in cfg.node.children_named("inject") {
            r.check_options("an env_inject rule", &["program", "var", "value"])?;
            let spec = RuleSpec {
                program: r.req("program")?.to_string(),
                vars: BTreeMap::from([(
                    r.req("var")?.to_string(),
                    r.val("value")?.unwrap_or("").to_string(),
                )]),
            };
            check_spec(&spec).map_err(|e| r.err(e))?;
            inner.add(spec);
        }
        let handle = crate::service::install(ctx, &inner);
        Ok(Arc::new(EnvInject(inner, handle)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_and_adds() {
        let old = vec![
            (0x10, "PATH=/bin".to_string()),
            (0x20, "HOME=/".to_string()),
            (0x30, "NOEQUALS".to_string()),
        ];
        let vars = BTreeMap::from([
            ("HOME".to_string(), "/root".to_string()),
            ("GEARS".to_string(), "1".to_string()),
        ]);
        let (kept, new) = merge_env(&old, &vars);
        assert_eq!(kept, vec![0x10, 0x30]);
        assert_eq!(new, vec!["GEARS=1".to_string(), "HOME=/root".to_string()]);
    }

    #[test]
    fn specs_are_checked() {
        let ok = RuleSpec {
            program: "env".into(),
            vars: BTreeMap::from([("A".into(), "b".into())]),
        };
        assert!(check_spec(&ok).is_ok());
        let mut bad = ok.clone();
        bad.vars = BTreeMap::from([("A=B".into(), "b".into())]);
        assert!(check_spec(&bad).unwrap_err().contains("bad variable name"));
        let mut bad = ok;
        bad.program.clear();
        assert!(check_spec(&bad).is_err());
    }
}

impl crate::service::Stateful for Inner {
    type State = State;
    fn state(&self) -> &Mutex<State> {
        &self.state
    }
    fn publish(&self, s: &State) {
        Inner::publish(self, s)
    }
}
