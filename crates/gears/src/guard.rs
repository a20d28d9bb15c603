//! `guard_mods`: guarded Linux kernel modules. One module gets a privilege the rest of the
//! guest does not have (an I/O port range: reads give the device's value, writes are kept)
//! only between valid border crossings that the VMM checks.
//!
//! The module's entry points are wrapped at build time (scripts/guard-wrap.py): each wrapper
//! makes a GUARD_ENTER hypercall before calling the real function and GUARD_EXIT after it. The
//! build step also writes a manifest: the wrappers' offsets in the module's text, the offsets of
//! their two crossings, and their code bytes. The VMM binds a loaded module on its first
//! crossing (the code at the computed base must match the manifest) and then checks each one:
//! - ENTER: from the registered crossing of that entry (RIP), with the return-address slot
//!   where the wrapper's frame puts it, a return address outside the module in kernel text,
//!   and (with the guest layout known) on the current task's own kernel stack;
//! - EXIT: from the entry's exit crossing, matching the innermost open ENTER on that stack.
//!
//! Open crossings are kept per kernel stack (so a task that sleeps inside the module keeps its
//! own, and an interrupt, which runs on another stack, gets nothing). An access to the ports is
//! allowed only at CPL0, from the module's text, on a stack with an open crossing into that
//! module. Everything refused is logged and counted; an ENTER that is not matched by an EXIT
//! within the budget is revoked.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use palacios_vmm::backend::Exit;
use palacios_vmm::config::ExtensionConfig;
use palacios_vmm::extension::{CoreCtx, CoreHooks, ExitAction, Extension, ExtensionClass};
use palacios_vmm::hypercall::HcallCtx;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption, GuestMem};
use serde_json::{Value, json};

use crate::hub::Gears;
use crate::service::{ApiError, Service, ServiceHandle, body};
use crate::{id, lock, walk};

const NAME: &str = "guard_mods";
const PORTS: u16 = 4;
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// THREAD_SIZE when the guest has not reported it (x86-64 Linux).
const DEFAULT_THREAD_SIZE: u64 = 16 * 1024;
/// The doorbell (`outb %al, $imm8`) is two bytes; backends report RIP at it or past it.
const DOORBELL_LEN: u64 = 2;
const LOG: usize = 64;

/// One wrapped entry point, as the build step describes it (offsets within the module's
/// `.text`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    pub name: String,
    pub id: u32,
    pub wrapper: u64,
    pub enter: u64,
    pub exit: u64,
    /// The wrapper's bytes as hex pairs, `??` where a relocation goes.
    pub code: String,
}

/// A guarded module's manifest (written by scripts/guard-wrap.py).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub module: String,
    pub tag: u32,
    pub text_size: u64,
    pub entries: Vec<EntrySpec>,
}

/// A checked manifest with its code patterns.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Module {
    manifest: Manifest,
    code: Vec<Vec<Option<u8>>>,
    base: Option<u64>,
    entries: u64,
    exits: u64,
}

impl Module {
    fn new(m: Manifest) -> Result<Module, String> {
        if m.module.is_empty() || m.module.len() > 64 {
            return Err("the module name has 1 to 64 bytes".into());
        }
        if m.text_size == 0 || m.text_size > 16 << 20 {
            return Err(format!("text size {} is not plausible", m.text_size));
        }
        if m.entries.is_empty() || m.entries.len() > 64 {
            return Err("a manifest has 1 to 64 entries".into());
        }
        let mut code = Vec::new();
        for (i, e) in m.entries.iter().enumerate() {
            if m.entries[..i].iter().any(|o| o.id == e.id) {
                return Err(format!("entry id {} appears twice", e.id));
            }
            let c = parse_code(&e.code).map_err(|x| format!("entry {}: {x}", e.name))?;
            let end = e.wrapper + c.len() as u64;
            let inside = |o: u64| o >= e.wrapper && o + DOORBELL_LEN <= end;
            if end > m.text_size || !inside(e.enter) || !inside(e.exit) {
                return Err(format!(
                    "entry {}: its wrapper or crossings lie outside the text",
                    e.name
                ));
            }
            let db = |o: u64| c[(o - e.wrapper) as usize] == Some(0xe6);
            if !db(e.enter) || !db(e.exit) {
                return Err(format!(
                    "entry {}: the crossings are not doorbell instructions (outb %al, imm8)",
                    e.name
                ));
            }
            code.push(c);
        }
        Ok(Module {
            manifest: m,
            code,
            base: None,
            entries: 0,
            exits: 0,
        })
    }

