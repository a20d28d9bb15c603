//! Extension hooks around a real core's exits: `on_exit` runs in the extensions' order, and a
//! hook that handles an exit stops the ones after it.

use std::sync::{Arc, Mutex};

use palacios_emu::EmuBackend;
use palacios_vmm::backend::{Backend, Exit};
use palacios_vmm::extension::{
    CoreCtx, CoreHooks, ExitAction, Extension, Extensions, run_exit_hooks,
};
use palacios_vmm::{MemoryMap, VmHandle};
use palacios_x86::CpuState;
use vm_memory::{Bytes, GuestAddress};

type Log = Arc<Mutex<Vec<String>>>;

struct Recorder {
    name: &'static str,
    log: Log,
    /// Handle `out` to this port.
    handles: Option<u16>,
}

impl CoreHooks for Recorder {
    fn on_entry(&mut self, core: &mut CoreCtx) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} entry cpu{}", self.name, core.cpu));
    }
    fn on_exit(&mut self, core: &mut CoreCtx, exit: &Exit) -> ExitAction {
        let rip = core.vcpu.regs().unwrap().rip;
        self.log
            .lock()
            .unwrap()
            .push(format!("{} exit {exit:?} rip {rip:#x}", self.name));
        match (exit, self.handles) {
            (Exit::IoOut { port, .. }, Some(p)) if *port == p => ExitAction::Handled,
            _ => ExitAction::Continue,
        }
    }
}

struct Ext {
    name: &'static str,
    log: Log,
    handles: Option<u16>,
}

impl Extension for Ext {
    fn core(&self, _cpu: u32) -> Option<Box<dyn CoreHooks>> {
        Some(Box::new(Recorder {
            name: self.name,
            log: self.log.clone(),
            handles: self.handles,
        }))
    }
}

#[test]
fn exit_hooks_run_in_order_and_a_handled_exit_stops_the_rest() {
    let mem = MemoryMap::pc(16 << 20).create_memory().unwrap();
    // out 0x80, al ; out 0xe9, al ; hlt
    mem.write_slice(&[0xe6, 0x80, 0xe6, 0xe9, 0xf4], GuestAddress(0x8000))
        .unwrap();
    let b = EmuBackend::default();
    b.map_memory(&mem).unwrap();
    let mut v = b.create_vcpu(0).unwrap();
    v.set_state(&CpuState::real_mode_at(0x8000)).unwrap();
    let log: Log = Arc::default();
    let ext = |name: &'static str, handles: Option<u16>| -> (String, Arc<dyn Extension>) {
        (
            name.to_string(),
            Arc::new(Ext {
                name,
                log: log.clone(),
                handles,
            }),
        )
    };
    // B handles writes to 0xe9: C never sees them.
    let exts = Extensions {
        list: vec![ext("A", None), ext("B", Some(0xe9)), ext("C", None)],
    };
    let mut hooks = exts.hooks(0);
    let vm = VmHandle::new(1);
    let mut handled = Vec::new();
    loop {
        let mut ctx = CoreCtx {
            cpu: 0,
            vcpu: v.as_mut(),
            mem: &mem,
            vm: &vm,
        };
        for h in hooks.iter_mut() {
            h.on_entry(&mut ctx);
        }
        let exit = v.run().unwrap();
        if exit == Exit::Interrupted {
            continue;
        }
        let mut ctx = CoreCtx {
            cpu: 0,
            vcpu: v.as_mut(),
            mem: &mem,
            vm: &vm,
        };
        handled.push(run_exit_hooks(&mut hooks, &mut ctx, &exit));
        if exit == Exit::Hlt {
            break;
        }
    }
    assert_eq!(handled, [false, true, false]);
    let log = log.lock().unwrap().clone();
    let names: Vec<&str> = log.iter().map(|l| &l[..l.find(' ').unwrap() + 2]).collect();
    assert_eq!(
        names,
        [
            "A e", "B e", "C e", "A e", "B e", "C e", // out 0x80: every hook, in order
            "A e", "B e", "C e", "A e", "B e", // out 0xe9: B handles it, C is skipped
            "A e", "B e", "C e", "A e", "B e", "C e", // hlt
        ],
        "{log:#?}"
    );
    // The hooks see the core's state at the exit (RIP past each `out`).
    assert!(
        log[3].contains("IoOut { port: 128") && log[3].ends_with("rip 0x8002"),
        "{}",
        log[3]
    );
}
