//! `syscall_intercept`: stop chosen system calls of chosen processes, before they execute,
//! on both SYSCALL and INT 0x80; count and log them with their arguments; optionally answer
//! them in the VMM with a chosen result (the call then does not run).
//!
//! Selection is by number and by process: a rule for a pid stops only in that process's address
//! space (the emulator compares CR3, so calls of other processes cost nothing extra), a rule
//! for an executable name stops the selected numbers everywhere and compares the name of the
//! current task in the VMM.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use palacios_vmm::backend::Exit;
use palacios_vmm::config::ExtensionConfig;
use palacios_vmm::extension::{CoreCtx, CoreHooks, ExitAction, Extension, ExtensionClass};
use palacios_vmm::intercept::{Intercepted, NrSet, SyscallAbi, nr_add, space_of};
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption};
use serde_json::{Value, json};

use crate::hub::{Gears, Want};
use crate::service::{ApiError, Service, ServiceHandle, body};
use crate::{lock, names};

const NAME: &str = "syscall_intercept";
/// Calls kept per rule for the log.
const RECENT: usize = 32;
const MAX_RULES: usize = 64;

/// A rule as given (API body or config `<rule>`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Names or numbers ([`names::parse`]).
    pub syscalls: Vec<String>,
    /// Only this process (thread-group id).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Only tasks with this name (the kernel's `comm`, at most 15 bytes).
    #[serde(default)]
    pub name: Option<String>,
    /// Answer matching calls with this result instead of running them.
    #[serde(default)]
    pub result: Option<i64>,
    /// Answer only this many calls (then let them run).
    #[serde(default)]
    pub times: Option<u64>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Call {
    pid: u32,
    tid: u32,
    comm: String,
    abi: SyscallAbi,
    nr: u64,
    name: String,
    args: [u64; 6],
    /// The result the VMM answered with, when it did.
    answered: Option<i64>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Rule {
    id: u64,
    spec: RuleSpec,
    nrs: [NrSet; 2],
    space: Option<u64>,
    calls: u64,
    by_call: BTreeMap<String, u64>,
    answered: u64,
    recent: VecDeque<Call>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    next_id: u64,
    rules: Vec<Rule>,
    /// Calls that stopped but matched no rule (another process sharing a selected number).
    unmatched: u64,
}

/// The service (shared by the extension object, the cores' hooks and the control API).
pub struct Inner {
    hub: Arc<Gears>,
    state: Mutex<State>,
}

/// The extension object (it keeps the control the API finds alive).
pub struct SyscallIntercept(Arc<Inner>, #[allow(dead_code)] Arc<ServiceHandle>);

impl Inner {
    fn publish(&self, s: &State) {
        let mut w = Want::default();
        for r in &s.rules {
            match r.space {
                Some(space) => w.syscalls.by_space.push((space, r.nrs)),
                None => {
                    for abi in 0..2 {
                        for (a, b) in w.syscalls.everywhere[abi].iter_mut().zip(&r.nrs[abi]) {
                            *a |= b;
                        }
                    }
                }
            }
        }
        self.hub.want(NAME, w);
    }

    fn add(&self, spec: RuleSpec, from_config: bool) -> Result<u64, ApiError> {
        if spec.syscalls.is_empty() || spec.syscalls.len() > 64 {
            return Err(ApiError::bad("give 1 to 64 system calls"));
        }
        let mut nrs = [[0u64; 8]; 2];
        for s in &spec.syscalls {
            let (a, b) = names::parse(s).map_err(ApiError::bad)?;
            if let Some(a) = a {
                nr_add(&mut nrs[SyscallAbi::Syscall64 as usize], a);
            }
            if let Some(b) = b {
                nr_add(&mut nrs[SyscallAbi::Int80 as usize], b);
            }
        }
        if let Some(n) = &spec.name
            && (n.is_empty() || n.len() > 15)
        {
            return Err(ApiError::bad("a task name has 1 to 15 bytes"));
        }
        let space = match spec.pid {
            None => None,
            Some(_) if from_config => {
                return Err(ApiError::bad(
                    "a rule in the config cannot name a pid (select by name, or add the rule through the API)",
                ));
            }
            Some(pid) => {
                self.hub
                    .check_backend()
                    .map_err(|e| ApiError::new(409, e))?;
                let t = self
                    .hub
                    .kernel(|k| k.process(pid))
                    .map_err(|e| ApiError::new(409, e))?
                    .map_err(|e| ApiError::new(500, format!("reading the process list: {e}")))?
                    .ok_or_else(|| ApiError::new(404, format!("no process {pid} in the guest")))?;
                Some(t.space.ok_or_else(|| {
                    ApiError::new(409, format!("process {pid} is a kernel thread"))
                })?)
            }
        };
        let mut s = lock(&self.state);
        if s.rules.len() >= MAX_RULES {
            return Err(ApiError::new(409, format!("at most {MAX_RULES} rules")));
        }
        s.next_id += 1;
        let id = s.next_id;
        s.rules.push(Rule {
            id,
            spec,
            nrs,
            space,
            calls: 0,
            by_call: BTreeMap::new(),
            answered: 0,
            recent: VecDeque::new(),
        });
        self.publish(&s);
        Ok(id)
    }

    /// A stopped system call: log it for every rule it matches; answer it if one says so.
    fn on_syscall(&self, core: &mut CoreCtx, abi: SyscallAbi, entered: bool) -> ExitAction {
        let Ok(mut regs) = core.vcpu.regs() else {
            return ExitAction::Continue;
        };
        let Ok(sregs) = core.vcpu.sregs() else {
            return ExitAction::Continue;
        };
        let space = space_of(sregs.cr3);
        let (nr, args) = match abi {
            SyscallAbi::Syscall64 => (
                regs.rax,
                [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9],
            ),
            SyscallAbi::Int80 => (
                regs.rax & 0xffff_ffff,
                [regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp]
                    .map(|v| v & 0xffff_ffff),
            ),
        };
        let task = self.hub.current(&*core.vcpu);
        let mut s = lock(&self.state);
        let mut answer = None;
        let mut matched = false;
        for r in s.rules.iter_mut() {
            if !palacios_vmm::intercept::nr_in(&r.nrs[abi as usize], nr) {
                continue;
            }
            if let Some(sp) = r.space
                && sp != space
            {
                continue;
            }
            // A pid rule also checks the process (its address space may have been reused).
            if let (Some(pid), Some(t)) = (r.spec.pid, &task)
                && t.tgid != pid
            {
                continue;
            }
            if let Some(n) = &r.spec.name
                && task.as_ref().is_none_or(|t| &t.comm != n)
            {
                continue;
            }
            matched = true;
            r.calls += 1;
            let cname = names::name(nr, abi == SyscallAbi::Int80);
            *r.by_call.entry(cname.clone()).or_default() += 1;
            let mut answered = None;
            if let Some(v) = r.spec.result
                && answer.is_none()
                && r.spec.times.is_none_or(|t| r.answered < t)
            {
                r.answered += 1;
                answered = Some(v);
                answer = Some(v);
            }
            if r.recent.len() == RECENT {
                r.recent.pop_front();
            }
            r.recent.push_back(Call {
                pid: task.as_ref().map_or(0, |t| t.tgid),
                tid: task.as_ref().map_or(0, |t| t.pid),
                comm: task.as_ref().map_or_else(String::new, |t| t.comm.clone()),
                abi,
                nr,
                name: cname,
                args,
                answered,
            });
        }
        // Stopped for one of our numbers but no rule's process: counted (a call stopped for
        // another service, env_inject's execve say, is not ours to count).
        let ours = s
            .rules
            .iter()
            .any(|r| palacios_vmm::intercept::nr_in(&r.nrs[abi as usize], nr));
        if !matched && ours {
            s.unmatched += 1;
        }
        drop(s);
        match answer {
            Some(v) if entered => match crate::ret::answer_entered(core.vcpu, core.mem, abi, v) {
                Ok(()) => ExitAction::Handled,
                Err(e) => {
                    tracing::warn!("syscall_intercept: cannot answer the call: {e}");
                    ExitAction::Continue
                }
            },
            Some(v) => {
                regs.rax = match abi {
                    SyscallAbi::Syscall64 => v as u64,
                    SyscallAbi::Int80 => (regs.rax & !0xffff_ffff) | (v as u64 & 0xffff_ffff),
                };
                // Both SYSCALL and INT 0x80 are two bytes.
                regs.rip = regs.rip.wrapping_add(2);
                if core.vcpu.set_regs(&regs).is_err() {
                    return ExitAction::Continue;
                }
                ExitAction::Handled
            }
            None => ExitAction::Continue,
        }
    }
}

impl Service for Inner {
    fn name(&self) -> &'static str {
        NAME
    }
    fn list(&self) -> Value {
        let s = lock(&self.state);
        json!({
            "rules": s.rules.iter().map(|r| json!({
                "id": r.id, "spec": r.spec,
                "space": r.space.map(|v| format!("{v:#x}")),
                "calls": r.calls, "by_call": r.by_call, "answered": r.answered,
                "recent": r.recent,
            })).collect::<Vec<_>>(),
            "unmatched": s.unmatched,
        })
    }
    fn start(&self, b: &Value) -> Result<Value, ApiError> {
        let spec: RuleSpec = body(NAME, b)?;
        self.hub
            .check_backend()
            .map_err(|e| ApiError::new(409, e))?;
        Ok(json!({ "id": self.add(spec, false)? }))
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

impl Extension for SyscallIntercept {
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
            Exit::Intercept(Intercepted::Syscall { abi, entered }) => {
                self.0.on_syscall(core, *abi, *entered)
            }
            _ => ExitAction::Continue,
        }
    }
}

pub struct SyscallInterceptClass;

impl ExtensionClass for SyscallInterceptClass {
    fn name(&self) -> &'static str {
        NAME
    }
    fn help(&self) -> &'static str {
        "GEARS: stop chosen system calls of chosen processes (SYSCALL and INT 0x80), log them, optionally answer them (emulator backend; needs the guest's gears.ko for process names and pids)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[DeviceOption {
            name: "rule",
            help: "<rule syscalls=\"write,read\" name=\"busybox\" result=\"-1\" times=\"1\"/>: a rule active from the start (pid rules are added through the API)",
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
        });
        for r in cfg.node.children_named("rule") {
            r.check_options(
                "a syscall_intercept rule",
                &["syscalls", "pid", "name", "result", "times"],
            )?;
            let mut o = serde_json::Map::new();
            for a in &r.attrs {
                let v = match a.name.as_str() {
                    "syscalls" => Value::from(
                        a.value
                            .split(',')
                            .map(|x| x.trim().to_string())
                            .collect::<Vec<_>>(),
                    ),
                    "pid" | "result" | "times" => a
                        .value
                        .parse::<i64>()
                        .map(Value::from)
                        .map_err(|_| r.err(format!("'{}' must be a number", a.name)))?,
                    _ => Value::from(a.value.clone()),
                };
                o.insert(a.name.clone(), v);
            }
            let spec: RuleSpec = body(NAME, &Value::Object(o)).map_err(|e| r.err(e.msg))?;
            inner.add(spec, true).map_err(|e| r.err(e.msg))?;
        }
        let handle = crate::service::install(ctx, &inner);
        Ok(Arc::new(SyscallIntercept(inner, handle)))
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
