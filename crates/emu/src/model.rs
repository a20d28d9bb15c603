//! The CPU model: what CPUID reports. It advertises only what the emulator implements.

use std::collections::BTreeMap;

/// CPUID leaves of the emulated CPU.
#[derive(Clone, Debug)]
pub struct CpuModel {
    /// (leaf, subleaf) → EAX, EBX, ECX, EDX. Leaves that depend on the subleaf use it; the
    /// others are stored with subleaf 0.
    leaves: BTreeMap<(u32, u32), [u32; 4]>,
    subleaf_leaves: Vec<u32>,
}

/// Feature bits of leaf 1 EDX.
pub mod edx1 {
    pub const FPU: u32 = 1 << 0;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const MCE: u32 = 1 << 7;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const SEP: u32 = 1 << 11;
    pub const MTRR: u32 = 1 << 12;
    pub const PGE: u32 = 1 << 13;
    pub const MCA: u32 = 1 << 14;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const CLFSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
}
/// Feature bits of leaf 1 ECX.
pub mod ecx1 {
    pub const CX16: u32 = 1 << 13;
    pub const X2APIC: u32 = 1 << 21;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const HYPERVISOR: u32 = 1 << 31;
}

fn text(s: &[u8]) -> u32 {
    u32::from_le_bytes([s[0], s[1], s[2], s[3]])
}

