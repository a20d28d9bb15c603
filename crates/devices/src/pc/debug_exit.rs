//! `DEBUG_EXIT`: QEMU's isa-debug-exit. A guest write of `v` ends the VM; `v3` then exits with
//! status `(v << 1) | 1`.

use std::sync::{Arc, Mutex};

use palacios_vmm::config::DeviceConfig;
use palacios_vmm::{
    BuildCtx, BusDevice, ConfigError, DeviceClass, DeviceOption, Outcome, VmHandle,
};

pub struct DebugExitClass;

const OPTIONS: &[DeviceOption] = &[
    DeviceOption {
        name: "iobase",
        help: "first port (default 0xf4)",
    },
    DeviceOption {
        name: "iosize",
        help: "width of the port range in bytes: 1, 2 or 4 (default 4)",
    },
];

impl DeviceClass for DebugExitClass {
    fn name(&self) -> &'static str {
        "DEBUG_EXIT"
    }
    fn help(&self) -> &'static str {
        "QEMU-compatible isa-debug-exit: a write of v ends the VM with exit status (v<<1)|1"
    }
    fn options(&self) -> &'static [DeviceOption] {
        OPTIONS
    }
    // A write ends the VM at once; reads return 0xff. Nothing is kept between accesses.
    fn stateless(&self) -> bool {
        true
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let n = &dev.node;
        let base = n.num("iobase")?.unwrap_or(0xf4);
        let size = n.num("iosize")?.unwrap_or(4);
        if ![1, 2, 4].contains(&size) {
            return Err(n.val_err("iosize", format!("iosize must be 1, 2 or 4, not {size}")));
        }
        if base + size > 0x1_0000 {
            return Err(n.val_err(
                "iobase",
                format!("port range {base:#x}+{size} is beyond 0xffff"),
            ));
        }
        let d = Arc::new(Mutex::new(DebugExit { vm: ctx.vm.clone() }));
        ctx.add_ports(base as u16, size as u16, &dev.id, d)
            .map_err(|e| n.err(e.msg))
    }
}

pub struct DebugExit {
    vm: VmHandle,
}

impl BusDevice for DebugExit {
    fn read(&mut self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _addr: u64, data: &[u8]) {
        let v = super::le_value(data) as u32;
        tracing::debug!("debug-exit: guest wrote {v:#x}");
        self.vm.stop(Outcome::DebugExit(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> BuildCtx {
        let map = palacios_vmm::MemoryMap::pc(1 << 20);
        let mem = map.create_memory().unwrap();
        BuildCtx::new(
            std::sync::Arc::new(palacios_vmm::host::DryRunHost),
            mem,
            map,
            VmHandle::new(1),
            1,
        )
    }

    fn dev(attrs: &[(&str, &str)]) -> DeviceConfig {
        let mut node = palacios_vmm::ConfigNode::new("device").with_attr("class", "DEBUG_EXIT");
        for (k, v) in attrs {
            node = node.with_attr(k, *v);
        }
        DeviceConfig {
            class: "DEBUG_EXIT".into(),
            id: "exit".into(),
            node,
        }
    }

    #[test]
    fn port_and_width_are_configurable() {
        let mut c = ctx();
        DebugExitClass.create(&mut c, &dev(&[])).unwrap();
        assert_eq!(c.pio.ranges(), vec![(0xf4, 0xf7, "exit".to_string())]);
        let mut c = ctx();
        DebugExitClass
            .create(&mut c, &dev(&[("iobase", "0x501"), ("iosize", "2")]))
            .unwrap();
        assert_eq!(c.pio.ranges(), vec![(0x501, 0x502, "exit".to_string())]);
        let e = DebugExitClass
            .create(&mut ctx(), &dev(&[("iosize", "3")]))
            .unwrap_err();
        assert!(e.msg.contains("1, 2 or 4"));
        assert!(
            DebugExitClass
                .create(&mut ctx(), &dev(&[("iobase", "0xffff")]))
                .is_err()
        );
    }

    #[test]
    fn write_stops_the_vm_with_the_value() {
        let vm = VmHandle::new(1);
        let mut d = DebugExit { vm: vm.clone() };
        d.write(0xf4, &[0x34, 0x12]);
        assert_eq!(vm.outcome(), Some(Outcome::DebugExit(0x1234)));
    }
}
