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
