//! A KVM vCPU's complete state for checkpoints and moves between backends: the neutral
//! [`VcpuState`] plus what only KVM has (XSAVE area, XCRs, events, debug registers, MP state,
//! the in-kernel LAPIC), and the MSR save list read and written in chunks.

use palacios_vmm::backend::{CoreMode, DebugRegs, VcpuEvents, VcpuState};
use palacios_vmm::{BackendError, Vcpu};

use std::io;

use crate::{KvmVcpu, host_err};

/// KVM-specific vCPU state kept beside the neutral [`palacios_vmm::backend::VcpuState`].
#[derive(serde::Serialize, serde::Deserialize)]
struct KvmVcpuExtras {
    xsave: kvm_bindings::kvm_xsave,
    xcrs: kvm_bindings::kvm_xcrs,
    events: kvm_bindings::kvm_vcpu_events,
    debugregs: kvm_bindings::kvm_debugregs,
    mp_state: kvm_bindings::kvm_mp_state,
    /// The in-kernel LAPIC (kernel irqchip only).
    lapic: Option<kvm_bindings::kvm_lapic_state>,
}

impl KvmVcpu {
    /// Every MSR in KVM's save list that this vCPU can read.
    fn read_all_msrs(&self) -> Result<Vec<(u32, u64)>, BackendError> {
        let list = &self.msr_list;
        let mut out = Vec::new();
        let mut i = 0;
        while i < list.len() {
            let chunk = &list[i..(i + 256).min(list.len())];
            let got = self.msrs(chunk)?;
            let n = got.len();
            out.extend(got);
            i += n;
            if n < chunk.len() {
                // KVM stops at the first MSR it cannot read: skip that one.
                i += 1;
            }
        }
        out.sort_by_key(|&(i, _)| i);
        Ok(out)
    }

    /// Write MSRs, skipping those KVM refuses (a different host may not know them all).
    fn write_msrs_lenient(&mut self, list: &[(u32, u64)]) {
        let mut rest = list;
        while !rest.is_empty() {
            match self.set_msrs(rest) {
                Ok(()) => break,
                Err(_) => {
                    // set_msrs reports the first refused one; find it and skip it.
                    let mut skipped = false;
                    for (k, &(i, v)) in rest.iter().enumerate() {
                        if self.set_msrs(&[(i, v)]).is_err() {
                            tracing::debug!("KVM refused MSR {i:#x} = {v:#x} on restore");
                            rest = &rest[k + 1..];
                            skipped = true;
                            break;
                        }
                    }
                    if !skipped {
                        break;
                    }
                }
            }
        }
    }

    pub(crate) fn save_full(&mut self) -> Result<VcpuState, BackendError> {
        self.complete_pending()?;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let fpu = self.fpu()?;
        let xsave = self.fd.get_xsave().map_err(host_err("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(host_err("KVM_GET_XCRS"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(host_err("KVM_GET_VCPU_EVENTS"))?;
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(host_err("KVM_GET_DEBUGREGS"))?;
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(host_err("KVM_GET_MP_STATE"))?;
        let lapic = if self.kernel_irqchip {
            Some(self.fd.get_lapic().map_err(host_err("KVM_GET_LAPIC"))?)
        } else {
            None
        };
        let msrs = self.read_all_msrs()?;
        let xcr0 = xcrs.xcrs[..xcrs.nr_xcrs as usize]
            .iter()
            .find(|x| x.xcr == 0)
            .map(|x| x.value)
            .unwrap_or(1);
        let extras = KvmVcpuExtras {
            xsave,
            xcrs,
            events,
            debugregs,
            mp_state,
            lapic,
        };
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xcr0,
            debug: DebugRegs {
                dr: debugregs.db,
                dr6: debugregs.dr6,
                dr7: debugregs.dr7,
            },
            events: VcpuEvents {
                interrupt_shadow: events.interrupt.shadow != 0,
                nmi_blocked: events.nmi.masked != 0,
                nmi_pending: events.nmi.pending != 0,
                irq_window: self.fd.get_kvm_run().request_interrupt_window != 0,
            },
            msrs,
            mode: CoreMode::Running,
            pending_start: None,
            backend: Some((
                "kvm".into(),
                serde_json::to_value(&extras).map_err(|e| BackendError::Host {
                    op: "save KVM vCPU state",
                    source: io::Error::other(e.to_string()),
                })?,
            )),
        })
    }

    pub(crate) fn restore_full(&mut self, s: &VcpuState) -> Result<(), BackendError> {
        let extras: Option<KvmVcpuExtras> = match &s.backend {
            Some((name, v)) if name == "kvm" => Some(serde_json::from_value(v.clone()).map_err(
                |e| BackendError::Host {
                    op: "restore KVM vCPU state",
                    source: io::Error::other(format!("malformed KVM state: {e}")),
                },
            )?),
            _ => None,
        };
        self.set_sregs(&s.sregs)?;
        self.set_regs(&s.regs)?;
        match &extras {
            Some(x) => {
                // SAFETY: the xsave area came from KVM_GET_XSAVE of a vCPU of this backend
                // (a kvm_xsave is a plain 4 KiB buffer; KVM validates its contents).
                unsafe { self.fd.set_xsave(&x.xsave) }.map_err(host_err("KVM_SET_XSAVE"))?;
                self.fd
                    .set_xcrs(&x.xcrs)
                    .map_err(host_err("KVM_SET_XCRS"))?;
            }
            None => self.set_fpu(&s.fpu)?,
        }
        // The TSC first: the TSC deadline is relative to it.
        let mut msrs = s.msrs.clone();
        msrs.sort_by_key(|&(i, _)| i != palacios_x86::msr::IA32_TSC);
        self.write_msrs_lenient(&msrs);
        let mut dbg = kvm_bindings::kvm_debugregs {
            db: s.debug.dr,
            dr6: s.debug.dr6,
            dr7: s.debug.dr7,
            ..Default::default()
        };
        if let Some(x) = &extras {
            dbg.flags = x.debugregs.flags;
        }
        if s.debug != DebugRegs::default() {
            self.fd
                .set_debug_regs(&dbg)
                .map_err(host_err("KVM_SET_DEBUGREGS"))?;
        }
        let mut ev = match &extras {
            Some(x) => x.events,
            None => self
                .fd
                .get_vcpu_events()
                .map_err(host_err("KVM_GET_VCPU_EVENTS"))?,
        };
        ev.interrupt.shadow = u8::from(s.events.interrupt_shadow);
        ev.nmi.masked = u8::from(s.events.nmi_blocked);
        ev.nmi.pending = u8::from(s.events.nmi_pending);
        ev.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW
            | kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING;
        self.fd
            .set_vcpu_events(&ev)
            .map_err(host_err("KVM_SET_VCPU_EVENTS"))?;
        if let Some(x) = &extras {
            if self.kernel_irqchip {
                if let Some(l) = &x.lapic {
                    self.fd.set_lapic(l).map_err(host_err("KVM_SET_LAPIC"))?;
                }
                self.fd
                    .set_mp_state(x.mp_state)
                    .map_err(host_err("KVM_SET_MP_STATE"))?;
            }
        }
        self.fd.get_kvm_run().request_interrupt_window = u8::from(s.events.irq_window);
        Ok(())
    }
}
