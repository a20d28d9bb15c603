//! Extensions: plug-ins registered by name (Palacios' `<extensions><extension name=..>`).
//!
//! An extension class creates one [`Extension`] per VM from its `<extension>` subtree, with
//! the same [`BuildCtx`] devices get (ports, MMIO, MSRs, CPUID leaves, hypercalls, guest
//! memory, checkpoint state). The extension is its per-VM state; [`Extension::core`] gives
//! each core its own [`CoreHooks`] (per-core state, owned by that core's thread), whose
//! `on_entry`/`on_exit` run in the one exit loop every backend shares.

use std::sync::Arc;

use crate::backend::{Exit, Vcpu};
use crate::config::{ConfigError, ExtensionConfig};
use crate::control::VmHandle;
use crate::memory::GuestMem;
use crate::registry::{BuildCtx, DeviceOption};

/// What a core's hooks see: the core, guest memory and the VM.
pub struct CoreCtx<'a> {
    pub cpu: u32,
    pub vcpu: &'a mut dyn Vcpu,
    pub mem: &'a GuestMem,
    pub vm: &'a VmHandle,
}

/// What the exit loop does after an `on_exit` hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Handle the exit as usual (and run the next extension's hook).
    Continue,
    /// The hook handled the exit (answered the read, for example): the core skips its own
    /// handling and the later hooks.
    Handled,
}

/// One core's part of an extension: hooks and per-core state.
pub trait CoreHooks: Send {
    /// Before every entry into the guest.
    fn on_entry(&mut self, _core: &mut CoreCtx) {}
    /// After every exit, before the core handles it.
    fn on_exit(&mut self, _core: &mut CoreCtx, _exit: &Exit) -> ExitAction {
        ExitAction::Continue
    }
}

/// An extension instance (its per-VM state).
pub trait Extension: Send + Sync {
    /// The hooks of core `cpu`, if the extension hooks the exit loop.
    fn core(&self, _cpu: u32) -> Option<Box<dyn CoreHooks>> {
        None
    }
    /// What the extension shows in the inspector tree.
    fn inspect(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// A kind of extension, created by name from the config.
pub trait ExtensionClass: Send + Sync {
    /// The Palacios name, for example `MTRRS`.
    fn name(&self) -> &'static str;
    fn help(&self) -> &'static str;
    /// Attributes and child elements of `<extension>` besides `name`.
    fn options(&self) -> &'static [DeviceOption];
    fn create(
        &self,
        ctx: &mut BuildCtx,
        cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError>;
}

/// The extensions of a built VM, in config order.
#[derive(Clone, Default)]
pub struct Extensions {
    pub list: Vec<(String, Arc<dyn Extension>)>,
}

impl Extensions {
    /// Every extension's hooks for core `cpu`, in config order.
    pub fn hooks(&self, cpu: u32) -> Vec<Box<dyn CoreHooks>> {
        self.list.iter().filter_map(|(_, e)| e.core(cpu)).collect()
    }

    /// name → inspector value.
    pub fn inspect(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.list
                .iter()
                .map(|(n, e)| (n.clone(), e.inspect()))
                .collect(),
        )
    }
}

/// Run the `on_exit` hooks in order; `Handled` stops at the hook that handled it.
pub fn run_exit_hooks(hooks: &mut [Box<dyn CoreHooks>], core: &mut CoreCtx, exit: &Exit) -> bool {
    for h in hooks.iter_mut() {
        if h.on_exit(core, exit) == ExitAction::Handled {
            return true;
        }
    }
    false
}
