//! Running a SymCall on a core (Palacios' synchronous upcall): save the core's state, enter
//! the guest's registered entry point with interrupts off, run exits until the guest returns
//! with SYMCALL_RET (or fails), and put the saved state back exactly.

use std::time::{Duration, Instant};

use palacios_x86::{Regs, SRegs, segment};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::Vcpu;
use crate::core_loop::{CoreLoop, Flow};
use crate::extension::CoreHooks;
use crate::guest_va;
use crate::symbiotic::{SymCallError, SymCallRequest, SymCallResult};
use crate::telemetry::CoreStats;

impl CoreLoop {
    /// Take the waiting SymCall request, run it, and answer it.
    pub(crate) fn serve_symcall(
        &self,
        vcpu: &mut dyn Vcpu,
        hooks: &mut [Box<dyn CoreHooks>],
        stats: &mut CoreStats,
    ) {
        let Some((req, reply)) = self.sym.take_request(self.cpu) else {
            return;
        };
        let r = self.symcall(vcpu, hooks, stats, &req);
        self.sym.done(self.cpu);
        if let Err(e) = &r {
            tracing::info!("vCPU {}: SymCall {:#x}: {e}", self.cpu, req.call);
        }
        let _ = reply.send(r);
    }

    fn symcall(
        &self,
        vcpu: &mut dyn Vcpu,
        hooks: &mut [Box<dyn CoreHooks>],
        stats: &mut CoreStats,
        req: &SymCallRequest,
    ) -> Result<SymCallResult, SymCallError> {
        let host = |e: crate::backend::BackendError| SymCallError::Failed(e.to_string());
        let [rip, rsp, cs, gs, fs] = self
            .sym
            .symcall_regs(self.cpu)
            .ok_or_else(|| SymCallError::Failed(format!("no core {}", self.cpu)))?;
        if rip == 0 {
            return Err(SymCallError::NotRegistered(self.cpu));
        }
        // The interrupted instruction's I/O answer waits until the state is back.
        let pending = vcpu.set_aside_pending().map_err(host)?;
        let saved_regs = vcpu.regs().map_err(host)?;
        let saved_sregs = match vcpu.sregs() {
            Ok(s) => s,
            Err(e) => {
                vcpu.restore_pending(pending);
                return Err(host(e));
            }
        };
        let mut sregs = saved_sregs;
        if cs != 0 && cs as u16 != sregs.cs.selector {
            let (c, s) = self
                .kernel_segments(&saved_sregs, cs as u16)
                .map_err(SymCallError::Failed)?;
            sregs.cs = c;
            sregs.ss = s;
        }
        if gs != 0 {
            sregs.gs.base = gs;
        }
        if fs != 0 {
            sregs.fs.base = fs;
        }
        let timeout = Duration::from_millis(req.timeout_ms.clamp(1, 600_000));
        let repeat = req.repeat.clamp(1, 1_000_000);
        let mut arg = [0u64; 5];
        for (a, v) in arg.iter_mut().zip(&req.args) {
            *a = *v;
        }
        let t0 = Instant::now();
        let mut outcome = Err(SymCallError::Failed("not run".into()));
        if sregs != saved_sregs {
            if let Err(e) = vcpu.set_sregs(&sregs) {
                vcpu.restore_pending(pending);
                return Err(host(e));
            }
        }
        for _ in 0..repeat {
            let regs = Regs {
                rax: req.call,
                rbx: arg[0],
                rcx: arg[1],
                rdx: arg[2],
                rsi: arg[3],
                rdi: arg[4],
                rsp,
                rip,
                // Interrupts off; reserved bit 1.
                rflags: 0x2,
                ..saved_regs
            };
            outcome = vcpu.set_regs(&regs).map_err(host).and_then(|_| {
                self.symcall_once(
                    vcpu,
                    hooks,
                    stats,
                    Instant::now() + timeout,
                    timeout.as_millis() as u64,
                )
            });
            if outcome.is_err() {
                break;
            }
        }
        let elapsed = t0.elapsed();
        // Put the interrupted code back exactly as it was, whatever happened.
        // Answers the upcall left unconsumed are dropped with its state.
        let _ = vcpu.set_aside_pending();
        // Segment and control registers are put back only if the call changed them (loading
        // them flushes translations on both backends).
        let restored = match vcpu.sregs() {
            Ok(now) if now == saved_sregs => Ok(()),
            _ => vcpu.set_sregs(&saved_sregs),
        }
        .and_then(|_| vcpu.set_regs(&saved_regs));
        vcpu.restore_pending(pending);
        if let Err(e) = restored {
            self.handle.stop(crate::control::Outcome::Failed(format!(
                "vCPU {}: cannot restore the state after a SymCall: {e}",
                self.cpu
            )));
            return Err(host(e));
        }
        outcome.map(|(status, results, exits)| SymCallResult {
            status,
            results,
            exits,
            ns_per_call: (elapsed.as_nanos() / u128::from(repeat)) as u64,
        })
    }

