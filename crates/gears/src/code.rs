//! `code_inject`: run a position-independent code blob inside a chosen process, in its own
//! context, at its next return to user mode; collect its return value; put the process back.
//!
//! When the process next enters user mode (the emulator stops there: an intercept on its
//! address space), the service takes a few pages below its stack pointer (past the red zone;
//! pages that are not present are faulted in by the guest kernel first), saves them and the
//! registers, clears the no-execute bit of those pages, writes the blob there with a 2 KiB
//! stack and a return address pointing at a VMCALL after the blob, and starts the blob
//! (`long entry(long arg)`, arg in RDI). The VMCALL (which the emulator turns into an exit
//! from any privilege level) ends it: RAX is the result, and memory, page-table bits and
//! registers go back as they were. An exception the blob raises also ends it (reported; the
//! process never sees it). The blob must not use SSE/x87 registers (their state is not saved).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use palacios_vmm::backend::Exit;
use palacios_vmm::config::ExtensionConfig;
use palacios_vmm::extension::{CoreCtx, CoreHooks, ExitAction, Extension, ExtensionClass};
use palacios_vmm::intercept::{Intercepted, space_of};
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption};
use palacios_x86::Regs;
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress};

use crate::hub::{Gears, Want};
use crate::lock;
use crate::service::{ApiError, Service, ServiceHandle, body};
use crate::walk::{self, NX, WalkError};

const NAME: &str = "code_inject";
const MAX_BLOB: usize = 64 * 1024;
/// The blob's stack.
const STACK: u64 = 2048;
/// Below the stack pointer: the red zone and some room.
const GAP: u64 = 512;
const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
const MAX_FAULTS: u32 = 16;
const KEEP_DONE: usize = 32;
/// How often a waiting injection checks that its process still exists.
const LIVENESS: Duration = Duration::from_millis(250);

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub pid: u32,
    /// The blob, hex (whitespace allowed).
    pub blob_hex: String,
    /// Passed in RDI.
    #[serde(default)]
    pub arg: u64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "status")]
enum Status {
    Pending,
    Running,
    Done { ret: i64 },
    Failed { error: String },
    Cancelled,
}

/// A blob running in its process: what to put back.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Run {
    saved: Regs,
    lo: u64,
    saved_bytes: Vec<u8>,
    /// Page-table entries (physical addresses) whose NX bit was cleared.
    nx: Vec<u64>,
    tramp_end: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Job {
    id: u64,
    pid: u32,
    space: u64,
    blob: Vec<u8>,
    arg: u64,
    #[serde(flatten)]
    status: Status,
    faults_raised: u32,
    run: Option<Run>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    next_id: u64,
    jobs: VecDeque<Job>,
}

pub struct Inner {
    hub: Arc<Gears>,
    state: Mutex<State>,
    last_check: Mutex<Instant>,
    /// A job is pending or running (checked on every exit without the lock).
    active: AtomicBool,
}

/// The extension object (it keeps the API's control alive).
pub struct CodeInject(Arc<Inner>, #[allow(dead_code)] Arc<ServiceHandle>);

/// Parse a hex blob (whitespace allowed).
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() % 2 != 0 {
        return Err("the blob has an odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "the blob is not hex".to_string())
        })
        .collect()
}

impl Inner {
    /// The first job not finished is the active one: ask the cores for what it needs.
    fn publish(&self, s: &State) {
        let mut w = Want::default();
        let head = s
            .jobs
            .iter()
            .find(|j| matches!(j.status, Status::Pending | Status::Running));
        self.active.store(head.is_some(), Ordering::Release);
        match head {
            Some(j) if j.status == Status::Pending => w.user_entry = Some(j.space),
            Some(j) => w.user_faults = Some(j.space),
            None => {}
        }
        self.hub.want(NAME, w);
    }

    fn active(s: &mut State) -> Option<&mut Job> {
        s.jobs
            .iter_mut()
            .find(|j| matches!(j.status, Status::Pending | Status::Running))
    }