    fn text(&self) -> Option<(u64, u64)> {
        self.base
            .map(|b| (b, b.wrapping_add(self.manifest.text_size)))
    }

    fn contains(&self, addr: u64) -> bool {
        self.text().is_some_and(|(lo, hi)| (lo..hi).contains(&addr))
    }

    /// Whether every wrapper's code is at `base` in guest memory.
    fn matches_at(&self, mem: &GuestMem, root: u64, base: u64) -> bool {
        self.manifest
            .entries
            .iter()
            .zip(&self.code)
            .all(|(e, pat)| {
                let mut b = vec![0u8; pat.len()];
                walk::read(mem, root, base.wrapping_add(e.wrapper), &mut b, false).is_ok()
                    && pat.iter().zip(&b).all(|(p, v)| p.is_none_or(|p| p == *v))
            })
    }
}

/// Check a manifest as the API or the config would (for fuzzing the parser).
pub fn check_manifest(json: &[u8]) -> Result<(), String> {
    let m: Manifest = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    Module::new(m).map(|_| ())
}

/// `"53 57 ?? e6"` → bytes with wildcards.
pub fn parse_code(s: &str) -> Result<Vec<Option<u8>>, String> {
    let c: Vec<Option<u8>> = s
        .split_whitespace()
        .map(|t| {
            if t == "??" {
                Ok(None)
            } else {
                u8::from_str_radix(t, 16)
                    .map(Some)
                    .map_err(|_| format!("'{t}' is not a hex byte"))
            }
        })
        .collect::<Result<_, _>>()?;
    if c.is_empty() || c.len() > 512 {
        return Err("the code has 1 to 512 bytes".into());
    }
    Ok(c)
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Open {
    module: usize,
    id: u32,
    slot: u64,
    /// Milliseconds since the service started.
    since_ms: u64,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Counters {
    entries: u64,
    exits: u64,
    refused_crossings: u64,
    granted_accesses: u64,
    refused_accesses: u64,
    revoked: u64,
}

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub check_stack: bool,
    pub budget_ms: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct State {
    modules: Vec<Module>,
    /// Open crossings by kernel-stack base, innermost last.
    open: BTreeMap<u64, Vec<Open>>,
    counters: Counters,
    log: VecDeque<String>,
    settings: Settings,
    /// What the module last wrote to the ports.
    written: u32,
}

pub struct Inner {
    hub: Arc<Gears>,
    port: u16,
    secret: u32,
    state: Mutex<State>,
    any_open: AtomicBool,
    start: Instant,
}

/// The extension object (it keeps the API's control alive).
pub struct GuardMods(Arc<Inner>, #[allow(dead_code)] Arc<ServiceHandle>);

impl Inner {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn thread_size(&self) -> u64 {
        self.hub
            .linux()
            .map_or(DEFAULT_THREAD_SIZE, |i| u64::from(i.thread_size))
    }

    fn log(s: &mut State, msg: String) {
        tracing::warn!("guard_mods: {msg}");
        if s.log.len() == LOG {
            s.log.pop_front();
        }
        s.log.push_back(msg);
    }

    fn refuse(s: &mut State, c: &mut HcallCtx, msg: String) {
        s.counters.refused_crossings += 1;
        Self::log(s, format!("crossing refused: {msg}"));
        c.ret(-1);
    }

    fn enter(&self, c: &mut HcallCtx) {
        let (eid, slot, tag) = (c.arg(0) as u32, c.arg(1), c.arg(2) as u32);
        let (rip, rsp) = (c.regs.rip, c.regs.rsp);
        let root = match c.sregs() {
            Ok(s) => s.cr3,
            Err(_) => return c.ret(-1),
        };
        let task = self.hub.current(&*c.vcpu);
        let mut s = lock(&self.state);
        let Some(mi) = s.modules.iter().position(|m| m.manifest.tag == tag) else {
            return Self::refuse(
                &mut s,
                c,
                format!("ENTER with unknown tag {tag:#x} at rip {rip:#x}"),
            );
        };
        let m = &s.modules[mi];
        let Some(e) = m.manifest.entries.iter().find(|e| e.id == eid).cloned() else {
            return Self::refuse(
                &mut s,
                c,
                format!("ENTER of unknown entry {eid} at rip {rip:#x}"),
            );
        };
        let who = format!("{}:{}", m.manifest.module, e.name);
        match m.base {
            Some(b) => {
                if rip != b.wrapping_add(e.enter) && rip != b.wrapping_add(e.enter + DOORBELL_LEN) {
                    return Self::refuse(
                        &mut s,
                        c,
                        format!(
                            "ENTER of {who} at rip {rip:#x}, not its wrapper's crossing ({:#x})",
                            b.wrapping_add(e.enter)
                        ),
                    );
                }
            }
            None => {
                let cands = [
                    rip.wrapping_sub(e.enter + DOORBELL_LEN),
                    rip.wrapping_sub(e.enter),
                ];
                let Some(b) = cands.into_iter().find(|b| m.matches_at(c.mem, root, *b)) else {
                    return Self::refuse(
                        &mut s,
                        c,
                        format!(
                            "ENTER of {who} at rip {rip:#x}: the code there is not the module's wrappers"
                        ),
                    );
                };
                s.modules[mi].base = Some(b);
                let msg = format!("module {} bound at {b:#x}", s.modules[mi].manifest.module);
                tracing::info!("guard_mods: {msg}");
                if s.log.len() == LOG {
                    s.log.pop_front();
                }
                s.log.push_back(msg);
            }
        }
        let region = rsp & !(self.thread_size() - 1);
        if s.settings.check_stack {
            if slot != rsp.wrapping_add(56) {
                return Self::refuse(
                    &mut s,
                    c,
                    format!(
                        "ENTER of {who}: the return-address slot {slot:#x} is not in the wrapper's frame"
                    ),
                );
            }
            let ret = match walk::read_u64(c.mem, root, slot) {
                Ok(r) => r,
                Err(e) => return Self::refuse(&mut s, c, format!("ENTER of {who}: {e}")),
            };
            let nested = s
                .open
                .get(&region)
                .is_some_and(|v| v.iter().any(|o| o.module == mi));
            if ret < KERNEL_HALF || (s.modules[mi].contains(ret) && !nested) {
                return Self::refuse(
                    &mut s,
                    c,
                    format!(
                        "ENTER of {who}: return address {ret:#x} is not a caller in kernel text outside the module"
                    ),
                );
            }
            if let Some(t) = &task
                && let Ok(Ok(stack)) = self.hub.kernel(|k| k.stack_of(t.addr))
                && stack != region
            {
                return Self::refuse(
                    &mut s,
                    c,
                    format!(
                        "ENTER of {who}: stack {rsp:#x} is not task {}'s kernel stack ({stack:#x})",
                        t.pid
                    ),
                );
            }
        }
        let since_ms = self.now_ms();
        s.open.entry(region).or_default().push(Open {
            module: mi,
            id: eid,
            slot,
            since_ms,
        });
        s.counters.entries += 1;
        s.modules[mi].entries += 1;
        self.any_open.store(true, Ordering::Release);
        c.ret(0);
    }

    fn exit(&self, c: &mut HcallCtx) {
        let (eid, slot, tag) = (c.arg(0) as u32, c.arg(1), c.arg(2) as u32);
        let (rip, rsp) = (c.regs.rip, c.regs.rsp);
        let mut s = lock(&self.state);
        let Some(mi) = s.modules.iter().position(|m| m.manifest.tag == tag) else {
            return Self::refuse(
                &mut s,
                c,
                format!("EXIT with unknown tag {tag:#x} at rip {rip:#x}"),
            );
        };
        let m = &s.modules[mi];
        let (Some(b), Some(e)) = (m.base, m.manifest.entries.iter().find(|e| e.id == eid)) else {
            return Self::refuse(
                &mut s,
                c,
                format!("EXIT of entry {eid} at rip {rip:#x} of a module not entered"),
            );
        };
        let who = format!("{}:{}", m.manifest.module, e.name);
        if rip != b.wrapping_add(e.exit) && rip != b.wrapping_add(e.exit + DOORBELL_LEN) {
            return Self::refuse(
                &mut s,
                c,
                format!("EXIT of {who} at rip {rip:#x}, not its wrapper's crossing"),
            );
        }
        if s.settings.check_stack && slot != rsp.wrapping_add(24) {
            return Self::refuse(
                &mut s,
                c,
                format!(
                    "EXIT of {who}: the return-address slot {slot:#x} is not in the wrapper's frame"
                ),
            );
        }
        let region = rsp & !(self.thread_size() - 1);
        let top_ok = s
            .open
            .get(&region)
            .and_then(|v| v.last())
            .is_some_and(|o| o.module == mi && o.id == eid && o.slot == slot);
        if !top_ok {
            return Self::refuse(
                &mut s,
                c,
                format!("EXIT of {who} with no matching ENTER on stack {region:#x}"),
            );
        }
        if let Some(v) = s.open.get_mut(&region) {
            v.pop();
            if v.is_empty() {
                s.open.remove(&region);
            }
        }
        s.counters.exits += 1;
        s.modules[mi].exits += 1;
        self.any_open.store(!s.open.is_empty(), Ordering::Release);
        c.ret(0);
    }

    /// A port access: allowed only inside an open crossing, from the module's own code.
    fn access(&self, core: &mut CoreCtx, port: u16, write: Option<u32>, size: u8) -> ExitAction {
        let Ok(regs) = core.vcpu.regs() else {
            return ExitAction::Continue;
        };
        let cpl = core.vcpu.cpl_and_64bit().map_or(3, |m| m.0);
        let region = regs.rsp & !(self.thread_size() - 1);
        let mut s = lock(&self.state);
        let inside = cpl == 0
            && s.open
                .get(&region)
                .and_then(|v| v.last())
                .is_some_and(|o| s.modules[o.module].contains(regs.rip));
        let what = if write.is_some() {
            "write to"
        } else {
            "read of"
        };
        if inside {
            s.counters.granted_accesses += 1;
        } else {
            s.counters.refused_accesses += 1;
            Self::log(
                &mut s,
                format!(
                    "{what} port {port:#x} refused at rip {:#x} (CPL{cpl}): not inside a guarded module's crossing",
                    regs.rip
                ),
            );
        }
        match write {
            Some(v) => {
                if inside {
                    s.written = v;
                }
            }
            None => {
                let v = if inside { self.secret } else { u32::MAX };
                core.vcpu
                    .complete_read(&v.to_le_bytes()[..usize::from(size.clamp(1, 4))]);
            }
        }
        ExitAction::Handled
    }

    /// Crossings open longer than the budget lose their privilege.
    fn revoke_stale(&self) {
        if !self.any_open.load(Ordering::Acquire) {
            return;
        }
        let now = self.now_ms();
        let mut s = lock(&self.state);
        let budget = s.settings.budget_ms;
        let mut stale = Vec::new();
        for (region, v) in s.open.iter_mut() {
            v.retain(|o| {
                let old = now.saturating_sub(o.since_ms) > budget;
                if old {
                    stale.push((*region, o.clone()));
                }
                !old
            });
        }
        s.open.retain(|_, v| !v.is_empty());
        for (region, o) in stale {
            s.counters.revoked += 1;
            let m = &s.modules[o.module].manifest;
            let name = m
                .entries
                .iter()
                .find(|e| e.id == o.id)
                .map_or("?".to_string(), |e| e.name.clone());
            let msg = format!(
                "entry {}:{name} on stack {region:#x} did not cross back within {budget} ms: privilege revoked",
                m.module
            );
            Self::log(&mut s, msg);
        }
        self.any_open.store(!s.open.is_empty(), Ordering::Release);
    }

    fn add(&self, m: Manifest) -> Result<u64, String> {
        let mut s = lock(&self.state);
        if s.modules.iter().any(|x| x.manifest.tag == m.tag) {
            return Err(format!(
                "a module with tag {:#x} is registered already",
                m.tag
            ));
        }
        if s.modules.len() >= 16 {
            return Err("at most 16 guarded modules".into());
        }
        s.modules.push(Module::new(m)?);
        Ok(s.modules.len() as u64)
    }
}

impl Service for Inner {
    fn name(&self) -> &'static str {
        NAME
    }
    fn list(&self) -> Value {
        let s = lock(&self.state);
        json!({
            "port": format!("{:#x}", self.port),
            "settings": s.settings,
            "counters": s.counters,
            "modules": s.modules.iter().enumerate().map(|(i, m)| json!({
                "id": i + 1, "module": m.manifest.module, "tag": m.manifest.tag,
                "base": m.base.map(|b| format!("{b:#x}")),
                "entries": m.entries, "exits": m.exits,
            })).collect::<Vec<_>>(),
            "open": s.open.iter().map(|(r, v)| (format!("{r:#x}"), v.len())).collect::<BTreeMap<_, _>>(),
            "log": s.log,
        })
    }
    fn start(&self, b: &Value) -> Result<Value, ApiError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            manifest: Manifest,
        }
        let r: Body = body(NAME, b)?;
        let id = self.add(r.manifest).map_err(ApiError::bad)?;
        Ok(json!({ "id": id }))
    }
    fn stop(&self, id: u64) -> Result<(), ApiError> {
        let mut s = lock(&self.state);
        let i = (id as usize).wrapping_sub(1);
        if i >= s.modules.len() {
            return Err(ApiError::new(404, format!("no guarded module {id}")));
        }
        if s.open.values().flatten().any(|o| o.module == i) {
            return Err(ApiError::new(409, "the module has open crossings"));
        }
        s.modules.remove(i);
        for v in s.open.values_mut() {
            for o in v.iter_mut() {
                if o.module > i {
                    o.module -= 1;
                }
            }
        }
        Ok(())
    }
    fn set(&self, b: &Value) -> Result<Value, ApiError> {
        let mut s = lock(&self.state);
        let mut v = serde_json::to_value(s.settings).unwrap_or(Value::Null);
        if let (Value::Object(o), Value::Object(n)) = (&mut v, b) {
            o.extend(n.clone());
        }
        let new: Settings = body(NAME, &v)?;
        if new.budget_ms == 0 || new.budget_ms > 3_600_000 {
            return Err(ApiError::bad("budget_ms must be 1 to 3600000"));
        }
        s.settings = new;
        Ok(json!(new))
    }
}

