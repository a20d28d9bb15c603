//! `inspector`: serve a tree of the VM's state (cores, devices, extensions) through the control
//! API (`GET /vm/inspect`, `v3 inspect NAME`). The extension marks the VM as inspectable; the
//! API builds the tree from the VM's parts.

use std::sync::Arc;

use palacios_vmm::config::ExtensionConfig;
use palacios_vmm::extension::{Extension, ExtensionClass};
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption};

pub struct InspectorClass;

/// Present (as a control of the VM) when the inspector is enabled.
pub struct Inspector {
    /// Include guest-visible register values of every core.
    pub cores: bool,
}

impl Extension for Inspector {
    fn inspect(&self) -> serde_json::Value {
        serde_json::json!({ "cores": self.cores })
    }
}

impl ExtensionClass for InspectorClass {
    fn name(&self) -> &'static str {
        "inspector"
    }
    fn help(&self) -> &'static str {
        "a tree of VM, core, device and extension state, read through the control API (GET /vm/inspect)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[DeviceOption {
            name: "cores",
            help: "include each core's registers: on (default) or off",
        }]
    }
    fn create(
        &self,
        ctx: &mut BuildCtx,
        cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError> {
        let cores = match cfg.node.val("cores")? {
            None | Some("on") => true,
            Some("off") => false,
            Some(o) => {
                return Err(cfg
                    .node
                    .val_err("cores", format!("'cores' must be on or off, not '{o}'")));
            }
        };
        let i = Arc::new(Inspector { cores });
        ctx.vm.add_control(&i);
        Ok(i)
    }
}