    fn finish(&self, s: &mut State, status: Status) {
        if let Some(j) = Self::active(s) {
            if let Status::Failed { error } = &status {
                tracing::warn!("code_inject {} (pid {}): {error}", j.id, j.pid);
            }
            j.status = status;
            j.run = None;
        }
        let done = s
            .jobs
            .iter()
            .filter(|j| !matches!(j.status, Status::Pending | Status::Running))
            .count();
        if done > KEEP_DONE
            && let Some(i) = s
                .jobs
                .iter()
                .position(|j| !matches!(j.status, Status::Pending | Status::Running))
        {
            s.jobs.remove(i);
        }
        self.publish(s);
    }

    /// The process entered user mode: start the blob.
    fn on_user_entry(&self, core: &mut CoreCtx) -> ExitAction {
        let (Ok(regs), Ok(sregs)) = (core.vcpu.regs(), core.vcpu.sregs()) else {
            return ExitAction::Continue;
        };
        let space = space_of(sregs.cr3);
        let task = self.hub.current(&*core.vcpu);
        let mut s = lock(&self.state);
        let Some(j) = Self::active(&mut s) else {
            return ExitAction::Continue;
        };
        if j.status != Status::Pending || j.space != space {
            return ExitAction::Continue;
        }
        if let Some(t) = &task
            && t.tgid != j.pid
        {
            let msg = format!(
                "process {} exited (its address space now belongs to pid {})",
                j.pid, t.tgid
            );
            self.finish(&mut s, Status::Failed { error: msg });
            return ExitAction::Continue;
        }
        let (mem, root) = (core.mem, sregs.cr3);
        let need = STACK + j.blob.len() as u64 + VMCALL.len() as u64 + 16;
        // The guest's stack pointer is whatever the process made it: no room is an error.
        let Some((lo, top)) = regs.rsp.checked_sub(GAP).and_then(|t| {
            let top = t & !0xfff;
            top.checked_sub(need.div_ceil(0x1000) * 0x1000)
                .map(|lo| (lo, top))
        }) else {
            let msg = format!("no room below the stack pointer {:#x}", regs.rsp);
            self.finish(&mut s, Status::Failed { error: msg });
            return ExitAction::Continue;
        };
        if let Err(e) = walk::check(mem, root, lo, top - lo, true, true) {
            let (addr, code) = match e {
                WalkError::NotMapped(a) => (a, 6),
                WalkError::ReadOnly(a) => (a, 7),
                other => {
                    let msg = format!("no room below the stack: {other}");
                    self.finish(&mut s, Status::Failed { error: msg });
                    return ExitAction::Continue;
                }
            };
            j.faults_raised += 1;
            if j.faults_raised > MAX_FAULTS {
                let msg = format!("the stack below {:#x} stays unmapped", regs.rsp);
                self.finish(&mut s, Status::Failed { error: msg });
                return ExitAction::Continue;
            }
            // The guest kernel maps the page; the process enters user mode again after.
            return match core.vcpu.inject_exception(14, Some(code), addr) {
                Ok(()) => ExitAction::Handled,
                Err(_) => ExitAction::Continue,
            };
        }
        let mut saved_bytes = vec![0u8; (top - lo) as usize];
        let mut nx = Vec::new();
        let mut page = lo;
        while page < top {
            let Ok(m) = walk::walk(mem, root, page) else {
                return ExitAction::Continue;
            };
            for (pa, e) in m.entries {
                if e & NX != 0 && !nx.contains(&pa) {
                    nx.push(pa);
                }
            }
            page += 0x1000;
        }
        if walk::read(mem, root, lo, &mut saved_bytes, true).is_err() {
            return ExitAction::Continue;
        }
        let blob_at = lo + STACK;
        let tramp = blob_at + j.blob.len() as u64;
        let ret_slot = blob_at - 8;
        let mut code = j.blob.clone();
        code.extend_from_slice(&VMCALL);
        if walk::write(mem, root, blob_at, &code, true).is_err()
            || walk::write(mem, root, ret_slot, &tramp.to_le_bytes(), true).is_err()
        {
            return ExitAction::Continue;
        }
        for pa in &nx {
            if let Ok(e) = mem.read_obj::<u64>(GuestAddress(*pa)) {
                let _ = mem.write_obj(e & !NX, GuestAddress(*pa));
            }
        }
        core.vcpu.flush_tlb();
        let mut r = regs;
        r.rip = blob_at;
        r.rsp = ret_slot;
        r.rdi = j.arg;
        // No single-step, string direction up, no alignment checks.
        r.rflags &= !((1 << 8) | (1 << 10) | (1 << 18));
        if core.vcpu.set_regs(&r).is_err() {
            return ExitAction::Continue;
        }
        j.run = Some(Run {
            saved: regs,
            lo,
            saved_bytes,
            nx,
            tramp_end: tramp + VMCALL.len() as u64,
        });
        j.status = Status::Running;
        self.publish(&s);
        ExitAction::Handled
    }