    /// Run the guest until the SymCall returns: (status, results, exits).
    fn symcall_once(
        &self,
        vcpu: &mut dyn Vcpu,
        hooks: &mut [Box<dyn CoreHooks>],
        stats: &mut CoreStats,
        deadline: Instant,
        timeout_ms: u64,
    ) -> Result<(u64, [u64; 4], u64), SymCallError> {
        let mut exits = 0u64;
        loop {
            if self.handle.is_stopping() {
                return Err(SymCallError::Failed("the VM is stopping".into()));
            }
            if Instant::now() >= deadline {
                return Err(SymCallError::Timeout(timeout_ms));
            }
            if self.sym.has_request(self.cpu) {
                self.sym.refuse_nested(self.cpu);
            }
            let flow = self
                .step(vcpu, hooks, stats, true)
                .map_err(|e| SymCallError::Fault(e.to_string()))?;
            exits += 1;
            match flow {
                Flow::Next => {}
                Flow::SymRet(status, r) => return Ok((status, r, exits)),
                Flow::SymErr(code) => return Err(SymCallError::GuestError(code)),
                Flow::Hlt => {
                    return Err(SymCallError::Fault(
                        "the guest executed HLT inside the SymCall".into(),
                    ));
                }
                Flow::Shutdown => {
                    return Err(SymCallError::Fault(
                        "the core shut down (triple fault) inside the SymCall".into(),
                    ));
                }
            }
        }
    }

    /// The code segment `sel` from the guest's GDT, and the stack segment after it.
    fn kernel_segments(
        &self,
        s: &SRegs,
        sel: u16,
    ) -> Result<(palacios_x86::Segment, palacios_x86::Segment), String> {
        let desc = |sel: u16| -> Result<palacios_x86::Segment, String> {
            let idx = u64::from(sel & !7);
            if sel & 4 != 0 || idx == 0 || idx + 7 > u64::from(s.gdt.limit) {
                return Err(format!(
                    "SymCall CS selector {sel:#x} is not in the GDT (limit {:#x})",
                    s.gdt.limit
                ));
            }
            let va = s.gdt.base.wrapping_add(idx);
            let pa = guest_va::translate(&self.mem, s, va, false)
                .map_err(|e| format!("the GDT at {va:#x} cannot be read: {e:?}"))?;
            let raw: u64 = self
                .mem
                .read_obj(GuestAddress(pa))
                .map_err(|e| format!("the GDT at {pa:#x} cannot be read: {e}"))?;
            Ok(segment::decode(sel, raw))
        };
        let cs = desc(sel)?;
        if !cs.present || !cs.s || cs.type_ & 8 == 0 {
            return Err(format!(
                "SymCall CS selector {sel:#x} is not a code segment"
            ));
        }
        let ss = desc(sel + 8)?;
        Ok((cs, ss))
    }
}
