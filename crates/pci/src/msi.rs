//! The MSI capability (PCI Local Bus 3.0, 6.8.1): one vector, 64-bit address, no per-vector
//! masking. The register block lives in the function's config space; this reads it there.

use palacios_vmm::irq::{MsiController, MsiMessage};

use crate::config::{CAP_MSI, ConfigSpace};

/// Message control: enable (bit 0), 64-bit capable (bit 7); one message (MMC 0).
const MC_ENABLE: u16 = 1;
const MC_64BIT: u16 = 1 << 7;

/// Where a function's MSI capability is.
#[derive(Clone, Copy, Debug)]
pub struct MsiCap {
    pub offset: usize,
}

impl MsiCap {
    /// Add the capability to `cfg`.
    pub fn add(cfg: &mut ConfigSpace) -> MsiCap {
        // control, address low, address high, data (16 bit), reserved.
        let mut body = vec![0u8; 12];
        body[0..2].copy_from_slice(&MC_64BIT.to_le_bytes());
        let mut mask = vec![0u8; 12];
        // Enable and the multiple-message-enable field (which stays 0: one vector) are
        // the guest's; the address's low two bits are reserved (zero).
        mask[0] = 0x01;
        mask[2..6].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        mask[6..10].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        mask[10..12].copy_from_slice(&0xffffu16.to_le_bytes());
        MsiCap {
            offset: cfg.add_capability(CAP_MSI, &body, &mask),
        }
    }

    pub fn enabled(&self, cfg: &ConfigSpace) -> bool {
        cfg.u16_at(self.offset + 2) & MC_ENABLE != 0
    }

    /// The message the guest programmed.
    pub fn message(&self, cfg: &ConfigSpace) -> MsiMessage {
        let o = self.offset;
        let lo = u64::from(cfg.u32_at(o + 4));
        let hi = u64::from(cfg.u32_at(o + 8));
        MsiMessage {
            addr: hi << 32 | lo,
            data: u32::from(cfg.u16_at(o + 12)),
        }
    }

    /// Send the vector if MSI is enabled; false otherwise (the caller uses INTx).
    pub fn notify(&self, cfg: &ConfigSpace, msi: &dyn MsiController) -> bool {
        if !self.enabled(cfg) {
            return false;
        }
        msi.send_msi(self.message(cfg));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink(Mutex<Vec<MsiMessage>>);
    impl MsiController for Sink {
        fn send_msi(&self, m: MsiMessage) {
            self.0.lock().unwrap().push(m);
        }
    }

    #[test]
    fn programmed_message_is_sent_only_while_enabled() {
        let mut c = ConfigSpace::new(1, 2, (2, 0, 0), 0);
        let m = MsiCap::add(&mut c);
        let sink = Sink::default();
        assert_eq!(c.bytes()[m.offset], CAP_MSI);
        // 64-bit capable, one message, read-only.
        c.write(m.offset + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.u16_at(m.offset + 2), MC_64BIT | MC_ENABLE);
        c.write(m.offset + 2, &0u16.to_le_bytes());
        assert!(!m.notify(&c, &sink));
        c.write(m.offset + 4, &0xfee0_1003u32.to_le_bytes());
        c.write(m.offset + 12, &0x4041u16.to_le_bytes());
        c.write(m.offset + 2, &1u16.to_le_bytes());
        assert!(m.notify(&c, &sink));
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![MsiMessage {
                addr: 0xfee0_1000,
                data: 0x4041
            }]
        );
    }
}