    /// Put the process back (on the core it runs on now).
    fn restore(core: &mut CoreCtx, run: &Run, root: u64) {
        let _ = walk::write(core.mem, root, run.lo, &run.saved_bytes, true);
        for pa in &run.nx {
            if let Ok(e) = core.mem.read_obj::<u64>(GuestAddress(*pa)) {
                let _ = core.mem.write_obj(e | NX, GuestAddress(*pa));
            }
        }
        core.vcpu.flush_tlb();
        let _ = core.vcpu.set_regs(&run.saved);
    }

    /// The blob's VMCALL (result in RAX), or an exception it raised.
    fn on_end(&self, core: &mut CoreCtx, fault: Option<(u8, Option<u32>, u64)>) -> ExitAction {
        let mut s = lock(&self.state);
        let Some(j) = Self::active(&mut s) else {
            return ExitAction::Continue;
        };
        let Some(run) = j.run.clone() else {
            return ExitAction::Continue;
        };
        let (Ok(regs), Ok(sregs)) = (core.vcpu.regs(), core.vcpu.sregs()) else {
            return ExitAction::Continue;
        };
        if space_of(sregs.cr3) != j.space {
            return ExitAction::Continue;
        }
        let status = match fault {
            None if regs.rip == run.tramp_end => Status::Done {
                ret: regs.rax as i64,
            },
            None => return ExitAction::Continue,
            Some((vector, code, cr2)) => Status::Failed {
                error: format!(
                    "the code raised exception {vector}{} at rip {:#x}{}; the process was put back",
                    code.map(|c| format!(" (error code {c:#x})"))
                        .unwrap_or_default(),
                    regs.rip,
                    if vector == 14 {
                        format!(", address {cr2:#x}")
                    } else {
                        String::new()
                    },
                ),
            },
        };
        Self::restore(core, &run, sregs.cr3);
        self.finish(&mut s, status);
        ExitAction::Handled
    }

