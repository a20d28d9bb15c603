//! running and comparing.

use super::*;

pub(crate) fn nasm(ins: &Instruction) -> String {
    let mut f = NasmFormatter::new();
    let mut s = String::new();
    f.format(ins, &mut s);
    s
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    let r = if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        v.parse()
    };
    Some(r.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

pub fn run() {
    let cases = env_u64("PALACIOS_DIFF_CASES").unwrap_or(50_000);
    let seed = env_u64("PALACIOS_DIFF_SEED").unwrap_or(0x5eed_0000_d1ff);
    let show = env_u64("PALACIOS_DIFF_SHOW").unwrap_or(30);
    let filter = std::env::var("PALACIOS_DIFF_FORM").ok();
    let trace = std::env::var_os("PALACIOS_DIFF_TRACE").is_some();
    let native = match Native::new() {
        Ok(n) => n,
        Err(e) => panic!("differential test: {e}"),
    };
    // Both engines of the emulator: the interpreter, and the block translator with every
    // block translated on its first run.
    let engines = [
        ("interpreter", Emu::new(native.base, false)),
        ("translator", Emu::new(native.base, true)),
    ];
    let base = native.base;
    let compat = native.s32.is_some();
    if !compat {
        println!(
            "differential: the host has no 32-bit user code segment; compatibility-mode forms skipped"
        );
    }
    let mut forms = forms(compat);
    if let Some(f) = &filter {
        forms.retain(|x| x.name().contains(f.as_str()));
        assert!(!forms.is_empty(), "no form matches PALACIOS_DIFF_FORM={f}");
    }
    println!(
        "differential: {} instruction forms, {cases} cases, seed {seed:#x}, buffer at {base:#x}",
        forms.len()
    );
    // Registers compared: all 64 bits of 16 in 64-bit code, the low halves of 8 in 32-bit code.
    let reg_mask = |bits: u32| -> [u64; 16] {
        let mut m = [u64::MAX; 16];
        if bits == 32 {
            for (i, v) in m.iter_mut().enumerate() {
                *v = if i < 8 { 0xffff_ffff } else { 0 };
            }
        }
        m
    };
    let same =
        |a: &State, b: &State, m: &[u64; 16]| (0..16).all(|i| (a.gpr[i] ^ b.gpr[i]) & m[i] == 0);

    // The harness itself: a NOP returns the inputs unchanged on both sides.
    for bits in [64u32, 32] {
        if bits == 32 && !compat {
            continue;
        }
        let stub = native.stub(bits);
        let ip = native.insn_addr(bits);
        let mut rng = Rng(seed);
        let mut g = Gen {
            rng: &mut rng,
            base,
            ip,
            bits,
        };
        let (st, data) = g.random_state();
        let m = reg_mask(bits);
        let (n, nd) = native.run(bits, &[0x90], &st, &data);
        assert!(
            same(&n, &st, &m),
            "native {bits}-bit harness changed registers"
        );
        assert_eq!(
            n.flags & COMPARED,
            st.flags & COMPARED,
            "native {bits}-bit harness changed flags"
        );
        assert!(nd == data, "native {bits}-bit harness changed memory");
        let mut code = stub.pro.clone();
        code.extend_from_slice(&[0x90, 0xf4]);
        for (name, emu) in &engines {
            let (e, ed) = emu
                .run(bits, base + stub.off, &code, ip, &st, &data)
                .expect("emulator runs a NOP");
            assert!(
                same(&e, &st, &m),
                "emulator ({name}) {bits}-bit harness changed registers"
            );
            assert!(
                ed == data,
                "emulator ({name}) {bits}-bit harness changed memory"
            );
        }
    }

    let start = Instant::now();
    let mut ran = 0u64;
    let mut mismatches = 0u64;
    let mut skipped = 0u64;
    let mut per_form: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for case in 0..cases {
        let form = &forms[(case % forms.len() as u64) as usize];
        let bits = form.bits();
        let stub = native.stub(bits);
        let ip = native.insn_addr(bits);
        let mut rng = Rng(seed ^ case.wrapping_mul(0xd605_bbb5_8c8a_bbd9));
        let mut g = Gen {
            rng: &mut rng,
            base,
            ip,
            bits,
        };
        let mut c = None;
        for _ in 0..200 {
            c = g.case(form);
            if c.is_some() {
                break;
            }
        }
        let Some(c) = c else {
            skipped += 1;
            continue;
        };
        ran += 1;
        if trace {
            eprintln!(
                "case {case} {}: {} [{}]",
                form.name(),
                nasm(&c.ins),
                hex(&c.bytes)
            );
        }
        let (n_st, n_data) = native.run(bits, &c.bytes, &c.st, &c.data);
        let mut code = stub.pro.clone();
        code.extend_from_slice(&c.bytes);
        code.push(0xf4);
        let outs: Vec<_> = engines
            .iter()
            .map(|(name, emu)| {
                (
                    *name,
                    emu.run(bits, base + stub.off, &code, ip, &c.st, &c.data),
                )
            })
            .collect();
        let undefined = undefined_flags(&c.ins, &c.st);
        let fmask = COMPARED & !undefined;
        let mut rmask = reg_mask(bits);
        for (r, bits) in undefined_reg_bits(&c.ins, &c.st, &c.data, base) {
            rmask[r] &= !bits;
        }
        let mut report = String::new();
        for (engine, emu_out) in &outs {
            let report_len = report.len();
            match emu_out {
                Err(e) => {
                    let _ = writeln!(report, "  emulator failed: {e}");
                }
                Ok((e_st, e_data)) => {
                    for i in 0..16 {
                        if (n_st.gpr[i] ^ e_st.gpr[i]) & rmask[i] != 0 {
                            let _ = writeln!(
                                report,
                                "  {:>4}: native {:#018x}  emu {:#018x}",
                                NAMES[i], n_st.gpr[i], e_st.gpr[i]
                            );
                        }
                    }
                    if (n_st.flags ^ e_st.flags) & fmask != 0 {
                        let _ = writeln!(
                            report,
                            "  flags: native {:#06x}  emu {:#06x}  (compared {fmask:#06x}, differ {:#06x})",
                            n_st.flags & COMPARED,
                            e_st.flags & COMPARED,
                            (n_st.flags ^ e_st.flags) & fmask
                        );
                    }
                    let diffs: Vec<usize> =
                        (0..DATA_LEN).filter(|&k| n_data[k] != e_data[k]).collect();
                    for &k in diffs.iter().take(16) {
                        let _ = writeln!(
                            report,
                            "  mem {:#x}: was {:02x} native {:02x} emu {:02x}",
                            base + k as u64,
                            c.data[k],
                            n_data[k],
                            e_data[k]
                        );
                    }
                    if diffs.len() > 16 {
                        let _ = writeln!(report, "  ... {} differing bytes", diffs.len());
                    }
                    if report.len() > report_len {
                        let _ = writeln!(
                            report,
                            "  out flags: native {:#06x} emu {:#06x}",
                            n_st.flags & COMPARED,
                            e_st.flags & COMPARED
                        );
                    }
                }
            }
            if report.len() > report_len {
                report.insert_str(report_len, &format!("  [{engine}]\n"));
            }
        }
        let e = per_form.entry(form.name()).or_default();
        e.0 += 1;
        if !report.is_empty() {
            e.1 += 1;
            mismatches += 1;
            if mismatches <= show {
                let mut s = format!(
                    "MISMATCH case {case} form {}: {}   [{}]\n  in:",
                    form.name(),
                    nasm(&c.ins),
                    hex(&c.bytes)
                );
                for (i, (name, v)) in NAMES.iter().zip(c.st.gpr).enumerate() {
                    if i % 4 == 0 {
                        s.push_str("\n   ");
                    }
                    let _ = write!(s, " {name:>3}={v:#018x}");
                }
                let _ = write!(s, "\n    flags={:#06x}\n", c.st.flags & COMPARED);
                s.push_str(&report);
                println!("{s}");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if std::env::var_os("PALACIOS_DIFF_LIST").is_some() {
        for (name, (n, m)) in &per_form {
            println!("  {name}: {n} cases, {m} mismatches");
        }
    }
    // Every form must have produced cases (a generator that never finds valid operands
    // would silently test nothing).
    if cases >= 4 * forms.len() as u64 {
        let idle: Vec<String> = forms
            .iter()
            .map(|f| f.name())
            .filter(|n| !per_form.contains_key(n))
            .collect();
        assert!(idle.is_empty(), "forms that never ran: {idle:?}");
    }
    let bad: Vec<_> = per_form.iter().filter(|(_, v)| v.1 > 0).collect();
    if !bad.is_empty() {
        println!("forms with mismatches:");
        for (name, (n, m)) in &bad {
            println!("  {name}: {m} of {n}");
        }
    }
    println!(
        "differential: {ran} cases run ({skipped} skipped: no valid operands), {} forms, \
         {mismatches} mismatches, {secs:.1} s, seed {seed:#x}",
        per_form.len()
    );
    let translated = engines[1].1.translated.get();
    println!("differential: the translator translated {translated} blocks");
    assert!(
        translated >= ran / 5,
        "the translator translated only {translated} blocks in {ran} cases"
    );
    assert_eq!(
        mismatches, 0,
        "the emulator disagrees with the host CPU (seed {seed:#x})"
    );
}
