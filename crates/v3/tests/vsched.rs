//! VSched: per-vCPU (period, slice) reservations. A 2-core pctest guest keeps both cores busy
//! while two host threads hog the 2-core host; each vCPU thread gets its reservation's share
//! of CPU, an over-committed request is refused with the numbers, and a change at run time
//! takes effect.

mod common;
use common::*;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The tests measure CPU time: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sched(sock: &std::path::Path) -> Value {
    let (st, v) = api(sock, "GET", "/vm/sched", None);
    assert_eq!(st, 200, "{v}");
    v
}

/// (cpu ns, wall ns) of each core.
fn times(v: &Value) -> Vec<(f64, f64)> {
    v["cores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["cpu_ns"].as_f64().unwrap(),
                c["wall_ns"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Each core's utilization between two reports.
fn utilization(a: &Value, b: &Value) -> Vec<f64> {
    times(a)
        .iter()
        .zip(times(b))
        .map(|((c0, w0), (c1, w1))| (c1 - c0) / (w1 - w0).max(1.0))
        .collect()
}

#[test]
fn reservations_hold_beside_a_cpu_hog_and_change_at_run_time() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("vsched");
    let devices: String = palacios::platform::standard_devices()
        .iter()
        .map(|d| format!("<device class=\"{}\" id=\"{}\"/>", d.class, d.id))
        .collect();
    let cfg = dir.join("vsched.xml");
    std::fs::write(
        &cfg,
        format!(
            "<vm class=\"PC\"><memory>64</memory><backend>emu</backend>\
             <cores count=\"2\"><core period=\"10000\" slice=\"3000\"/><core period=\"20000\" slice=\"10000\"/></cores>\
             <devices>{devices}</devices>\
             <boot kernel=\"{}\" cmdline=\"test=smp cpus=2 spin=30\"/></vm>",
            guest("pctest.elf").display()
        ),
    )
    .unwrap();
    // An over-committed config is refused before anything runs, with the numbers.
    let over = dir.join("over.xml");
    std::fs::write(
        &over,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(
                "<core period=\"20000\" slice=\"10000\"/>",
                "<core period=\"20000\" slice=\"20000\"/>",
            )
            .replace("slice=\"3000\"", "slice=\"10000\""),
    )
    .unwrap();
    let r = v3(
        &["check", over.to_str().unwrap()],
        b"",
        Duration::from_secs(30),
    );
    let (limit, _) = palacios::vmm::sched::host_limit();
    if limit < 2.0 {
        assert_eq!(r.status, 2, "{}", r.out());
        assert!(
            r.stderr.contains("the reservations need 2.000 CPUs"),
            "{}",
            r.out()
        );
    }

    let sock = dir.join("vm.sock");
    let mut s = Session::start(&[
        "run",
        cfg.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    s.wait_for("pctest: spinning", 0, Duration::from_secs(60));
    let v = sched(&sock);
    let mech = v["cores"][0]["mechanism"].as_str().unwrap().to_string();
    if mech != "sched_deadline" {
        palacios::vmm::test_support::skip_machine(
            &test_name(),
            &format!(
                "SCHED_DEADLINE is not available here ({}); the user-level throttle only caps",
                v["cores"][0]["fallback_reason"]
            ),
        );
    }
    // Two host threads that want all of both CPUs.
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..100_000u64 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                    }
                }
                std::hint::black_box(x);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let a = sched(&sock);
    std::thread::sleep(Duration::from_secs(5));
    let b = sched(&sock);
    let u = utilization(&a, &b);
    let within = |got: f64, want: f64| (got - want).abs() <= 0.1 * want;
    if mech == "sched_deadline" {
        assert!(
            within(u[0], 0.3) && within(u[1], 0.5),
            "utilization {u:?}\n{b}"
        );
    } else {
        assert!(u[0] <= 0.33 && u[1] <= 0.55, "utilization {u:?}\n{b}");
    }
    // Periods are counted (5 s of 10 ms and 20 ms periods) and misses with them.
    let periods = |v: &Value, c: usize| v["cores"][c]["periods"].as_u64().unwrap();
    assert!(periods(&b, 0) - periods(&a, 0) >= 400, "{a}\n{b}");
    assert!(periods(&b, 1) - periods(&a, 1) >= 200, "{a}\n{b}");
    assert!(b["cores"][0]["misses"].is_u64(), "{b}");

    // An over-committed change is refused with the numbers and changes nothing.
    let (st, v) = api(
        &sock,
        "PUT",
        "/vm/sched",
        Some(json!({"period_us": 10000, "slice_us": 10000})),
    );
    if limit < 2.0 {
        assert_eq!(st, 409, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("need 2.000 CPUs") && e.contains("host allows"),
            "{e}"
        );
        assert_eq!(sched(&sock)["cores"][0]["reservation"]["slice_us"], 3000);
    }
    let (st, v) = api(
        &sock,
        "PUT",
        "/vm/sched",
        Some(json!({"cpu": 9, "period_us": 10000, "slice_us": 1000})),
    );
    assert_eq!(st, 404, "{v}");
    let (st, v) = api(
        &sock,
        "PUT",
        "/vm/sched",
        Some(json!({"cpu": 0, "period_us": 10000})),
    );
    assert_eq!(st, 400, "{v}");

    // A change at run time (through the v3 verb) takes effect.
    let r = v3(
        &[
            "sched",
            sock.to_str().unwrap(),
            "--cpu",
            "0",
            "--period",
            "10000",
            "--slice",
            "6000",
        ],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(r.status, 0, "{}", r.out());
    let t = Instant::now();
    while sched(&sock)["cores"][0]["reservation"]["slice_us"] != 6000 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let a = sched(&sock);
    std::thread::sleep(Duration::from_secs(3));
    let b = sched(&sock);
    let u = utilization(&a, &b);
    if mech == "sched_deadline" {
        assert!(
            within(u[0], 0.6) && within(u[1], 0.5),
            "utilization {u:?}\n{b}"
        );
    } else {
        assert!(u[0] <= 0.66, "utilization {u:?}\n{b}");
    }
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    let (st, _) = api(&sock, "PUT", "/vm/stop", None);
    assert_eq!(st, 200);
}

fn pctest_config(
    dir: &std::path::Path,
    name: &str,
    extra: &str,
    cmdline: &str,
) -> std::path::PathBuf {
    let devices: String = palacios::platform::standard_devices()
        .iter()
        .map(|d| format!("<device class=\"{}\" id=\"{}\"/>", d.class, d.id))
        .collect();
    let p = dir.join(format!("{name}.xml"));
    std::fs::write(
        &p,
        format!(
            "<vm class=\"PC\"><memory>64</memory><backend>emu</backend>{extra}\
             <devices>{devices}</devices><boot kernel=\"{}\" cmdline=\"{cmdline}\"/></vm>",
            guest("pctest.elf").display()
        ),
    )
    .unwrap();
    p
}

/// Run v3 to its end; (status, stdout+stderr, CPU seconds it used).
fn run_timed(cfg: &std::path::Path, extra: &[&str]) -> (i32, String, f64) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_v3"));
    cmd.arg("run").arg(cfg).args(extra);
    cmd.stdin(std::process::Stdio::null());
    let out_path = cfg.with_extension("out");
    let f = std::fs::File::create(&out_path).unwrap();
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    let child = cmd.spawn().unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it and `status` for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for the child we spawned; the pointers are to live locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32);
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (
        code,
        std::fs::read_to_string(&out_path).unwrap(),
        secs(ru.ru_utime) + secs(ru.ru_stime),
    )
}

/// Palacios' yield policy (`<perftune>`): a greedy core spins through the guest's idle time,
/// a friendly one sleeps; and `<schedule_hz>` brings a busy core back to its loop that often.
#[test]
fn yield_policy_and_schedule_hz_are_honoured() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("perftune");
    let idle = |name: &str, strategy: &str| {
        let cfg = pctest_config(
            &dir,
            name,
            &format!(
                "<perftune><group name=\"yield\"><strategy>{strategy}</strategy></group></perftune>"
            ),
            "bench=idle ms=1500",
        );
        let (st, out, cpu) = run_timed(&cfg, &[]);
        assert_eq!(st, 1, "{out}");
        assert!(out.contains("pctest: bench idle done"), "{out}");
        cpu
    };
    let friendly = idle("friendly", "friendly");
    let greedy = idle("greedy", "greedy");
    assert!(
        greedy > 1.0,
        "a greedy core spins through 1.5 s of idle: {greedy} s of CPU"
    );
    assert!(
        friendly < 0.6 * greedy,
        "friendly {friendly} s, greedy {greedy} s"
    );

    let spin = |name: &str, extra: &str| {
        let cfg = pctest_config(&dir, name, extra, "spin=2");
        let (st, out, _) = run_timed(&cfg, &["--stats"]);
        assert_eq!(st, 1, "{out}");
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with("interrupted"))
            .unwrap_or("interrupted 0");
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let plain = spin("plain", "");
    let ticked = spin("ticked", "<schedule_hz>200</schedule_hz>");
    // 2 s at 200 Hz: about 400 returns to the loop beside what the emulator makes anyway.
    assert!(
        ticked >= plain + 200,
        "schedule_hz 200: {ticked} returns, without: {plain}"
    );
}
