//! The managed VM: pause and resume through the API socket, save, stop and load (on each
//! backend and across them), deterministic replay across a checkpoint, SMP, and bad input.
//! The guest is `countdown.elf` (guests/countdown): it prints "countdown N tsc T" every
//! `step` TSC ticks and halts after "countdown done".

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

/// (N, TSC) of every complete "countdown N tsc T" line.
fn steps(out: &str) -> Vec<(u32, u64)> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("countdown"), Some(n), Some("tsc"), Some(t)) => {
                    Some((n.parse().ok()?, t.trim().parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// Guest TSC ticks per ms on a backend (the emulator's is fixed; KVM's is the host's).
fn ticks_per_ms(backend: &str) -> u64 {
    if backend == "emu" {
        return 2_000_000;
    }
    palacios::kvm::tsc_khz().unwrap_or(2_000_000)
}

/// Start countdown.elf with an API socket; returns the session and the socket.
fn start(tag: &str, backend: &str, from: u32, step_ms: u64, extra: &[&str]) -> (Session, PathBuf) {
    let dir = tmpdir(tag);
    let sock = dir.join("vm.sock");
    let cmdline = format!("from={from} step={}", step_ms * ticks_per_ms(backend));
    let sock_s = sock.display().to_string();
    let mut args = vec![
        "run",
        "--backend",
        backend,
        "--api-sock",
        &sock_s,
        "--kernel",
        "guest:countdown.elf",
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    let s = Session::start(&args);
    wait_socket(&sock, &s);
    (s, sock)
}

fn pause_and_resume(backend: &str) {
    let step_ms = if backend == "emu" { 10 } else { 60 };
    let (mut s, sock) = start(&format!("pause-{backend}"), backend, 100_000, step_ms, &[]);
    let at = s.wait_for("countdown 99997 ", 0, Duration::from_secs(60));
    s.wait_for("\n", at, Duration::from_secs(10));
    let tsc_held = backend == "emu" || palacios::kvm::tsc_writable();
    // A host hiccup (a 2-core machine running other tests) in the one step that spans the
    // pause also shows as a jump: up to three pauses, the smallest jump counts.
    let mut jumps = Vec::new();
    for _ in 0..3 {
        let j = pause_once(&mut s, &sock, backend, step_ms);
        jumps.push(j);
        if j < 10.0 || !tsc_held {
            break;
        }
    }
    let jump_ms = jumps.iter().copied().fold(f64::INFINITY, f64::min);
    if !tsc_held {
        palacios::vmm::test_support::skip_machine(
            &test_name(),
            &format!(
                "this host's KVM ignores guest TSC writes, so its TSC ran on across the 2 s pause \
                 (+{jump_ms:.0} ms); output and guest time did stop"
            ),
        );
    } else {
        assert!(
            jump_ms < 10.0,
            "the TSC advanced {jumps:?} ms beyond one step across 2 s pauses"
        );
    }
    let (st, _) = api(&sock, "PUT", "/vm/stop", None);
    assert_eq!(st, 200);
    assert_eq!(
        s.wait_exit(Duration::from_secs(30)),
        130,
        "{}",
        s.describe()
    );
}

/// Pause for 2 s and resume: output and guest time stand still; the TSC's jump across the
/// pause beyond one step, in ms.
fn pause_once(s: &mut Session, sock: &Path, backend: &str, step_ms: u64) -> f64 {
    let sock = sock.to_path_buf();
    let (st, v) = api(&sock, "PUT", "/vm/pause", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "paused");
    std::thread::sleep(Duration::from_millis(200));
    let before = steps(&s.output());
    // The pause fell while this step's line was printed, or in the wait after it: the gap
    // from this step's TSC to the next one's spans the pause.
    let spanning = if s.output().ends_with('\n') {
        before.len() - 1
    } else {
        before.len()
    };
    let (_, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "paused", "{info}");
    let g0 = info["guest_ns"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let during = steps(&s.output());
    assert_eq!(
        before,
        during,
        "output went on while paused\n{}",
        s.describe()
    );
    let (_, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(
        info["guest_ns"].as_u64().unwrap(),
        g0,
        "guest time moved while paused"
    );
    let (st, v) = api(&sock, "PUT", "/vm/resume", None);
    assert_eq!((st, v["state"].as_str()), (200, Some("running")));
    let last = *before.last().unwrap();
    let next = format!("countdown {} ", last.0 - 2);
    let at = s.wait_for(&next, 0, Duration::from_secs(60));
    s.wait_for("\n", at, Duration::from_secs(10));
    let after = steps(&s.output());
    assert_eq!(after[before.len()].0, last.0 - 1, "the count continues");
    let gap = after[spanning + 1].1 - after[spanning].1;
    let step = step_ms * ticks_per_ms(backend);
    let jump_ms = gap.saturating_sub(step) as f64 / ticks_per_ms(backend) as f64;
    jump_ms
}

#[test]
fn pause_stops_output_and_guest_time_on_the_emulator() {
    pause_and_resume("emu");
}

#[test]
fn pause_stops_output_and_guest_time_on_kvm() {
    if kvm() {
        pause_and_resume("kvm");
    }
}

/// Save with --stop on `from`, load on `to`: the count continues and ends.
fn save_stop_load(from: &str, to: &str) {
    let step_ms = if from == "emu" { 10 } else { 40 };
    let count = if from == "emu" { 300 } else { 60 };
    let tag = format!("ssl-{from}-{to}");
    let (mut s, sock) = start(&tag, from, count, step_ms, &["--cpu", "portable"]);
    s.wait_for(
        &format!("countdown {} ", count - 5),
        0,
        Duration::from_secs(60),
    );
    let ck = sock.with_file_name("vm.ckpt");
    let (st, v) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(json!({"path": ck.display().to_string(), "stop": true})),
    );
    assert_eq!(st, 200, "{v}\n{}", s.describe());
    assert!(v["stored_bytes"].as_u64().unwrap() < v["ram_bytes"].as_u64().unwrap() / 100);
    assert_eq!(
        s.wait_exit(Duration::from_secs(30)),
        130,
        "{}",
        s.describe()
    );
    let before = s.output();
    let last = steps(&before).last().unwrap().0;
    assert!(last <= count - 4, "{}", s.describe());
    let ck_s = ck.display().to_string();
    let r = v3(&["load", &ck_s, "--backend", to], b"", LIMIT);
    assert_eq!(r.status, 0, "{}", r.out());
    assert!(
        !r.stdout.contains("countdown start"),
        "it restarted\n{}",
        r.out()
    );
    // The save may fall in the middle of a line: the two outputs join into one countdown,
    // every step once, in order.
    let joined = format!("{before}{}", r.stdout);
    let all: Vec<u32> = steps(&joined).iter().map(|s| s.0).collect();
    let want: Vec<u32> = (1..=count).rev().collect();
    assert_eq!(all, want, "the count must continue where it was\n{joined}");
    assert!(
        steps(&r.stdout).first().is_some_and(|f| f.0 <= last),
        "{}",
        r.out()
    );
    assert!(r.stdout.contains("countdown done"), "{}", r.out());
}

#[test]
fn save_stop_load_continues_on_the_emulator() {
    save_stop_load("emu", "emu");
}

#[test]
fn save_stop_load_continues_on_kvm_and_across_backends() {
    if !kvm() {
        return;
    }
    save_stop_load("kvm", "kvm");
    save_stop_load("emu", "kvm");
    save_stop_load("kvm", "emu");
}

/// The emulator with deterministic time: a run checkpointed mid-way and finished from the
/// checkpoint prints the same bytes and retires the same instructions as one that was not.
#[test]
fn deterministic_replay_across_a_checkpoint_is_exact() {
    let args = |sock: Option<&str>| {
        let mut a = vec![
            "run".to_string(),
            "--backend".into(),
            "emu".into(),
            "--clock".into(),
            "deterministic".into(),
            "--stats".into(),
            "--kernel".into(),
            "guest:countdown.elf".into(),
            "--cmdline".into(),
            "from=3000 step=2000000".into(),
        ];
        if let Some(s) = sock {
            a.extend(["--api-sock".into(), s.into()]);
        }
        a
    };
    let insns = |stderr: &str| -> u64 {
        stderr
            .lines()
            .find(|l| l.contains("emu instructions"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no instruction count in\n{stderr}"))
    };
    let whole: Vec<String> = args(None);
    let whole: Vec<&str> = whole.iter().map(String::as_str).collect();
    let a = v3(&whole, b"", LIMIT);
    assert_eq!(a.status, 0, "{}", a.out());

    let dir = tmpdir("determinism");
    let sock = dir.join("vm.sock");
    let ck = dir.join("vm.ckpt");
    let sock_s = sock.display().to_string();
    let first = args(Some(&sock_s));
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut s = Session::start(&first);
    wait_socket(&sock, &s);
    s.wait_for("countdown 2500 ", 0, Duration::from_secs(60));
    let (st, v) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(json!({"path": ck.display().to_string(), "stop": true})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.wait_exit(Duration::from_secs(30)), 130);
    let part1 = s.output();
    assert!(
        !part1.contains("countdown done"),
        "saved too late to test anything"
    );
    let ck_s = ck.display().to_string();
    let b = v3(&["load", &ck_s, "--stats"], b"", LIMIT);
    assert_eq!(b.status, 0, "{}", b.out());
    let joined = format!("{part1}{}", b.stdout);
    assert!(
        joined == a.stdout,
        "output differs from the uninterrupted run\n--- uninterrupted ({} bytes)\n...{}\n--- saved + loaded ({} bytes)\n...{}",
        a.stdout.len(),
        &a.stdout[a.stdout.len().saturating_sub(300)..],
        joined.len(),
        &joined[joined.len().saturating_sub(300)..]
    );
    assert_eq!(
        insns(&b.stderr),
        insns(&a.stderr),
        "retired instructions differ"
    );
}

/// Four cores with IPIs and timers in flight (the platform test kernel), checkpointed while it
/// runs: the restored VM finishes every test.
#[test]
fn smp_guest_checkpointed_mid_run_completes_after_load() {
    for b in backends() {
        smp_checkpoint(b);
    }
}

fn smp_checkpoint(backend: &str) {
    let dir = tmpdir(&format!("smp-{backend}"));
    let sock = dir.join("vm.sock");
    let ck = dir.join("vm.ckpt");
    let sock_s = sock.display().to_string();
    let mut s = Session::start(&[
        "run",
        "--backend",
        backend,
        "--cores",
        "4",
        "--api-sock",
        &sock_s,
        "--kernel",
        "guest:pctest.elf",
        "--cmdline",
        "cpus=4 ram_mib=128",
    ]);
    wait_socket(&sock, &s);
    // Past the SMP bring-up, in the middle of the tests.
    s.wait_for("PASS", 0, Duration::from_secs(60));
    let (st, v) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(json!({"path": ck.display().to_string(), "stop": true})),
    );
    if st != 200 && s.output().contains("pctest: done") {
        panic!("the guest finished before it could be saved: {v}");
    }
    assert_eq!(st, 200, "{v}\n{}", s.describe());
    assert_eq!(
        s.wait_exit(Duration::from_secs(30)),
        130,
        "{}",
        s.describe()
    );
    let ck_s = ck.display().to_string();
    let r = v3(&["load", &ck_s], b"", LIMIT);
    let all = format!("{}{}", s.output(), r.stdout);
    assert_eq!(
        r.status,
        1,
        "every platform test must pass after the restore\n{}",
        r.out()
    );
    assert!(!all.contains("FAIL"), "{all}");
    assert!(
        r.stdout.contains("PASS"),
        "the restored VM ran tests\n{}",
        r.out()
    );
}

/// Malformed, mismatched and corrupt checkpoints are refused with a message naming the
/// problem, before anything runs.
#[test]
fn bad_checkpoints_are_refused_before_anything_runs() {
    let (mut s, sock) = start("bad", "emu", 100_000, 10, &[]);
    s.wait_for("countdown 99999 ", 0, Duration::from_secs(60));
    let good = sock.with_file_name("good.ckpt");
    let (st, v) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(json!({"path": good.display().to_string(), "stop": true})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.wait_exit(Duration::from_secs(30)), 130);
    let bytes = std::fs::read(&good).unwrap();
    let dir = good.parent().unwrap().to_path_buf();
    let expect = |name: &str, data: &[u8], needle: &str| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let r = v3(&["load", &p.display().to_string()], b"", LIMIT);
        assert_eq!(r.status, 2, "{name}\n{}", r.out());
        assert!(
            r.stderr.contains(needle),
            "{name}: no {needle:?}\n{}",
            r.out()
        );
        assert!(r.stdout.is_empty(), "{name}: the guest ran\n{}", r.out());
    };
    // A flipped byte in the memory image, in the metadata, in the header.
    let o = palacios_checkpoint::open(&good, &mut |_, _| {}).unwrap();
    let data_at = (o.mem_offset + o.meta.memory.extents[0].0 + 17) as usize;
    for (i, at) in [data_at, bytes.len() - 20, 50].into_iter().enumerate() {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        expect(&format!("flip{i}.ckpt"), &b, "corrupt");
    }
    expect("trunc.ckpt", &bytes[..bytes.len() / 2], "truncated");
    expect("tiny.ckpt", &bytes[..20], "truncated");
    let mut newer = bytes.clone();
    newer[10] = 9; // minor version 9
    expect("newer.ckpt", &newer, "newer than this build reads");
    expect(
        "junk.ckpt",
        b"GIF89a this is not a checkpoint at all, not even close.....",
        "not a Palacios-rs checkpoint",
    );
    // Rewrite the checkpoint with a changed metadata (a valid CRC) to test what follows it.
    let rewrite = |name: &str, f: &dyn Fn(&mut palacios_checkpoint::Meta)| -> PathBuf {
        struct Img<'a>(&'a std::fs::File, u64, &'a [(u64, u64)]);
        impl palacios_checkpoint::MemorySource for Img<'_> {
            fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
                let mut at = 0;
                for &(g, n) in self.2 {
                    if gpa >= g && gpa < g + n {
                        return std::os::unix::fs::FileExt::read_exact_at(
                            self.0,
                            buf,
                            self.1 + at + gpa - g,
                        );
                    }
                    at += n;
                }
                Err(std::io::Error::other("outside"))
            }
        }
        let mut meta = o.meta.clone();
        f(&mut meta);
        let p = dir.join(name);
        let slots = o.meta.memory.slots.clone();
        palacios_checkpoint::store("file")
            .unwrap()
            .save(
                &p,
                meta,
                &Img(&o.memory, o.mem_offset, &slots),
                &mut |_, _| {},
            )
            .unwrap();
        p
    };
    let run = |p: &Path, needle: &str| {
        let r = v3(&["load", &p.display().to_string()], b"", LIMIT);
        assert_eq!(r.status, 2, "{}", r.out());
        assert!(r.stderr.contains(needle), "no {needle:?}\n{}", r.out());
        assert!(r.stdout.is_empty(), "the guest ran\n{}", r.out());
    };
    let p = rewrite("unknown.ckpt", &|m| {
        m.sections.push(palacios_checkpoint::Section {
            kind: "gpu".into(),
            id: "0".into(),
            class: String::new(),
            version: 1,
            state: json!({}),
        })
    });
    run(&p, "unknown section kind 'gpu'");
    // A checkpoint from a VM with another device set: one more device than this VM has,
    // and one device missing.
    let p = rewrite("extra-dev.ckpt", &|m| {
        m.sections.push(palacios_checkpoint::Section {
            kind: "device".into(),
            id: "nic0".into(),
            class: "RTL8139".into(),
            version: 1,
            state: json!({}),
        })
    });
    run(
        &p,
        "state for device 'nic0' (class RTL8139), which this VM does not have",
    );
    let p = rewrite("missing-dev.ckpt", &|m| {
        m.sections
            .retain(|s| !(s.kind == "device" && s.class == "8254_PIT"))
    });
    run(&p, "no state for device");
    let p = rewrite("bad-version.ckpt", &|m| {
        for s in m.sections.iter_mut().filter(|s| s.class == "8254_PIT") {
            s.version = 99;
        }
    });
    run(&p, "state version 99 is not supported");
    let p = rewrite("bad-cores.ckpt", &|m| {
        m.sections.retain(|s| s.kind != "core")
    });
    run(&p, "the checkpoint has 0 cores, the VM 1");
}

/// `kill -9` during a save leaves the previous checkpoint loadable.
#[test]
fn kill_during_a_save_leaves_the_previous_checkpoint() {
    let dir = tmpdir("kill");
    // 160 MiB of non-zero module data makes the save take a while.
    let module = dir.join("noise.bin");
    {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut v = vec![0u8; 160 << 20];
        for c in v.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        std::fs::write(&module, v).unwrap();
    }
    let sock = dir.join("vm.sock");
    let sock_s = sock.display().to_string();
    let m = module.display().to_string();
    let mut s = Session::start(&[
        "run",
        "--backend",
        "emu",
        "--mem",
        "512",
        "--api-sock",
        &sock_s,
        "--kernel",
        "guest:countdown.elf",
        "--cmdline",
        "from=100000 step=20000000",
        "--module",
        &m,
    ]);
    wait_socket(&sock, &s);
    s.wait_for("countdown 99999 ", 0, Duration::from_secs(60));
    let ck = dir.join("vm.ckpt");
    let (st, v) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(json!({"path": ck.display().to_string()})),
    );
    assert_eq!(st, 200, "{v}");
    let first_ms = v["total_ms"].as_u64().unwrap();
    let good = std::fs::read(&ck).unwrap();
    // A second save, killed part-way.
    let sock2 = sock.clone();
    let ck2 = ck.clone();
    let saver = std::thread::spawn(move || {
        palacios_api::request(
            &sock2,
            "PUT",
            "/snapshot/create",
            Some(&json!({"path": ck2.display().to_string()})),
            Duration::from_secs(60),
        )
    });
    std::thread::sleep(Duration::from_millis((first_ms / 4).clamp(5, 100)));
    s.kill9();
    let finished = matches!(saver.join(), Ok(Ok((200, _))));
    if finished {
        // The save beat the kill: the new checkpoint replaced the old one whole (it must load).
        palacios::vmm::test_support::visible(&format!(
            "note: {}: the second save finished before the kill ({first_ms} ms saves);              checking that it replaced the first whole",
            test_name()
        ));
    } else {
        assert_eq!(std::fs::read(&ck).unwrap(), good, "the checkpoint changed");
    }
    // It loads and runs: stop it through its own API after it printed.
    let sock3 = dir.join("c.sock");
    let sock3_s = sock3.display().to_string();
    let ck_s = ck.display().to_string();
    let mut l = Session::start(&["load", &ck_s, "--api-sock", &sock3_s]);
    wait_socket(&sock3, &l);
    l.wait_for("countdown ", 0, Duration::from_secs(60));
    api(&sock3, "PUT", "/vm/stop", None);
    assert_eq!(
        l.wait_exit(Duration::from_secs(30)),
        130,
        "{}",
        l.describe()
    );
}

/// Nothing a client sends can hurt the VM: malformed, oversized and unknown requests get a
/// JSON error and the VM keeps running.
#[test]
fn the_api_answers_bad_requests_with_json_errors() {
    use std::io::{Read, Write};
    let (mut s, sock) = start("api", "emu", 100_000, 10, &[]);
    s.wait_for("countdown 99999 ", 0, Duration::from_secs(60));
    let raw = |bytes: &[u8]| -> String {
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(bytes);
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    for (req, status) in [
        (&b"HELLO\r\n\r\n"[..], "400"),
        (b"GET /vm HTTP/3\r\n\r\n", "501"),
        (b"GET /nope HTTP/1.1\r\n\r\n", "404"),
        (b"DELETE /vm HTTP/1.1\r\n\r\n", "405"),
        (
            b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope",
            "400",
        ),
        (
            b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            "413",
        ),
        (
            b"GET /vm/memory?addr=0xffffffffffff&len=16 HTTP/1.1\r\n\r\n",
            "400",
        ),
        (b"GET /vm/memory?addr=0&len=999999 HTTP/1.1\r\n\r\n", "400"),
        (b"GET /vm/cores/7 HTTP/1.1\r\n\r\n", "404"),
    ] {
        let out = raw(req);
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status} ")),
            "{req:?} -> {out}"
        );
        assert!(out.contains("{\"error\":"), "{out}");
    }
    let mut big = b"GET /vm HTTP/1.1\r\nX: ".to_vec();
    big.extend(vec![b'a'; 20_000]);
    assert!(raw(&big).starts_with("HTTP/1.1 431 "));
    // A client that connects and says nothing, and one that hangs up mid-request.
    let idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    drop(std::os::unix::net::UnixStream::connect(&sock).map(|mut c| c.write_all(b"GET /vm HT")));
    let (st, v) = api(&sock, "GET", "/vm", None);
    assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
    let (st, v) = api(&sock, "GET", "/vm/memory?addr=0x100000&len=16", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["hex"].as_str().unwrap().len(), 32);
    let (st, v) = api(&sock, "GET", "/vm/cores/0", None);
    assert_eq!(st, 200, "{v}");
    assert!(v["regs"]["rip"].as_u64().unwrap() > 0x100000, "{v}");
    drop(idle);
    let before = steps(&s.output()).len();
    s.wait_for(
        &format!("countdown {} ", 100_000 - before as u32 - 2),
        0,
        Duration::from_secs(30),
    );
    api(&sock, "PUT", "/vm/stop", None);
    assert_eq!(s.wait_exit(Duration::from_secs(30)), 130);
}
