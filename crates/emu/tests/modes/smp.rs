//! Targeted guests with two cores: cross-modifying code.

use super::*;

/// Trials per run, each on its own page of code.
const TRIALS: u32 = 256;
/// Pages the executor runs (one per trial) and the results.
const PAGES: u64 = 0x40000;
const RES_FIRST: u64 = 0x30000;
const RES_LAST: u64 = 0x31000;
/// Delays (REP STOSB counts) the writer waits before its store, one per trial.
const DELAYS: u64 = 0x32000;
const SCRATCH: u64 = 0x33000;
const GO: u64 = VARS;
const DONE: u64 = VARS + 0x40;
const OLD: u32 = 0x1111_1111;
const NEW: u32 = 0x2222_2222;
/// Second core: real-mode entry and 32-bit code.
const AP_REAL: u64 = CODE3;
const AP_PM32: u64 = CODE3 + 0x200;

/// Run both cores to their HLT (each on its own thread, with a deadline).
fn run_two(g: &Guest, ap: CpuState) {
    let backend = EmuBackend::default();
    backend.map_memory(&g.mem).unwrap();
    let cores: Vec<Box<dyn Vcpu>> = [g.state.clone(), ap]
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = backend.create_vcpu(i as u32).unwrap();
            v.set_state(&s).unwrap();
            v
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let threads: Vec<_> = cores
        .into_iter()
        .map(|mut v| {
            let kick = v.kick_flag().unwrap();
            let t = std::thread::spawn(move || {
                loop {
                    match v.run().unwrap() {
                        Exit::Hlt => return,
                        Exit::Interrupted => {}
                        other => panic!("unexpected exit {other:?}"),
                    }
                }
            });
            (t, kick)
        })
        .collect();
    for (t, kick) in threads {
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "the cores did not finish");
            kick.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().unwrap();
    }
}

/// One run of the race; returns (first calls that saw the new code, final calls still
/// running the old code).
fn cross_modify_once() -> (u32, u32) {
    let g = Guest::new();
    g.boot_pm32();
    for i in 0..u64::from(TRIALS) {
        // P_i: mov eax, OLD ; ret
        let mut code = vec![0xb8];
        code.extend_from_slice(&OLD.to_le_bytes());
        code.push(0xc3);
        g.write(PAGES + i * 0x1000, &code);
        // Delays spread over a batch of REP STOSB (one block: no TLB sync inside).
        g.w32(DELAYS + i * 4, ((i * 61) % 4000) as u32);
    }
    // Core 0 writes: it holds a write translation of P_i (from a store to the page before
    // the page is code), waits for the executor's go, waits a little more, and patches the
    // immediate once.
    g.code(32, PM32, &|a| {
        pm32_init(a, false)?;
        a.mov(ebx, 1u32)?;
        a.mov(esi, PAGES as u32)?;
        let mut trial = a.create_label();
        a.set_label(&mut trial)?;
        a.mov(byte_ptr(esi + 0x800), 1)?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.cmp(dword_ptr(GO as u32), ebx)?;
        a.jne(spin)?;
        a.cld()?;
        a.mov(edi, SCRATCH as u32)?;
        a.mov(ecx, dword_ptr(ebx * 4 + (DELAYS as i32 - 4)))?;
        a.rep().stosb()?;
        a.mov(dword_ptr(esi + 1), NEW)?;
        a.mov(dword_ptr(DONE as u32), ebx)?;
        a.add(esi, 0x1000)?;
        a.inc(ebx)?;
        a.cmp(ebx, TRIALS + 1)?;
        a.jne(trial)?;
        a.hlt()
    });
    // Core 1 executes P_i right after the go (decoding it while the writer may be inside its
    // delay), waits for the writer's done, serializes with CPUID as the SDM asks of
    // cross-modifying code, and runs P_i again: it must see the new immediate.
    g.code(16, AP_REAL, &|a| {
        a.cli()?;
        a.lgdt(ptr(GDTR as u16))?;
        a.mov(eax, cr0)?;
        a.or(eax, 1)?;
        a.mov(cr0, eax)?;
        a.jmp_far(KCODE32, AP_PM32 as u32)
    });
    g.code(32, AP_PM32, &|a| {
        a.mov(ax, u32::from(KDATA))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, 0x5f00u32)?;
        a.mov(edi, 1u32)?;
        a.mov(esi, PAGES as u32)?;
        let mut trial = a.create_label();
        a.set_label(&mut trial)?;
        a.mov(dword_ptr(GO as u32), edi)?;
        a.call(esi)?;
        a.mov(dword_ptr(edi * 4 + (RES_FIRST as i32 - 4)), eax)?;
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.cmp(dword_ptr(DONE as u32), edi)?;
        a.jne(wait)?;
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.call(esi)?;
        a.mov(dword_ptr(edi * 4 + (RES_LAST as i32 - 4)), eax)?;
        a.add(esi, 0x1000)?;
        a.inc(edi)?;
        a.cmp(edi, TRIALS + 1)?;
        a.jne(trial)?;
        a.hlt()
    });
    run_two(&g, CpuState::real_mode_at(AP_REAL as u32));
    let (mut first_new, mut stale) = (0, 0);
    for i in 0..u64::from(TRIALS) {
        match g.r32(RES_FIRST + i * 4) {
            NEW => first_new += 1,
            OLD => {}
            v => panic!("trial {i}: first call returned {v:#x}"),
        }
        match g.r32(RES_LAST + i * 4) {
            NEW => {}
            OLD => stale += 1,
            v => panic!("trial {i}: last call returned {v:#x}"),
        }
    }
    (first_new, stale)
}

/// Code written by another core through a write translation it held from before the page
/// became code: once the writer is done and the executor has serialized, the executor runs
/// the new code. (Before provisional blocks, a write landing between the executor's decode
/// and the writer's next TLB synchronization was in neither the decoded copy nor the page's
/// version, and the old code ran forever.)
#[test]
pub(crate) fn cross_modifying_code_is_seen_after_serializing() {
    let runs = 8;
    let (mut first_new, mut stale) = (0, 0);
    for _ in 0..runs {
        let (f, s) = cross_modify_once();
        first_new += f;
        stale += s;
    }
    eprintln!(
        "{} trials: {first_new} first calls already saw the new code, {stale} stale at the end",
        runs * TRIALS
    );
    assert_eq!(stale, 0, "the executor kept running old code");
}
