//! `SERIAL`: four 16550A UARTs, COM1–COM4 (0x3f8/IRQ4, 0x2f8/IRQ3, 0x3e8/IRQ4, 0x2e8/IRQ3),
//! modelled by vm-superio. Each COM port is a character frontend; COM1 is connected to the
//! `v3` console unless a `CHAR_STREAM` connects it elsewhere (option `console`).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::IrqLine;
use palacios_vmm::registry::{CharFrontend, CharInput};
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, ConfigNode, DeviceClass, DeviceOption};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
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
            let uart = Serial::new(IrqTrigger::new(ctx.irq_line(irq)), sink.clone());
            let com = Arc::new(Mutex::new(ComPort {
                base,
                uart,
                sink: sink.clone(),
            }));
            ctx.add_ports(base, 8, &format!("{}.com{}", dev.id, i + 1), com.clone())
                .map_err(|e| n.err(e.msg))?;
            ports.push((com, sink));
        }
        let frontend = Arc::new(SerialFrontend {
            id: dev.id.clone(),
            ports: ports.clone(),
        });
        ctx.char_frontends.insert(dev.id.clone(), frontend);
        let coms: Vec<Arc<Mutex<ComPort>>> = ports.iter().map(|(c, _)| c.clone()).collect();
        let coms2 = coms.clone();
        ctx.register_state(state_fn(
            1,
            move || {
                coms.iter()
                    .map(|c| UartState::from(&lock(c).uart.state()))
                    .collect::<Vec<_>>()
            },
            move |st: Vec<UartState>| restore_ports(&coms2, st),
        ));
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

type Uart = Serial<IrqTrigger, NoEvents, Sink>;

/// Size of vm-superio's receive FIFO.
const FIFO_SIZE: usize = 64;

/// One COM port on the port bus.
pub struct ComPort {
    base: u16,
    uart: Uart,
    /// Where the UART writes (shared with the frontend that connects it).
    sink: Sink,
}

fn lock(c: &Mutex<ComPort>) -> std::sync::MutexGuard<'_, ComPort> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// The checkpoint state of one UART: vm-superio's [`SerialState`] (every register, and the
/// received bytes the guest has not read yet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub divisor_low: u8,
    pub divisor_high: u8,
    pub ier: u8,
    pub iir: u8,
    pub lcr: u8,
    pub lsr: u8,
    pub mcr: u8,
    pub msr: u8,
    pub scratch: u8,
    #[serde(with = "super::serde_util::hex")]
    pub rx_fifo: Vec<u8>,
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer.clone(),
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        SerialState {
            baud_divisor_low: s.divisor_low,
            baud_divisor_high: s.divisor_high,
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scratch,
            in_buffer: s.rx_fifo.clone(),
        }
    }
}

/// Replace the UARTs' state. Nothing is signalled: an interrupt the saved UART had raised is
/// in the interrupt controllers' restored state.
fn restore_ports(coms: &[Arc<Mutex<ComPort>>], st: Vec<UartState>) -> Result<(), String> {
    if st.len() != coms.len() {
        return Err(format!(
            "{} UARTs saved, the device has {}",
            st.len(),
            coms.len()
        ));
    }
    let mut uarts = Vec::with_capacity(coms.len());
    for (i, (c, s)) in coms.iter().zip(&st).enumerate() {
        if s.rx_fifo.len() > FIFO_SIZE {
            return Err(format!(
                "COM{}: {} received bytes, the FIFO holds {FIFO_SIZE}",
                i + 1,
                s.rx_fifo.len()
            ));
        }
        // vm-superio raises the interrupt of a restored pending condition; keep that quiet.
        let trigger = IrqTrigger::new(lock(c).uart.interrupt_evt().line.clone());
        trigger.muted.store(true, Ordering::Relaxed);
        let sink = lock(c).sink.clone();
        let uart = Serial::from_state(&SerialState::from(s), trigger, NoEvents, sink)
            .map_err(|e| format!("COM{}: {e}", i + 1))?;
        uart.interrupt_evt().muted.store(false, Ordering::Relaxed);
        uarts.push(uart);
    }
    for (c, uart) in coms.iter().zip(uarts) {
        lock(c).uart = uart;
    }
    Ok(())
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

/// Edge on the COM port's IRQ line (none while muted).
pub struct IrqTrigger {
    line: Arc<dyn IrqLine>,
    muted: AtomicBool,
}

impl IrqTrigger {
    fn new(line: Arc<dyn IrqLine>) -> Self {
        IrqTrigger {
            line,
            muted: AtomicBool::new(false),
        }
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        if !self.muted.load(Ordering::Relaxed) {
            self.line.pulse();
        }
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
        lock(&self.0).uart.enqueue_raw_bytes(bytes).unwrap_or(0)
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
                uart: Serial::new(IrqTrigger::new(line.clone()), sink.clone()),
                sink,
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

    #[test]
    fn restore_keeps_registers_and_fifo_and_raises_nothing() {
        let (mut p, _, _) = port();
        p.write(0x3f9, &[0x01]); // RX interrupt
        p.write(0x3ff, &[0x5a]);
        assert_eq!(p.uart.enqueue_raw_bytes(b"ok").unwrap(), 2);
        let saved = UartState::from(&p.uart.state());
        let (q, line, out) = port();
        let q = Arc::new(Mutex::new(q));
        let raised = || line.raised.load(std::sync::atomic::Ordering::Relaxed);
        let before = raised();
        restore_ports(std::slice::from_ref(&q), vec![saved.clone()]).unwrap();
        assert_eq!(raised(), before, "a restore signals nothing");
        let mut q = q.lock().unwrap();
        assert_eq!(UartState::from(&q.uart.state()), saved);
        let mut b = [0u8];
        for (off, want) in [(0x3ff, 0x5a), (0x3f9, 0x01), (0x3f8, b'o'), (0x3f8, b'k')] {
            q.read(off, &mut b);
            assert_eq!(b[0], want, "register {off:#x}");
        }
        // The restored UART still interrupts and writes to its sink.
        q.write(0x3f9, &[0x03]);
        assert!(raised() > before);
        q.write(0x3f8, b"Z");
        assert_eq!(out.lock().unwrap().as_slice(), b"Z");
        drop(q);
        let mut bad = saved;
        bad.rx_fifo = vec![0; 65];
        let q = Arc::new(Mutex::new(port().0));
        assert!(restore_ports(std::slice::from_ref(&q), vec![bad]).is_err());
    }
}