    /// Every so often: a waiting injection whose process is gone fails.
    fn liveness(&self) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        {
            let mut t = lock(&self.last_check);
            if t.elapsed() < LIVENESS {
                return;
            }
            *t = Instant::now();
        }
        let Some((pid, running)) = lock(&self.state)
            .jobs
            .iter()
            .find(|j| matches!(j.status, Status::Pending | Status::Running))
            .map(|j| (j.pid, j.status == Status::Running))
        else {
            return;
        };
        // Gone from the task list, or a zombie (an exiting task has given up its memory).
        let gone = matches!(
            self.hub.kernel(|k| k.process(pid)),
            Ok(Ok(None)) | Ok(Ok(Some(crate::linux::Task { space: None, .. })))
        );
        if gone {
            let mut s = lock(&self.state);
            if Self::active(&mut s).is_some_and(|j| j.pid == pid) {
                let error = if running {
                    format!("process {pid} exited while the code ran")
                } else {
                    format!("process {pid} exited before the code could run")
                };
                self.finish(&mut s, Status::Failed { error });
            }
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
            "jobs": s.jobs.iter().map(|j| {
                let mut v = json!({ "id": j.id, "pid": j.pid, "blob_len": j.blob.len(),
                                    "arg": j.arg, "faults_raised": j.faults_raised });
                if let (Value::Object(o), Ok(Value::Object(st))) =
                    (&mut v, serde_json::to_value(&j.status))
                {
                    o.extend(st);
                }
                v
            }).collect::<Vec<_>>()
        })
    }
    fn start(&self, b: &Value) -> Result<Value, ApiError> {
        let r: Request = body(NAME, b)?;
        let blob = parse_hex(&r.blob_hex).map_err(ApiError::bad)?;
        if blob.is_empty() || blob.len() > MAX_BLOB {
            return Err(ApiError::bad(format!("a blob has 1 to {MAX_BLOB} bytes")));
        }
        self.hub.check_user().map_err(|e| ApiError::new(409, e))?;
        let t = self
            .hub
            .kernel(|k| k.process(r.pid))
            .map_err(|e| ApiError::new(409, e))?
            .map_err(|e| ApiError::new(500, format!("reading the process list: {e}")))?
            .ok_or_else(|| ApiError::new(404, format!("no process {} in the guest", r.pid)))?;
        let space = t
            .space
            .ok_or_else(|| ApiError::new(409, format!("process {} is a kernel thread", r.pid)))?;
        let mut s = lock(&self.state);
        if s.jobs.len() >= 2 * KEEP_DONE {
            return Err(ApiError::new(409, "too many injections queued"));
        }
        s.next_id += 1;
        let id = s.next_id;
        s.jobs.push_back(Job {
            id,
            pid: r.pid,
            space,
            blob,
            arg: r.arg,
            status: Status::Pending,
            faults_raised: 0,
            run: None,
        });
        self.publish(&s);
        Ok(json!({ "id": id }))
    }
    fn stop(&self, id: u64) -> Result<(), ApiError> {
        let mut s = lock(&self.state);
        let Some(i) = s.jobs.iter().position(|j| j.id == id) else {
            return Err(ApiError::new(404, format!("no {NAME} job {id}")));
        };
        match s.jobs[i].status {
            Status::Running => {
                return Err(ApiError::new(
                    409,
                    "the code is running in the process; it ends when it returns",
                ));
            }
            Status::Pending => s.jobs[i].status = Status::Cancelled,
            _ => {
                s.jobs.remove(i);
            }
        }
        self.publish(&s);
        Ok(())
    }
}

impl Extension for CodeInject {
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
        self.0.liveness();
        match exit {
            Exit::Intercept(Intercepted::UserEntry) => self.0.on_user_entry(core),
            Exit::Intercept(Intercepted::UserFault { vector, code, cr2 }) => {
                self.0.on_end(core, Some((*vector, *code, *cr2)))
            }
            Exit::Hypercall => self.0.on_end(core, None),
            _ => ExitAction::Continue,
        }
    }
}

pub struct CodeInjectClass;

impl ExtensionClass for CodeInjectClass {
    fn name(&self) -> &'static str {
        NAME
    }
    fn help(&self) -> &'static str {
        "GEARS: run a position-independent code blob inside a process at its next return to user mode and collect its result (emulator backend; needs the guest's gears.ko)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(
        &self,
        ctx: &mut BuildCtx,
        _cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError> {
        let hub = Gears::get_or_create(ctx)?;
        let inner = Arc::new(Inner {
            hub,
            state: Mutex::new(State::default()),
            last_check: Mutex::new(Instant::now()),
            active: AtomicBool::new(false),
        });
        let handle = crate::service::install(ctx, &inner);
        Ok(Arc::new(CodeInject(inner, handle)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_blobs() {
        assert_eq!(parse_hex("0f 05\nc3").unwrap(), vec![0x0f, 0x05, 0xc3]);
        assert!(parse_hex("0f0").is_err());
        assert!(parse_hex("zz").is_err());
    }

    #[test]
    fn status_serializes_with_a_tag() {
        let v = serde_json::to_value(Status::Done { ret: 42 }).unwrap();
        assert_eq!(v, json!({"status": "done", "ret": 42}));
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
