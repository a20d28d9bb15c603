//! The `concord` extension: `<extension name="concord" directory=".." entity=".." host=".."
//! interval_ms=".."/>` starts the VM's update monitor.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use palacios_vmm::config::ExtensionConfig;
use palacios_vmm::extension::{Extension, ExtensionClass};
use palacios_vmm::registry::Worker;
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption};

use crate::monitor::{Monitor, MonitorConfig};
use crate::spec::DirSpec;

pub struct ConcordClass;

struct Concord(Arc<Monitor>);

impl Extension for Concord {
    fn inspect(&self) -> serde_json::Value {
        self.0.status()
    }
}

/// The host name entities are grouped by when the config names none.
pub fn default_host() -> String {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most b.len() bytes into a buffer we own.
    let r = unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

impl ExtensionClass for ConcordClass {
    fn name(&self) -> &'static str {
        "concord"
    }
    fn help(&self) -> &'static str {
        "ConCORD memory-content tracking: hashes guest pages as they change and publishes them to a content directory (docs/concord.md)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[
            DeviceOption {
                name: "directory",
                help: "embedded (default: this host's directory, served by the first VM), unix:PATH, or redis://HOST:PORT[,HOST:PORT..] (Redis Cluster)",
            },
            DeviceOption {
                name: "entity",
                help: "this VM's name in the directory (default: the VM's --name, else vm-PID)",
            },
            DeviceOption {
                name: "host",
                help: "the host this VM counts as on (default: the host name)",
            },
            DeviceOption {
                name: "interval_ms",
                help: "time between tracking rounds (default 100)",
            },
            DeviceOption {
                name: "api",
                help: "the VM's control-API socket, published for collective commands (set by v3)",
            },
            DeviceOption {
                name: "session_name",
                help: "the VM's --name (set by v3; the entity name when none is given)",
            },
        ]
    }
    fn create(
        &self,
        ctx: &mut BuildCtx,
        cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError> {
        let n = &cfg.node;
        let directory = DirSpec::parse(n.val("directory")?.unwrap_or("embedded"))
            .map_err(|e| n.val_err("directory", e))?;
        let entity = n
            .val("entity")?
            .or(n.val("session_name")?)
            .map(str::to_string)
            .unwrap_or_else(|| format!("vm-{}", std::process::id()));
        if !palacios_checkpoint::shared::valid_writer(&entity) {
            return Err(n.val_err(
                "entity",
                format!("'{entity}' is not a usable entity name (letters, digits, - _ .)"),
            ));
        }
        let host = n
            .val("host")?
            .map(str::to_string)
            .unwrap_or_else(default_host);
        let interval = n.num("interval_ms")?.unwrap_or(100);
        if !(1..=60_000).contains(&interval) {
            return Err(n.val_err("interval_ms", "interval_ms must be 1 to 60000"));
        }
        let m = Monitor::new(MonitorConfig {
            directory,
            entity,
            host,
            api: n.val("api")?.unwrap_or("").to_string(),
            interval: Duration::from_millis(interval),
        });
        ctx.vm.add_control(&m);
        if ctx.host.is_dry_run() {
            return Ok(Arc::new(Concord(m)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (m2, s2, h) = (m.clone(), stop.clone(), ctx.vm.clone());
        let thread = ctx
            .host
            .spawn("concord", Box::new(move || m2.run(h, &s2)))
            .map_err(|e| n.err(format!("cannot start the ConCORD monitor thread: {e}")))?;
        ctx.workers.push(Worker {
            name: "concord".into(),
            stop,
            thread,
        });
        Ok(Arc::new(Concord(m)))
    }
}
