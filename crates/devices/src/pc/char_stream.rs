//! `CHAR_STREAM`: connects a character frontend (a COM port of `SERIAL`) to a host stream.
//!
//! ```xml
//! <device class="CHAR_STREAM" id="com2-log">
//!   <name>file:com2.log</name>          <!-- or unix:/path/to/socket, console, null -->
//!   <frontend tag="serial"><com_port>2</com_port></frontend>
//! </device>
//! ```

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::{BuildCtx, ConfigError, DeviceClass, DeviceOption};

pub struct CharStreamClass;

const OPTIONS: &[DeviceOption] = &[
    DeviceOption {
        name: "name",
        help: "host stream: file:PATH (append), unix:PATH (socket, both ways), console, null",
    },
    DeviceOption {
        name: "frontend",
        help: "<frontend tag=\"DEVICE-ID\"> with the frontend's own options (SERIAL: com_port)",
    },
];

impl DeviceClass for CharStreamClass {
    fn name(&self) -> &'static str {
        "CHAR_STREAM"
    }
    fn help(&self) -> &'static str {
        "connects a character frontend (a COM port) to a host stream (file, Unix socket, console)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        OPTIONS
    }
    // Only host-side plumbing: the COM port it connects (the SERIAL frontend) holds every
    // guest-visible byte and register, and the host stream is reopened from the config.
    fn stateless(&self) -> bool {
        true
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let n = &dev.node;
        let name = n.req("name")?;
        let mut fes = n.children_named("frontend");
        let fe = fes
            .next()
            .ok_or_else(|| n.err("CHAR_STREAM needs a <frontend tag=\"...\">"))?;
        if let Some(extra) = fes.next() {
            return Err(extra.err("CHAR_STREAM connects exactly one frontend"));
        }
        let tag = fe.req("tag")?;
        // A relative path is relative to the config file, like every other path.
        let spec = match name.split_once(':') {
            Some((kind @ ("file" | "unix"), p)) if !std::path::Path::new(p).is_absolute() => {
                match &ctx.base_dir {
                    Some(d) => format!("{kind}:{}", d.join(p).display()),
                    None => name.to_string(),
                }
            }
            _ => name.to_string(),
        };
        let stream = ctx
            .host
            .open_stream(&spec)
            .map_err(|e| n.val_err("name", format!("cannot open stream '{spec}': {e}")))?;
        ctx.connect_char(tag, fe, stream)
    }
}
