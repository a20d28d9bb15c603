//! `BOCHS_DEBUG`: the Bochs/QEMU debug console on port 0xe9 and Bochs' info/debug ports
//! 0x400–0x403. Output is logged a line at a time.

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::linebuf::LineBuf;

pub struct BochsDebugClass;

impl DeviceClass for BochsDebugClass {
    fn name(&self) -> &'static str {
        "BOCHS_DEBUG"
    }
    fn help(&self) -> &'static str {
        "Bochs debug ports: 0xe9 console, 0x400/0x401 panic messages, 0x402 info, 0x403 debug (logged per line)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let d = Arc::new(Mutex::new(BochsDebug::default()));
        // The state is the partial line of each port: restored, the guest's next output
        // completes it as if the VM had not stopped.
        let (d1, d2) = (d.clone(), d.clone());
        ctx.register_state(state_fn(
            1,
            move || {
                let d = lock(&d1);
                BochsDebugState {
                    console: d.console.clone(),
                    info: d.info.clone(),
                    debug: d.debug.clone(),
                    panic: d.panic.clone(),
                }
            },
            move |st: BochsDebugState| {
                for b in [&st.console, &st.info, &st.debug, &st.panic] {
                    b.check().map_err(|e| format!("bochs debug: {e}"))?;
                }
                let mut d = lock(&d2);
                d.console = st.console;
                d.info = st.info;
                d.debug = st.debug;
                d.panic = st.panic;
                Ok(())
            },
        ));
        ctx.add_ports(0xe9, 1, &dev.id, d.clone())
            .map_err(|e| dev.node.err(e.msg))?;
        ctx.add_ports(0x400, 4, &dev.id, d)
            .map_err(|e| dev.node.err(e.msg))
    }
}

fn lock(d: &Mutex<BochsDebug>) -> std::sync::MutexGuard<'_, BochsDebug> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// The checkpoint state: the partial line of each port.
#[derive(serde::Serialize, serde::Deserialize)]
struct BochsDebugState {
    console: LineBuf,
    info: LineBuf,
    debug: LineBuf,
    panic: LineBuf,
}

#[derive(Default)]
pub struct BochsDebug {
    console: LineBuf,
    info: LineBuf,
    debug: LineBuf,
    panic: LineBuf,
}

impl BochsDebug {
    fn channel(&mut self, port: u64) -> (&'static str, &mut LineBuf) {
        match port {
            0xe9 => ("console", &mut self.console),
            0x402 => ("info", &mut self.info),
            0x403 => ("debug", &mut self.debug),
            _ => ("panic", &mut self.panic),
        }
    }
}

impl BusDevice for BochsDebug {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        // Port 0xe9 reads back 0xe9 so that guests can detect the console.
        data.fill(if addr == 0xe9 { 0xe9 } else { 0 });
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        let (name, buf) = self.channel(addr);
        for &b in data.iter().take(if addr == 0xe9 { 1 } else { data.len() }) {
            if let Some(line) = buf.push(b) {
                tracing::info!(target: "guest", "bochs {name}: {line}");
            }
        }
    }
}

impl Drop for BochsDebug {
    fn drop(&mut self) {
        for port in [0xe9, 0x402, 0x403, 0x400] {
            let (name, buf) = self.channel(port);
            if let Some(line) = buf.flush() {
                tracing::info!(target: "guest", "bochs {name}: {line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_reads_back_e9_and_buffers_lines() {
        let mut d = BochsDebug::default();
        let mut b = [0u8];
        d.read(0xe9, &mut b);
        assert_eq!(b, [0xe9]);
        for &c in b"hi" {
            d.write(0xe9, &[c]);
        }
        d.write(0x402, b"x");
        assert_eq!(d.console.flush().as_deref(), Some("hi"));
        assert_eq!(d.info.flush().as_deref(), Some("x"));
    }
}
