//! `MTRRS`: the memory-type range registers, emulated in the VMM (Palacios' extension) on every
//! backend: MTRRcap, the default type, 8 variable and 11 fixed ranges per core, with the SDM's
//! checks (reserved bits and invalid memory types raise #GP), saved in checkpoints.

use std::sync::{Arc, Mutex};

use palacios_vmm::config::ExtensionConfig;
use palacios_vmm::extension::{Extension, ExtensionClass};
use palacios_vmm::msr::MsrDevice;
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, ConfigError, DeviceOption};

pub const MTRRCAP: u32 = 0xfe;
pub const DEF_TYPE: u32 = 0x2ff;
/// 8 variable ranges, fixed ranges supported, write-combining supported.
const CAP: u64 = 0x508;
const FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];
/// Physical-address bits the masks may use.
const PHYS_MASK: u64 = (1 << 52) - 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoreMtrrs {
    pub def_type: u64,
    pub var: [u64; 16],
    pub fixed: [u64; 11],
}

pub struct Mtrrs {
    cores: Vec<Mutex<CoreMtrrs>>,
}

/// UC, WC, WT, WP, WB.
fn valid_type(t: u64) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6)
}

impl Mtrrs {
    fn core(&self, cpu: u32) -> Option<std::sync::MutexGuard<'_, CoreMtrrs>> {
        self.cores
            .get(cpu as usize)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl MsrDevice for Mtrrs {
    fn read(&self, cpu: u32, msr: u32) -> Option<u64> {
        let c = self.core(cpu)?;
        match msr {
            MTRRCAP => Some(CAP),
            DEF_TYPE => Some(c.def_type),
            0x200..=0x20f => Some(c.var[(msr - 0x200) as usize]),
            _ => FIXED.iter().position(|&f| f == msr).map(|i| c.fixed[i]),
        }
    }
    fn write(&self, cpu: u32, msr: u32, v: u64) -> bool {
        let Some(mut c) = self.core(cpu) else {
            return false;
        };
        match msr {
            DEF_TYPE => {
                // Type in bits 0-7, FE bit 10, E bit 11; the rest is reserved.
                if v & !0xcff != 0 || !valid_type(v & 0xff) {
                    return false;
                }
                c.def_type = v;
            }
            0x200..=0x20f => {
                let i = (msr - 0x200) as usize;
                let ok = if i % 2 == 0 {
                    // PHYSBASE: type in bits 0-7, bits 8-11 reserved, base up to MAXPHYADDR.
                    valid_type(v & 0xff) && v & 0xf00 == 0 && v & !PHYS_MASK == 0
                } else {
                    // PHYSMASK: valid bit 11, bits 0-10 reserved.
                    v & 0x7ff == 0 && v & !PHYS_MASK == 0
                };
                if !ok {
                    return false;
                }
                c.var[i] = v;
            }
            _ => {
                let Some(i) = FIXED.iter().position(|&f| f == msr) else {
                    return false;
                };
                if !(0..8).all(|b| valid_type((v >> (b * 8)) & 0xff)) {
                    return false;
                }
                c.fixed[i] = v;
            }
        }
        true
    }
}

impl Extension for Mtrrs {
    fn inspect(&self) -> serde_json::Value {
        let cores: Vec<CoreMtrrs> = (0..self.cores.len() as u32)
            .filter_map(|c| self.core(c).map(|g| *g))
            .collect();
        serde_json::to_value(cores).unwrap_or_default()
    }
}

pub struct MtrrsClass;

impl ExtensionClass for MtrrsClass {
    fn name(&self) -> &'static str {
        "MTRRS"
    }
    fn help(&self) -> &'static str {
        "memory-type range registers emulated in the VMM (MTRRcap 0xfe, default type 0x2ff, variable 0x200-0x20f, fixed 0x250-0x26f), checked and checkpointed"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[DeviceOption {
            name: "default",
            help: "initial default type: none (MTRRs off, the reset value) or wb (enabled, write-back)",
        }]
    }
    fn create(
        &self,
        ctx: &mut BuildCtx,
        cfg: &ExtensionConfig,
    ) -> Result<Arc<dyn Extension>, ConfigError> {
        let def_type = match cfg.node.val("default")? {
            None | Some("none") => 0,
            Some("wb") => 0xc06,
            Some(o) => {
                return Err(cfg.node.val_err(
                    "default",
                    format!("'default' must be none or wb, not '{o}'"),
                ));
            }
        };
        let m = Arc::new(Mtrrs {
            cores: (0..ctx.cores)
                .map(|_| {
                    Mutex::new(CoreMtrrs {
                        def_type,
                        ..Default::default()
                    })
                })
                .collect(),
        });
        let e = |msg: String| cfg.node.err(msg);
        ctx.msrs.insert(MTRRCAP, MTRRCAP, m.clone()).map_err(e)?;
        ctx.msrs.insert(0x200, 0x20f, m.clone()).map_err(e)?;
        ctx.msrs.insert(0x250, 0x250, m.clone()).map_err(e)?;
        ctx.msrs.insert(0x258, 0x259, m.clone()).map_err(e)?;
        ctx.msrs.insert(0x268, 0x26f, m.clone()).map_err(e)?;
        ctx.msrs.insert(DEF_TYPE, DEF_TYPE, m.clone()).map_err(e)?;
        let (m1, m2) = (m.clone(), m.clone());
        ctx.register_state(state_fn(
            1,
            move || {
                (0..m1.cores.len() as u32)
                    .filter_map(|c| m1.core(c).map(|g| *g))
                    .collect::<Vec<_>>()
            },
            move |v: Vec<CoreMtrrs>| {
                if v.len() != m2.cores.len() {
                    return Err(format!(
                        "MTRRs of {} cores, this VM has {}",
                        v.len(),
                        m2.cores.len()
                    ));
                }
                for (c, s) in m2.cores.iter().zip(v) {
                    *c.lock().unwrap_or_else(|p| p.into_inner()) = s;
                }
                Ok(())
            },
        ));
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_checked_like_hardware() {
        let m = Mtrrs {
            cores: vec![
                Mutex::new(CoreMtrrs::default()),
                Mutex::new(CoreMtrrs::default()),
            ],
        };
        assert_eq!(m.read(0, MTRRCAP), Some(CAP));
        assert!(m.write(0, DEF_TYPE, 0xc06));
        assert!(!m.write(0, DEF_TYPE, 0xc02), "type 2 is reserved");
        assert!(!m.write(0, DEF_TYPE, 0x1c06), "reserved bit 12");
        assert!(m.write(1, 0x200, 0x8000_0000 | 6));
        assert!(!m.write(1, 0x200, 0x8000_0100 | 6), "reserved bits 8-11");
        assert!(m.write(1, 0x201, 0xff_c000_0800));
        assert!(!m.write(1, 0x201, 0x801), "reserved bits 0-10");
        assert!(m.write(0, 0x250, 0x0606_0606_0606_0606));
        assert!(!m.write(0, 0x250, 0x0606_0606_0606_0603));
        assert!(!m.write(0, 0x251, 0), "not an MTRR");
        assert_eq!(m.read(1, 0x200), Some(0x8000_0006));
        assert_eq!(m.read(0, 0x200), Some(0), "per core");
        assert_eq!(m.read(0, DEF_TYPE), Some(0xc06));
    }
}