impl CpuModel {
    /// The emulated CPU: the integer ISA, system architecture and long mode, x87, MMX, SSE
    /// and SSE2 with FXSAVE. No SSE3 or later, no XSAVE/AVX.
    pub fn emulated() -> Self {
        let mut l = BTreeMap::new();
        let vendor = b"GenuineIntel";
        l.insert(
            (0, 0),
            [
                0xd,
                text(&vendor[0..]),
                text(&vendor[8..]),
                text(&vendor[4..]),
            ],
        );
        // Family 6, model 0x3a-like signature; CLFLUSH line size 8 quadwords.
        let edx = edx1::FPU
            | edx1::PSE
            | edx1::TSC
            | edx1::MSR
            | edx1::PAE
            | edx1::MCE
            | edx1::CX8
            | edx1::APIC
            | edx1::SEP
            | edx1::MTRR
            | edx1::PGE
            | edx1::MCA
            | edx1::CMOV
            | edx1::PAT
            | edx1::CLFSH
            | edx1::MMX
            | edx1::FXSR
            | edx1::SSE
            | edx1::SSE2;
        let ecx = ecx1::CX16
            | ecx1::X2APIC
            | ecx1::MOVBE
            | ecx1::POPCNT
            | ecx1::TSC_DEADLINE
            | ecx1::HYPERVISOR;
        l.insert((1, 0), [0x0003_06a9, 8 << 8, ecx, edx]);
        l.insert((7, 0), [0, 0, 0, 0]);
        l.insert((0xd, 0), [0, 0, 0, 0]);
        l.insert((0x8000_0000, 0), [0x8000_0008, 0, 0, 0]);
        // LAHF/SAHF in 64-bit mode; SYSCALL, NX, RDTSCP, long mode.
        l.insert(
            (0x8000_0001, 0),
            [0, 0, 1, (1 << 11) | (1 << 20) | (1 << 27) | (1 << 29)],
        );
        let brand = *b"Palacios-rs emulated x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        for k in 0..3u32 {
            let b = &brand[(k as usize) * 16..];
            l.insert(
                (0x8000_0002 + k, 0),
                [text(&b[0..]), text(&b[4..]), text(&b[8..]), text(&b[12..])],
            );
        }
        // 40 physical, 48 linear address bits.
        l.insert((0x8000_0008, 0), [0x3028, 0, 0, 0]);
        CpuModel {
            leaves: l,
            subleaf_leaves: vec![7, 0xd],
        }
    }

    /// CPUID for core `apic_id` of `cores`.
    pub fn cpuid(&self, leaf: u32, subleaf: u32, apic_id: u32, cores: u32) -> [u32; 4] {
        let max_basic = self.leaves.get(&(0, 0)).map(|v| v[0]).unwrap_or(0);
        let max_ext = self
            .leaves
            .get(&(0x8000_0000, 0))
            .map(|v| v[0])
            .unwrap_or(0);
        // The hypervisor range holds only what was set (zeros elsewhere).
        if (0x4000_0000..0x5000_0000).contains(&leaf) {
            return self.leaves.get(&(leaf, 0)).copied().unwrap_or([0; 4]);
        }
        // Out-of-range leaves return the highest basic leaf, as Intel CPUs do.
        let leaf = if leaf >= 0x8000_0000 {
            if leaf > max_ext { max_basic } else { leaf }
        } else if leaf > max_basic {
            max_basic
        } else {
            leaf
        };
        let sub = if self.subleaf_leaves.contains(&leaf) {
            subleaf
        } else {
            0
        };
        let mut r = self.leaves.get(&(leaf, sub)).copied().unwrap_or([0; 4]);
        if leaf == 1 {
            r[1] = (r[1] & 0xffff) | ((cores.clamp(1, 255)) << 16) | (apic_id << 24);
            if cores > 1 {
                r[3] |= 1 << 28; // HTT: the logical-processor count field is valid.
            }
        }
        if leaf == 0xb {
            // Extended topology: one thread per core, `cores` cores in the package; EDX is
            // the x2APIC ID, the same the local APIC reports.
            let shift = cores.max(1).next_power_of_two().trailing_zeros();
            r = match subleaf {
                0 => [0, 1, (1 << 8), apic_id],
                1 => [shift, cores.max(1), (2 << 8) | 1, apic_id],
                s => [0, 0, s & 0xff, apic_id],
            };
        }
        r
    }

    /// Add or replace a leaf (subleaf 0 for leaves without subleaves).
    pub fn set_leaf(&mut self, leaf: u32, subleaf: u32, regs: [u32; 4]) {
        let sub = if self.subleaf_leaves.contains(&leaf) {
            subleaf
        } else {
            0
        };
        self.leaves.insert((leaf, sub), regs);
    }

    /// Whether leaf 1 EDX has `bit`.
    pub fn has_edx1(&self, bit: u32) -> bool {
        self.leaves.get(&(1, 0)).is_some_and(|v| v[3] & bit != 0)
    }
    /// Whether leaf 1 ECX has `bit`.
    pub fn has_ecx1(&self, bit: u32) -> bool {
        self.leaves.get(&(1, 0)).is_some_and(|v| v[2] & bit != 0)
    }

    /// Remove feature bits of leaf 1 (a configured CPU model that hides something).
    pub fn hide_leaf1(&mut self, ecx: u32, edx: u32) {
        if let Some(v) = self.leaves.get_mut(&(1, 0)) {
            v[2] &= !ecx;
            v[3] &= !edx;
        }
    }

    /// Keep only the feature bits of `keep` in the leaves it lists.
    pub fn restrict(&mut self, keep: &[(u32, u32, [u32; 4])]) {
        for &(leaf, sub, mask) in keep {
            if let Some(v) = self.leaves.get_mut(&(leaf, sub)) {
                for (r, m) in v.iter_mut().zip(mask) {
                    // EAX of leaf 1 is the signature and EBX holds the APIC ID: not features.
                    *r &= m;
                }
            }
        }
    }

    /// Hide a feature by its /proc/cpuinfo name; false if the name is unknown.
    pub fn hide(&mut self, name: &str) -> bool {
        let (leaf, reg, bit) = match name {
            "fpu" => (1, 3, edx1::FPU),
            "pse" => (1, 3, edx1::PSE),
            "tsc" => (1, 3, edx1::TSC),
            "msr" => (1, 3, edx1::MSR),
            "pae" => (1, 3, edx1::PAE),
            "cx8" => (1, 3, edx1::CX8),
            "apic" => (1, 3, edx1::APIC),
            "sep" => (1, 3, edx1::SEP),
            "mtrr" => (1, 3, edx1::MTRR),
            "pge" => (1, 3, edx1::PGE),
            "cmov" => (1, 3, edx1::CMOV),
            "pat" => (1, 3, edx1::PAT),
            "clflush" => (1, 3, edx1::CLFSH),
            "mmx" => (1, 3, edx1::MMX),
            "fxsr" => (1, 3, edx1::FXSR),
            "sse" => (1, 3, edx1::SSE),
            "sse2" => (1, 3, edx1::SSE2),
            "cx16" => (1, 2, ecx1::CX16),
            "x2apic" => (1, 2, ecx1::X2APIC),
            "movbe" => (1, 2, ecx1::MOVBE),
            "popcnt" => (1, 2, ecx1::POPCNT),
            "tsc_deadline" => (1, 2, ecx1::TSC_DEADLINE),
            "hypervisor" => (1, 2, ecx1::HYPERVISOR),
            "syscall" => (0x8000_0001, 3, 1 << 11),
            "nx" => (0x8000_0001, 3, 1 << 20),
            "rdtscp" => (0x8000_0001, 3, 1 << 27),
            "lm" => (0x8000_0001, 3, 1 << 29),
            "lahf_lm" => (0x8000_0001, 2, 1),
            _ => return false,
        };
        if let Some(v) = self.leaves.get_mut(&(leaf, 0)) {
            v[reg] &= !bit;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_brand_and_per_core_apic_id() {
        let m = CpuModel::emulated();
        let v = m.cpuid(0, 0, 0, 1);
        let mut s = Vec::new();
        for r in [v[1], v[3], v[2]] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s, b"GenuineIntel");
        assert_eq!(m.cpuid(1, 0, 3, 4)[1] >> 24, 3);
        assert_eq!((m.cpuid(1, 0, 3, 4)[1] >> 16) & 0xff, 4);
        let edx = m.cpuid(1, 0, 0, 1)[3];
        let sse2 = edx1::FPU | edx1::MMX | edx1::FXSR | edx1::SSE | edx1::SSE2;
        assert_eq!(edx & sse2, sse2, "x87, MMX, FXSR, SSE, SSE2");
        assert_eq!(m.cpuid(1, 0, 0, 1)[2] & 1, 0, "no SSE3");
        let lm = m.cpuid(0x8000_0001, 0, 0, 1)[3];
        assert_ne!(lm & (1 << 29), 0);
        let mut hidden = CpuModel::emulated();
        assert!(hidden.hide("x2apic") && hidden.hide("lm"));
        assert!(!hidden.hide("avx512"));
        assert_eq!(hidden.cpuid(1, 0, 0, 1)[2] & ecx1::X2APIC, 0);
        assert_eq!(hidden.cpuid(0x8000_0001, 0, 0, 1)[3] & (1 << 29), 0);
        assert_ne!(hidden.cpuid(1, 0, 0, 1)[2] & ecx1::POPCNT, 0);
        // A leaf past the maximum answers like the highest basic leaf.
        assert_eq!(m.cpuid(0x4000_0000, 0, 0, 1), m.cpuid(0xd, 0, 0, 1));
    }
}