impl Extension for GuardMods {
    fn core(&self, _cpu: u32) -> Option<Box<dyn CoreHooks>> {
        Some(Box::new(Hooks(self.0.clone())))
    }
    fn inspect(&self) -> Value {
        self.0.list()
    }
}

struct Hooks(Arc<Inner>);

impl CoreHooks for Hooks {
    fn on_exit(&mut self, core: &mut CoreCtx, exit: &Exit) -> ExitAction {
        self.0.revoke_stale();
        let p = self.0.port;
        match exit {
            Exit::IoIn { port, size } if (p..p + PORTS).contains(port) => {
                self.0.access(core, *port, None, *size)
            }
            Exit::IoOut { port, data } if (p..p + PORTS).contains(port) => {
                let mut b = [0u8; 4];
                let d = data.as_slice();
                let n = d.len().min(4);
                b[..n].copy_from_slice(&d[..n]);
                self.0
                    .access(core, *port, Some(u32::from_le_bytes(b)), n as u8)
            }
            _ => ExitAction::Continue,
        }
    }
}

pub struct GuardModsClass;

impl ExtensionClass for GuardModsClass {
    fn name(&self) -> &'static str {
        NAME
    }
    fn help(&self) -> &'static str {
        "guarded kernel modules: an I/O port range only a wrapped module may use, between VMM-checked border crossings (any backend)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[
            DeviceOption {
                name: "port",
                help: "first of the 4 privileged I/O ports (default 0x5100)",
            },
            DeviceOption {
                name: "secret",
                help: "what a granted read returns (default 0x600df00d)",
            },
            DeviceOption {
                name: "budget_ms",
                help: "an ENTER not matched by its EXIT within this is revoked (default 1000)",
            },
            DeviceOption {
                name: "check_stack",
                help: "check return addresses and stacks at crossings: on (default) or off",
            },
            DeviceOption {
                name: "module",
                help: "<module manifest=\"guarded.manifest.json\"/>: a guarded module's manifest (scripts/guard-wrap.py)",
            },
        ]
    }
    fn create(
        &self,
        ctx: &mut BuildCtx,
        cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError> {
        let n = &cfg.node;
        let port = n.num("port")?.unwrap_or(0x5100);
        if port > u64::from(u16::MAX - PORTS) {
            return Err(n.val_err("port", format!("port {port:#x} is out of range")));
        }
        let secret = n.num("secret")?.unwrap_or(0x600d_f00d);
        let secret =
            u32::try_from(secret).map_err(|_| n.val_err("secret", "the secret is 32 bits"))?;
        let budget_ms = n.num("budget_ms")?.unwrap_or(1000);
        if budget_ms == 0 || budget_ms > 3_600_000 {
            return Err(n.val_err("budget_ms", "budget_ms must be 1 to 3600000"));
        }
        let check_stack = match n.val("check_stack")? {
            None | Some("on") => true,
            Some("off") => false,
            Some(o) => {
                return Err(n.val_err(
                    "check_stack",
                    format!("check_stack is on or off, not '{o}'"),
                ));
            }
        };
        let hub = Gears::get_or_create(ctx)?;
        let inner = Arc::new(Inner {
            hub,
            port: port as u16,
            secret,
            state: Mutex::new(State {
                modules: Vec::new(),
                open: BTreeMap::new(),
                counters: Counters::default(),
                log: VecDeque::new(),
                settings: Settings {
                    check_stack,
                    budget_ms,
                },
                written: 0,
            }),
            any_open: AtomicBool::new(false),
            start: Instant::now(),
        });
        for m in n.children_named("module") {
            m.check_options("a guarded module", &["manifest"])?;
            let path = ctx.resolve_path(m.req("manifest")?);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| m.err(format!("cannot read {}: {e}", path.display())))?;
            let man: Manifest = serde_json::from_str(&text)
                .map_err(|e| m.err(format!("{}: not a guard manifest: {e}", path.display())))?;
            inner.add(man).map_err(|e| m.err(e))?;
        }
        let (a, b) = (inner.clone(), inner.clone());
        ctx.add_hypercall(id::GUARD_ENTER, move |c| a.enter(c))?;
        ctx.add_hypercall(id::GUARD_EXIT, move |c| b.exit(c))?;
        let (s, l) = (inner.clone(), inner.clone());
        ctx.register_state(state_fn(
            1,
            move || lock(&s.state).clone(),
            move |v: State| {
                l.any_open.store(!v.open.is_empty(), Ordering::Release);
                *lock(&l.state) = v;
                Ok(())
            },
        ));
        let handle = Arc::new(ServiceHandle(inner.clone()));
        ctx.vm.add_control(&handle);
        Ok(Arc::new(GuardMods(inner, handle)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            module: "guarded".into(),
            tag: 0x6d67,
            text_size: 0x400,
            entries: vec![EntrySpec {
                name: "gm_read".into(),
                id: 0,
                wrapper: 0x100,
                enter: 0x104,
                exit: 0x10a,
                code: "53 57 56 57 e6 ec e8 ?? ?? ?? e6 ec c3".into(),
            }],
        }
    }

    #[test]
    fn manifests_are_checked() {
        assert!(Module::new(manifest()).is_ok());
        let mut m = manifest();
        m.entries[0].enter = 0x105;
        assert!(Module::new(m).unwrap_err().contains("doorbell"));
        let mut m = manifest();
        m.entries[0].wrapper = 0x3fa;
        assert!(Module::new(m).is_err());
        let mut m = manifest();
        m.entries.push(m.entries[0].clone());
        assert!(Module::new(m).unwrap_err().contains("twice"));
        let mut m = manifest();
        m.entries[0].code = "zz".into();
        assert!(Module::new(m).is_err());
        assert_eq!(
            parse_code("e6 ?? 01").unwrap(),
            vec![Some(0xe6), None, Some(1)]
        );
    }

    #[test]
    fn binds_only_where_the_wrappers_are() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = palacios_vmm::test_support::guest_mem(4 << 20);
        let root = crate::walk::tests::tables(&mem);
        let m = Module::new(manifest()).unwrap();
        // Kernel VA 0xffff_8880_0000_0000 is physical 0x20_0000 in walk's tables.
        let base = 0xffff_8880_0000_1000u64;
        assert!(!m.matches_at(&mem, root, base));
        let code = [
            0x53, 0x57, 0x56, 0x57, 0xe6, 0xec, 0xe8, 1, 2, 3, 0xe6, 0xec, 0xc3,
        ];
        mem.write_slice(&code, GuestAddress(0x20_1100)).unwrap();
        assert!(m.matches_at(&mem, root, base));
        assert!(!m.matches_at(&mem, root, base + 1));
    }
}
