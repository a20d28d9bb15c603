//! MSI-X: the vector table and pending-bit array a function exposes in a BAR, and the
//! capability that enables it (PCI Local Bus 3.0, 6.8.2).

use palacios_vmm::irq::{MsiController, MsiMessage};
use serde::{Deserialize, Serialize};

pub const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
/// Message control: MSI-X enable, function mask.
pub const MC_ENABLE: u16 = 1 << 15;
pub const MC_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub data: u32,
    pub ctrl: u32,
}

/// The table, the pending bits and the capability's enable/mask bits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MsixTable {
    pub entries: Vec<Entry>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_mask: bool,
}

impl MsixTable {
    /// `n` vectors (1..=2048), all masked as after reset.
    pub fn new(n: u16) -> Self {
        let n = n.clamp(1, 2048) as usize;
        MsixTable {
            entries: vec![
                Entry {
                    ctrl: CTRL_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_mask: false,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the table (a multiple of 16).
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }
    /// Bytes of the pending-bit array (whole qwords).
    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// The capability body after ID/next: message control, table offset/BIR, PBA offset/BIR.
    /// Returns (body, write mask).
    pub fn capability(&self, bar: u8, table_off: u32, pba_off: u32) -> (Vec<u8>, Vec<u8>) {
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&((self.entries.len() - 1) as u16).to_le_bytes());
        body.extend_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
        let mut mask = vec![0u8; 10];
        mask[1] = 0xc0; // enable, function mask
        (body, mask)
    }

    /// The guest wrote the capability's message control: take the enable and mask bits.
    /// Pending vectors that are now deliverable are sent.
    pub fn set_control(&mut self, mc: u16, msi: &dyn MsiController) {
        self.enabled = mc & MC_ENABLE != 0;
        self.function_mask = mc & MC_FUNCTION_MASK != 0;
        self.flush_pending(msi);
    }

    fn masked(&self, v: usize) -> bool {
        self.function_mask || self.entries[v].ctrl & CTRL_MASKED != 0
    }

    /// Signal vector `v`: sent now, or remembered in the PBA while masked. Returns false for a
    /// vector outside the table or MSI-X disabled (the caller falls back to INTx).
    pub fn notify(&mut self, v: u16, msi: &dyn MsiController) -> bool {
        let v = v as usize;
        if !self.enabled || v >= self.entries.len() {
            return false;
        }
        if self.masked(v) {
            self.pending[v] = true;
        } else {
            let e = self.entries[v];
            msi.send_msi(MsiMessage {
                addr: e.addr,
                data: e.data,
            });
        }
        true
    }

    fn flush_pending(&mut self, msi: &dyn MsiController) {
        if !self.enabled {
            return;
        }
        for v in 0..self.entries.len() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                let e = self.entries[v];
                msi.send_msi(MsiMessage {
                    addr: e.addr,
                    data: e.data,
                });
            }
        }
    }

    /// A read of the table at `off` (1, 2, 4 or 8 bytes; other sizes read all-ones).
    pub fn read_table(&self, off: u64, data: &mut [u8]) {
        data.fill(0xff);
        let mut b = [0u8; 16];
        let idx = (off / ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(idx) else {
            return;
        };
        b[0..8].copy_from_slice(&e.addr.to_le_bytes());
        b[8..12].copy_from_slice(&e.data.to_le_bytes());
        b[12..16].copy_from_slice(&e.ctrl.to_le_bytes());
        let o = (off % ENTRY_SIZE) as usize;
        if o + data.len() <= 16 {
            data.copy_from_slice(&b[o..o + data.len()]);
        }
    }

    /// A write to the table. Only the mask bit of the vector control is writable.
    pub fn write_table(&mut self, off: u64, data: &[u8], msi: &dyn MsiController) {
        let idx = (off / ENTRY_SIZE) as usize;
        let o = (off % ENTRY_SIZE) as usize;
        if idx >= self.entries.len() || o + data.len() > 16 {
            return;
        }
        let e = self.entries[idx];
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&e.addr.to_le_bytes());
        b[8..12].copy_from_slice(&e.data.to_le_bytes());
        b[12..16].copy_from_slice(&e.ctrl.to_le_bytes());
        b[o..o + data.len()].copy_from_slice(data);
        let ne = &mut self.entries[idx];
        ne.addr = u64::from_le_bytes(b[0..8].try_into().unwrap());
        ne.data = u32::from_le_bytes(b[8..12].try_into().unwrap());
        ne.ctrl = u32::from_le_bytes(b[12..16].try_into().unwrap()) & CTRL_MASKED;
        self.flush_pending(msi);
    }

    /// A read of the pending-bit array (read-only).
    pub fn read_pba(&self, off: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = off as usize + i;
            *b = (0..8)
                .filter(|bit| self.pending.get(byte * 8 + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
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
    fn masked_vectors_pend_and_fire_on_unmask() {
        let sink = Sink::default();
        let mut t = MsixTable::new(3);
        assert!(!t.notify(1, &sink), "disabled: caller falls back to INTx");
        t.set_control(MC_ENABLE, &sink);
        t.write_table(16, &0xfee0_1000u64.to_le_bytes(), &sink);
        t.write_table(24, &0x41u32.to_le_bytes(), &sink);
        assert!(t.notify(1, &sink));
        assert!(sink.0.lock().unwrap().is_empty(), "still masked");
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 2);
        t.write_table(28, &0u32.to_le_bytes(), &sink); // unmask
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![MsiMessage {
                addr: 0xfee0_1000,
                data: 0x41
            }]
        );
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Function mask holds everything.
        t.set_control(MC_ENABLE | MC_FUNCTION_MASK, &sink);
        t.notify(1, &sink);
        assert_eq!(sink.0.lock().unwrap().len(), 1);
        t.set_control(MC_ENABLE, &sink);
        assert_eq!(sink.0.lock().unwrap().len(), 2);
        // Out of range: ignored, no panic.
        assert!(!t.notify(9, &sink));
        t.write_table(3 * 16, &[1; 4], &sink);
        t.write_table(14, &[1; 4], &sink);
        let mut b = [0u8; 4];
        t.read_table(100 * 16, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Reserved bits of the vector control read 0.
        t.write_table(12, &0xffff_fffeu32.to_le_bytes(), &sink);
        t.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
    }
}
