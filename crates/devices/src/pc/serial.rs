//! `SERIAL`: four 16550A UARTs, COM1–COM4 (0x3f8/IRQ4, 0x2f8/IRQ3, 0x3e8/IRQ4, 0x2e8/IRQ3),
//! modelled by vm-superio. Each COM port is a character frontend; COM1 is connected to the
//! `v3` console unless a `CHAR_STREAM` connects it elsewhere (option `console`).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::IrqLine;
use palacios_vmm::registry::{CharFrontend, CharInput};
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, ConfigNode, DeviceClass, DeviceOption};
use vm_superio::{Serial, Trigger};

/// (base port, ISA IRQ) of COM1–COM4.
pub const COM_PORTS: [(u16, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];

pub struct SerialClass;

const OPTIONS: &[DeviceOption] = &[DeviceOption {
    name: "console",
    help: "COM port (1-4) connected to the v3 console when no CHAR_STREAM connects it, or 'none' (default 1)",
}];

impl DeviceClass for SerialClass {
    fn name(&self) -> &'static str {
        "SERIAL"
    }
    fn help(&self) -> &'static str {
        "16550A UARTs COM1-COM4; a character frontend (CHAR_STREAM connects them to host streams)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        OPTIONS
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let n = &dev.node;
        let console = match n.val("console")? {
            None => Some(1),
            Some("none") => None,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(c @ 1..=4) => Some(c),
                _ => {
                    return Err(n.val_err(
                        "console",
                        format!("console must be a COM port 1-4 or 'none', not '{v}'"),
                    ));
                }
            },
        };
        let mut ports = Vec::new();
        for (i, &(base, irq)) in COM_PORTS.iter().enumerate() {
            let sink = Sink::default();
            let uart = Serial::new(IrqTrigger(ctx.irq_line(irq)), sink.clone());
            let com = Arc::new(Mutex::new(ComPort { base, uart }));
            ctx.add_ports(base, 8, &format!("{}.com{}", dev.id, i + 1), com.clone())
                .map_err(|e| n.err(e.msg))?;
            ports.push((com, sink));
        }
        let frontend = Arc::new(SerialFrontend {
            id: dev.id.clone(),
            ports: ports.clone(),
        });
        ctx.char_frontends.insert(dev.id.clone(), frontend);
        let id = dev.id.clone();
        ctx.on_finish(move |ctx| {
            let Some(c) = console else { return Ok(()) };
            if ports[c - 1].1.is_connected() {
                return Ok(());
            }
            let stream = ctx
                .host
                .console()
                .map_err(|e| ConfigError::new(None, format!("cannot open the console: {e}")))?;
            let cfg = ConfigNode::new("frontend")
                .with_attr("tag", id.clone())
                .with_attr("com_port", c.to_string());
            ctx.connect_char(&id, &cfg, stream)
        });
        Ok(())
    }
}

type Uart = Serial<IrqTrigger, vm_superio::serial::NoEvents, Sink>;

/// One COM port on the port bus.
pub struct ComPort {
    base: u16,
    uart: Uart,
}

impl BusDevice for ComPort {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let off = addr + i as u64 - u64::from(self.base);
            *d = if off < 8 {
                self.uart.read(off as u8)
            } else {
                0xff
            };
        }
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        for (i, &d) in data.iter().enumerate() {
            let off = addr + i as u64 - u64::from(self.base);
            if off < 8 {
                if let Err(e) = self.uart.write(off as u8, d) {
                    tracing::debug!("serial {:#x}: output lost: {e:?}", self.base);
                }
            }
        }
    }
}

/// The UART's output: discarded until a backend is connected.
#[derive(Clone, Default)]
pub struct Sink(Arc<Mutex<Option<Box<dyn Write + Send>>>>);

impl Sink {
    fn is_connected(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(w) => w.write(buf),
            None => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

/// Edge on the COM port's IRQ line.
pub struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.pulse();
        Ok(())
    }
}

struct SerialFrontend {
    id: String,
    ports: Vec<(Arc<Mutex<ComPort>>, Sink)>,
}

impl CharFrontend for SerialFrontend {
    fn connect(
        &self,
        cfg: &ConfigNode,
        output: Box<dyn Write + Send>,
    ) -> Result<Arc<dyn CharInput>, ConfigError> {
        cfg.check_options("<frontend> of SERIAL", &["tag", "com_port"])?;
        let com = cfg.num("com_port")?.unwrap_or(1);
        let (port, sink) = usize::try_from(com)
            .ok()
            .and_then(|c| c.checked_sub(1))
            .and_then(|i| self.ports.get(i))
            .ok_or_else(|| cfg.val_err("com_port", format!("com_port must be 1-4, not {com}")))?;
        let mut slot = sink.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(cfg.err(format!("COM{com} of '{}' is already connected", self.id)));
        }
        *slot = Some(output);
        Ok(Arc::new(ComInput(port.clone())))
    }
}

struct ComInput(Arc<Mutex<ComPort>>);

impl CharInput for ComInput {
    fn push(&self, bytes: &[u8]) -> usize {
        let mut p = self.0.lock().unwrap_or_else(|p| p.into_inner());
        p.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palacios_vmm::irq::UnconnectedLine;

    fn port() -> (ComPort, Arc<UnconnectedLine>, Arc<Mutex<Vec<u8>>>) {
        let line = Arc::new(UnconnectedLine::default());
        let out = Arc::new(Mutex::new(Vec::new()));
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        *sink.0.lock().unwrap() = Some(Box::new(W(out.clone())));
        (
            ComPort {
                base: 0x3f8,
                uart: Serial::new(IrqTrigger(line.clone()), sink),
            },
            line,
            out,
        )
    }

    #[test]
    fn transmit_receive_and_interrupts() {
        let (mut p, line, out) = port();
        let mut b = [0u8];
        p.read(0x3fd, &mut b);
        assert_eq!(b[0] & 0x60, 0x60, "THR empty and transmitter idle");
        p.write(0x3f9, &[0x03]); // IER: RX and THRE interrupts
        let before = line.raised.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            before > 0,
            "enabling THRE with an empty THR interrupts at once"
        );
        p.read(0x3fa, &mut b); // IIR read acknowledges THRE
        assert_eq!(b[0] & 0x0f, 0x02, "IIR says THR empty");
        p.write(0x3f8, b"A");
        assert_eq!(out.lock().unwrap().as_slice(), b"A");
        assert!(
            line.raised.load(std::sync::atomic::Ordering::Relaxed) > before,
            "THRE interrupt raised"
        );
        assert_eq!(p.uart.enqueue_raw_bytes(b"xy").unwrap(), 2);
        p.read(0x3fd, &mut b);
        assert_eq!(b[0] & 1, 1, "data ready");
        p.read(0x3f8, &mut b);
        assert_eq!(b[0], b'x');
        // DLAB: divisor latch instead of data.
        p.write(0x3fb, &[0x80]);
        p.write(0x3f8, &[0x0c]);
        p.read(0x3f8, &mut b);
        assert_eq!(b[0], 0x0c);
        assert_eq!(
            out.lock().unwrap().as_slice(),
            b"A",
            "divisor writes are not output"
        );
    }
}
