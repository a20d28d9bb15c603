//! `OS_DEBUG`: Palacios' guest debug port: characters on 0xc0c0 are logged a line at a time,
//! 32-bit heartbeat values on 0x99 are logged and counted.

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::hypercall;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::linebuf::LineBuf;

pub const OUTPUT_PORT: u16 = 0xc0c0;
pub const HEARTBEAT_PORT: u16 = 0x99;
/// Messages through the OS_DEBUG hypercall are shorter than this.
pub const MAX_HCALL_MSG: u64 = 256;

pub struct OsDebugClass;

impl DeviceClass for OsDebugClass {
    fn name(&self) -> &'static str {
        "OS_DEBUG"
    }
    fn help(&self) -> &'static str {
        "guest debug output on port 0xc0c0 and through hypercall 0xc0c0 (logged per line), heartbeat values on port 0x99"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let d = Arc::new(Mutex::new(OsDebug::default()));
        // The state is the partial output line and the heartbeat count: restored, the guest's
        // next output completes the line as if the VM had not stopped.
        let (d1, d2) = (d.clone(), d.clone());
        ctx.register_state(state_fn(
            1,
            move || {
                let d = lock(&d1);
                OsDebugState {
                    line: d.line.clone(),
                    heartbeats: d.heartbeats,
                }
            },
            move |st: OsDebugState| {
                st.line.check().map_err(|e| format!("os_debug: {e}"))?;
                let mut d = lock(&d2);
                d.line = st.line;
                d.heartbeats = st.heartbeats;
                Ok(())
            },
        ));
        ctx.add_ports(OUTPUT_PORT, 1, &dev.id, d.clone())
            .map_err(|e| dev.node.err(e.msg))?;
        // Palacios' OS_DEBUG hypercall: RBX = message, RCX = length, RDX = 1 if RBX is virtual.
        let d3 = d.clone();
        ctx.add_hypercall(hypercall::id::OS_DEBUG, move |c| {
            let (addr, len, virt) = (c.arg(0), c.arg(1), c.arg(2) == 1);
            match c.read_guest(addr, len, MAX_HCALL_MSG - 1, virt) {
                Ok(msg) => {
                    lock(&d3).hypercalls += 1;
                    let text = String::from_utf8_lossy(&msg);
                    tracing::info!(target: "guest", "os_debug: {}", text.trim_end());
                    c.ret(0);
                }
                Err(e) => c.ret(e),
            }
        })
        .map_err(|e| dev.node.err(e.msg))?;
        ctx.add_ports(HEARTBEAT_PORT, 4, &dev.id, d)
            .map_err(|e| dev.node.err(e.msg))
    }
}

fn lock(d: &Mutex<OsDebug>) -> std::sync::MutexGuard<'_, OsDebug> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// The checkpoint state: the partial output line and the heartbeat count.
#[derive(serde::Serialize, serde::Deserialize)]
struct OsDebugState {
    line: LineBuf,
    heartbeats: u64,
}

#[derive(Default)]
pub struct OsDebug {
    line: LineBuf,
    pub heartbeats: u64,
    /// Messages received through the OS_DEBUG hypercall.
    pub hypercalls: u64,
}

impl BusDevice for OsDebug {
    fn read(&mut self, _addr: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        if addr == u64::from(OUTPUT_PORT) {
            for &b in data.iter().take(1) {
                if let Some(l) = self.line.push(b) {
                    tracing::info!(target: "guest", "os_debug: {l}");
                }
            }
        } else {
            self.heartbeats += 1;
            tracing::info!(target: "guest", "os_debug: heartbeat {:#x}", super::le_value(data));
        }
    }
}

impl Drop for OsDebug {
    fn drop(&mut self) {
        if let Some(l) = self.line.flush() {
            tracing::info!(target: "guest", "os_debug: {l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_counted() {
        let mut d = OsDebug::default();
        d.write(0x99, &[1, 0, 0, 0]);
        d.write(0xc0c0, b"a");
        d.write(0x99, &[2, 0, 0, 0]);
        assert_eq!(d.heartbeats, 2);
        assert_eq!(d.line.flush().as_deref(), Some("a"));
    }
}
