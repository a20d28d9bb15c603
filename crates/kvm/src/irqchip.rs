//! KVM's in-kernel interrupt controllers (PIC pair, IOAPIC, PIT, MSI) and ioeventfd, as the
//! core's `KernelIrqchip` and `IoEvents`.

use std::io;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use palacios_vmm::BackendError;
use palacios_vmm::backend::KernelIrqchip;

use crate::host_err;

/// PC wiring for the in-kernel irqchip, as the MP table describes it: GSI 0-15 reach the PIC
/// pair, GSI n reaches IOAPIC pin n, except that ISA IRQ0 (the PIT) is on pin 2.
pub(crate) fn pc_gsi_routing() -> Result<kvm_bindings::KvmIrqRouting, BackendError> {
    let entry = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_bindings::kvm_irq_routing_entry {
            gsi,
            type_: kvm_bindings::KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip = kvm_bindings::kvm_irq_routing_irqchip { irqchip: chip, pin };
        e
    };
    let mut entries = Vec::new();
    for gsi in 0..24u32 {
        if gsi < 8 {
            entries.push(entry(gsi, kvm_bindings::KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(entry(gsi, kvm_bindings::KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        match gsi {
            0 => entries.push(entry(0, kvm_bindings::KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => entries.push(entry(gsi, kvm_bindings::KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    kvm_bindings::KvmIrqRouting::from_entries(&entries).map_err(|e| BackendError::Host {
        op: "KVM_SET_GSI_ROUTING",
        source: io::Error::other(format!("{e:?}")),
    })
}

/// KVM's ioeventfd: a guest write to a registered address signals an eventfd in the kernel.
pub(crate) struct KvmIoEvents(pub(crate) Arc<VmFd>);

impl palacios_vmm::backend::IoEvents for KvmIoEvents {
    fn register(
        &self,
        addr: u64,
        pio: bool,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> io::Result<()> {
        let a = if pio {
            kvm_ioctls::IoEventAddress::Pio(addr)
        } else {
            kvm_ioctls::IoEventAddress::Mmio(addr)
        };
        self.0
            .register_ioevent(fd, &a, kvm_ioctls::NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(
        &self,
        addr: u64,
        pio: bool,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> io::Result<()> {
        let a = if pio {
            kvm_ioctls::IoEventAddress::Pio(addr)
        } else {
            kvm_ioctls::IoEventAddress::Mmio(addr)
        };
        self.0
            .unregister_ioevent(fd, &a, kvm_ioctls::NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// KVM's in-kernel PIC pair, IOAPIC and PIT.
pub(crate) struct KvmIrqchip {
    pub(crate) vm: Arc<VmFd>,
}

/// The in-kernel PICs, IOAPIC and PIT, as a checkpoint keeps them.
#[derive(serde::Serialize, serde::Deserialize)]
struct KvmChipState {
    pic_master: kvm_bindings::kvm_irqchip,
    pic_slave: kvm_bindings::kvm_irqchip,
    ioapic: kvm_bindings::kvm_irqchip,
    pit: kvm_bindings::kvm_pit_state2,
}

impl KernelIrqchip for KvmIrqchip {
    fn set_irq(&self, gsi: u32, level: bool) {
        if let Err(e) = self.vm.set_irq_line(gsi, level) {
            tracing::debug!("KVM_IRQ_LINE {gsi}: {e}");
        }
    }

    fn signal_msi(&self, msg: palacios_vmm::irq::MsiMessage) -> bool {
        let m = kvm_bindings::kvm_msi {
            address_lo: msg.addr as u32,
            address_hi: (msg.addr >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        match self.vm.signal_msi(m) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!("KVM_SIGNAL_MSI {msg:x?}: {e}");
                false
            }
        }
    }

    fn save(&self) -> Result<serde_json::Value, BackendError> {
        let chip = |id: u32| {
            let mut c = kvm_bindings::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map(|()| c)
                .map_err(host_err("KVM_GET_IRQCHIP"))
        };
        let st = KvmChipState {
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm.get_pit2().map_err(host_err("KVM_GET_PIT2"))?,
        };
        serde_json::to_value(&st).map_err(|e| BackendError::Host {
            op: "save the in-kernel irqchip",
            source: io::Error::other(e.to_string()),
        })
    }

    fn restore(&self, state: &serde_json::Value) -> Result<(), BackendError> {
        let st: KvmChipState =
            serde_json::from_value(state.clone()).map_err(|e| BackendError::Host {
                op: "restore the in-kernel irqchip",
                source: io::Error::other(format!("malformed state: {e}")),
            })?;
        for c in [&st.pic_master, &st.pic_slave, &st.ioapic] {
            self.vm
                .set_irqchip(c)
                .map_err(host_err("KVM_SET_IRQCHIP"))?;
        }
        self.vm.set_pit2(&st.pit).map_err(host_err("KVM_SET_PIT2"))
    }
}
