//! Per-instruction trace. Before each instruction it writes the register block in the layout
//! of QEMU's `-d cpu` dump (RAX= ... / RIP= RFL= lines), followed by the instruction's
//! address, bytes and disassembly, so `scripts/trace-diff.py` can line the two up and report
//! the first divergence.

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::Path;

use iced_x86::{Formatter, NasmFormatter};

use crate::block::Insn;
use crate::machine::Machine;

pub struct Tracer {
    out: BufWriter<std::fs::File>,
    line: String,
}

impl Tracer {
    /// `path` with the vCPU index appended for cores other than 0.
    pub fn create(path: &Path, vcpu: u32) -> std::io::Result<Tracer> {
        let p = if vcpu == 0 {
            path.to_path_buf()
        } else {
            let mut s = path.as_os_str().to_owned();
            s.push(format!(".{vcpu}"));
            s.into()
        };
        Ok(Tracer {
            out: BufWriter::new(std::fs::File::create(p)?),
            line: String::new(),
        })
    }

    pub fn record(&mut self, m: &Machine, x: &Insn) {
        let g = &m.cpu.gpr;
        let c = &m.cpu;
        self.line.clear();
        let l = &mut self.line;
        let _ = writeln!(
            l,
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
            g[0], g[3], g[1], g[2]
        );
        let _ = writeln!(
            l,
            "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
            g[6], g[7], g[5], g[4]
        );
        let _ = writeln!(
            l,
            "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
            g[8], g[9], g[10], g[11]
        );
        let _ = writeln!(
            l,
            "R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
            g[12], g[13], g[14], g[15]
        );
        let _ = writeln!(l, "RIP={:016x} RFL={:08x} CPL={}", x.i.ip(), c.flags, c.cpl);
        let mut text = String::new();
        // The formatter is not Send, so it cannot live in the core; tracing is slow anyway.
        NasmFormatter::new().format(&x.i, &mut text);
        let _ = write!(l, "IN: {:016x} ", m.cs_base().wrapping_add(x.i.ip()));
        // The instruction's bytes, read back from guest memory (best effort).
        let lin = m.cs_base().wrapping_add(x.i.ip());
        let mut bytes = [0u8; 15];
        let n = x.i.len().min(15);
        if m.peek_code(lin, &mut bytes[..n]) {
            for b in &bytes[..n] {
                let _ = write!(l, "{b:02x}");
            }
            let _ = write!(l, " ");
        }
        let _ = writeln!(l, "{text}");
        let _ = self.out.write_all(l.as_bytes());
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// A sampling profile of guest RIPs: the RIP after the block that crossed each multiple of
/// [`Profile::PERIOD`] instructions. Written when the core is dropped, most frequent first,
/// as "count rip" lines (look them up in the guest's symbol map).
pub struct Profile {
    path: std::path::PathBuf,
    counts: std::collections::HashMap<u64, u64>,
}

impl Profile {
    pub const PERIOD: u64 = 10_000;

    pub fn new(path: &Path, vcpu: u32) -> Profile {
        let mut p = path.as_os_str().to_owned();
        if vcpu != 0 {
            p.push(format!(".{vcpu}"));
        }
        Profile {
            path: p.into(),
            counts: Default::default(),
        }
    }

    pub fn sample(&mut self, rip: u64) {
        *self.counts.entry(rip).or_default() += 1;
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let mut v: Vec<_> = self.counts.iter().map(|(r, c)| (*c, *r)).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        let mut s = String::new();
        for (c, r) in v {
            let _ = writeln!(s, "{c} {r:#x}");
        }
        if let Err(e) = std::fs::write(&self.path, s) {
            tracing::warn!("cannot write the profile {}: {e}", self.path.display());
        }
    }
}
