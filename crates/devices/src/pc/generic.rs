//! `GENERIC`: claims port ranges nobody models yet, in Palacios' modes. `PRINT_AND_IGNORE` logs
//! each access; `IGNORE` is silent. Reads return 0. The passthrough modes need host port access,
//! which a user-space VMM does not have, and are refused.

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

pub struct GenericClass;

const OPTIONS: &[DeviceOption] = &[DeviceOption {
    name: "ports",
    help: "<ports start=\"0x..\" end=\"0x..\" mode=\"PRINT_AND_IGNORE|IGNORE\"/> (repeatable; end inclusive)",
}];

impl DeviceClass for GenericClass {
    fn name(&self) -> &'static str {
        "GENERIC"
    }
    fn help(&self) -> &'static str {
        "claims port ranges: PRINT_AND_IGNORE logs accesses, IGNORE drops them; reads return 0"
    }
    fn options(&self) -> &'static [DeviceOption] {
        OPTIONS
    }
    // Reads return 0 and writes are dropped: nothing but the config's port ranges.
    fn stateless(&self) -> bool {
        true
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let mut ranges = Vec::new();
        for p in dev.node.children_named("ports") {
            p.check_options("<ports> of GENERIC", &["start", "end", "mode"])?;
            let start = p
                .num("start")?
                .ok_or_else(|| p.err("<ports> needs 'start'"))?;
            let end = p.num("end")?.ok_or_else(|| p.err("<ports> needs 'end'"))?;
            if start > end || end > 0xffff {
                return Err(p.err(format!(
                    "bad port range {start:#x}-{end:#x} (start <= end <= 0xffff)"
                )));
            }
            let mode = p.val("mode")?.unwrap_or("PRINT_AND_IGNORE");
            let print = match mode {
                "PRINT_AND_IGNORE" => true,
                "IGNORE" => false,
                "PASSTHROUGH" | "PRINT_AND_PASSTHROUGH" => {
                    return Err(p.val_err(
                        "mode",
                        format!("GENERIC mode {mode} needs host port access, which a user-space VMM does not have; use PRINT_AND_IGNORE or IGNORE"),
                    ));
                }
                other => {
                    return Err(p.val_err(
                        "mode",
                        format!("unknown GENERIC mode '{other}' (known: PRINT_AND_IGNORE, IGNORE)"),
                    ));
                }
            };
            ranges.push((start as u16, end as u16, print));
        }
        if ranges.is_empty() {
            return Err(dev
                .node
                .err("GENERIC needs at least one <ports start end mode/>"));
        }
        let d = Arc::new(Mutex::new(Generic {
            id: dev.id.clone(),
            ranges: ranges.clone(),
        }));
        for (start, end, _) in ranges {
            ctx.add_ports(start, end - start + 1, &dev.id, d.clone())
                .map_err(|e| dev.node.err(e.msg))?;
        }
        Ok(())
    }
}

pub struct Generic {
    id: String,
    ranges: Vec<(u16, u16, bool)>,
}

impl Generic {
    fn prints(&self, port: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(s, e, p)| p && (u64::from(s)..=u64::from(e)).contains(&port))
    }
}

impl BusDevice for Generic {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        if self.prints(addr) {
            tracing::info!(target: "guest", "{}: read {} byte(s) from port {addr:#x} (ignored, returns 0)", self.id, data.len());
        }
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        if self.prints(addr) {
            tracing::info!(target: "guest", "{}: write {:#x} ({} byte(s)) to port {addr:#x} (ignored)", self.id, super::le_value(data), data.len());
        }
    }
}
