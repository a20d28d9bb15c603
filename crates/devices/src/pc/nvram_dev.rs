//! `NVRAM`: the MC146818 CMOS/RTC at 0x70/0x71 on IRQ8, its clock from the host (or a start time
//! given in the config), memory-size fields from the VM's RAM.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::irq::IrqLine;
use palacios_vmm::state::state_fn;
use palacios_vmm::time::GuestClock;
use palacios_vmm::timer::Timer;
use palacios_vmm::{BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption};

use super::chips::rtc::Rtc;

pub struct NvramClass;

const OPTIONS: &[DeviceOption] = &[DeviceOption {
    name: "start_time",
    help: "RTC time at boot: 'now' (default, the host clock) or Unix seconds (UTC)",
}];

impl DeviceClass for NvramClass {
    fn name(&self) -> &'static str {
        "NVRAM"
    }
    fn help(&self) -> &'static str {
        "CMOS/RTC (0x70-0x71, IRQ8): time, periodic/alarm/update interrupts, memory-size fields"
    }
    fn options(&self) -> &'static [DeviceOption] {
        OPTIONS
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let start = match dev.node.val("start_time")? {
            // Deterministic time starts the calendar at 2000-01-01 00:00:00 UTC, for every run.
            None if ctx.clock.is_virtual() => 946_684_800,
            None | Some("now") => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            Some(s) => s.trim().parse::<i64>().map_err(|_| {
                dev.node.val_err(
                    "start_time",
                    format!("start_time must be 'now' or Unix seconds, not '{s}'"),
                )
            })?,
        };
        let now = ctx.clock.now();
        let shared = Arc::new(RtcShared {
            rtc: Mutex::new(Rtc::new(start, ctx.map.ram_bytes(), now)),
            clock: ctx.clock.clone(),
            irq8: ctx.irq_line(8),
            timer: OnceLock::new(),
        });
        let w: Weak<RtcShared> = Arc::downgrade(&shared);
        let t = ctx.timers.timer(move |now| {
            if let Some(s) = w.upgrade() {
                s.rtc().tick(now);
                s.update(now);
            }
        });
        let _ = shared.timer.set(t);
        shared.update(now);
        let (s1, s2) = (shared.clone(), shared.clone());
        ctx.register_state(state_fn(
            1,
            move || s1.rtc().clone(),
            move |rtc: Rtc| {
                rtc.check()?;
                // The timer as it was armed: for the first enabled event after the last one
                // accounted, which may already be due (then it fires at once, as it would
                // have). IRQ8 is not driven: its level (IRQF) is restored with the interrupt
                // controllers and the IRQ router.
                let last = rtc.last_accounted();
                *s2.rtc() = rtc;
                s2.rearm(last);
                Ok(())
            },
        ));
        ctx.add_ports(0x70, 2, &dev.id, Arc::new(Mutex::new(RtcPorts(shared))))
            .map_err(|e| dev.node.err(e.msg))
    }
}

struct RtcShared {
    rtc: Mutex<Rtc>,
    clock: Arc<GuestClock>,
    irq8: Arc<dyn IrqLine>,
    timer: OnceLock<Timer>,
}

impl RtcShared {
    fn rtc(&self) -> std::sync::MutexGuard<'_, Rtc> {
        self.rtc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follow the IRQ8 level and re-arm for the next enabled event.
    fn update(&self, now: u64) {
        let level = self.rtc().irq_level();
        self.irq8.set_level(level);
        self.rearm(now);
    }

    /// Arm the timer for the first enabled event after `now`.
    fn rearm(&self, now: u64) {
        let next = self.rtc().next_event(now);
        if let Some(t) = self.timer.get() {
            match next {
                Some(at) => t.arm(at.max(now)),
                None => t.disarm(),
            }
        }
    }
}

struct RtcPorts(Arc<RtcShared>);

impl BusDevice for RtcPorts {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        let now = self.0.clock.now();
        let v = self.0.rtc().read(addr as u16, now);
        data.fill(0);
        data[0] = v;
        self.0.update(now);
    }
    fn write(&mut self, addr: u64, data: &[u8]) {
        let now = self.0.clock.now();
        self.0.rtc().write(addr as u16, data[0], now);
        self.0.update(now);
    }
}
