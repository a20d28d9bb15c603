//! Extensions, hypercalls and symbiotic interfaces (docs/hypercalls.md): the symtest guest's
//! hypercall checks and SymCalls on both backends, SymMod, time dilation, extensions from XML
//! (MTRRS, VMWARE_IFACE, inspector) on the Linux guest with a checkpoint round trip, and the
//! Linux guest's SymSpy page read through the API.

mod common;
use common::*;

use std::path::Path;
use std::time::Duration;

use serde_json::json;

/// A small-guest config: the standard PC, `extra` top-level elements, symtest with `cmdline`.
fn symtest_config(dir: &Path, backend: &str, extra: &str, cmdline: &str) -> std::path::PathBuf {
    let devices: String = palacios::platform::standard_devices()
        .iter()
        .map(|d| format!("<device class=\"{}\" id=\"{}\"/>", d.class, d.id))
        .collect();
    let cfg = format!(
        "<vm class=\"PC\"><memory>64</memory><backend>{backend}</backend>{extra}\
         <devices>{devices}</devices>\
         <boot kernel=\"{}\" cmdline=\"{cmdline}\"/></vm>",
        guest("symtest.elf").display()
    );
    let p = dir.join(format!("symtest-{backend}.xml"));
    std::fs::write(&p, cfg).unwrap();
    p
}

#[test]
fn hypercalls_answer_on_both_backends_and_refuse_bad_pointers() {
    for b in backends() {
        let r = v3(
            &[
                "run",
                "--backend",
                b,
                "--kernel",
                guest("symtest.elf").to_str().unwrap(),
                "--cmdline",
                "test=hcall",
            ],
            b"",
            Duration::from_secs(120),
        );
        assert_eq!(r.status, 3, "{b}: {}", r.out());
        assert!(!r.stdout.contains("FAIL"), "{b}: {}", r.out());
        // The guest's checks: TEST, an unknown id, GUEST_INFO and OS_DEBUG with bad pointers
        // and lengths, TIME_CPUFREQ, TIME_RDHTSC, SYMCALL_RET outside a SymCall.
        for what in [
            "PASS test sum doorbell",
            "PASS unknown id",
            "PASS guest info bad pointer",
            "PASS guest info huge length",
            "PASS os debug bad pointer",
            "PASS os debug long",
            "PASS time cpufreq",
            "PASS symcall ret outside a symcall",
        ] {
            assert!(r.stdout.contains(what), "{b}: no '{what}'\n{}", r.out());
        }
        assert!(
            r.stdout.contains(&format!("info: backend={b}")),
            "{}",
            r.out()
        );
        assert!(
            r.stderr.contains("os_debug: hello from symtest"),
            "{}",
            r.out()
        );
        if b == "emu" {
            assert!(
                r.stdout.contains("PASS test sum vmcall")
                    && r.stdout.contains("PASS test sum vmmcall"),
                "{}",
                r.out()
            );
        } else {
            assert!(r.stdout.contains("SKIP vmcall"), "{}", r.out());
        }
    }
}

#[test]
fn symcalls_run_in_guest_context_and_leave_the_guest_as_it_was() {
    for b in backends() {
        let dir = tmpdir(&format!("symcall-{b}"));
        let sock = dir.join("vm.sock");
        let mut s = Session::start(&[
            "run",
            "--backend",
            b,
            "--api-sock",
            sock.to_str().unwrap(),
            "--kernel",
            guest("symtest.elf").to_str().unwrap(),
            "--cmdline",
            "test=symcall",
        ]);
        wait_socket(&sock, &s);
        let at = s.wait_for("READY symcall", 0, Duration::from_secs(60));
        let call = |c: u64, args: &[u64], timeout: u64| {
            api(
                &sock,
                "PUT",
                "/vm/symcall",
                Some(json!({"call": c, "args": args, "timeout_ms": timeout})),
            )
        };
        // An upcall computing from its five arguments.
        let (st, v) = call(1, &[1, 2, 3, 4, 5], 5000);
        assert_eq!(st, 200, "{b}: {v}\n{}", s.describe());
        assert_eq!(v["status"], 0);
        assert_eq!(v["results"], json!([1023, 1, 1, 0]), "{b}: {v}");
        // A second SymCall while one runs on the core is refused; the first completes.
        let sock2 = sock.clone();
        let slow = std::thread::spawn(move || {
            api(
                &sock2,
                "PUT",
                "/vm/symcall",
                Some(json!({"call": 2, "args": [400], "timeout_ms": 5000})),
            )
        });
        std::thread::sleep(Duration::from_millis(150));
        let (st, v) = call(1, &[9], 5000);
        assert_eq!(st, 409, "{b}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("nesting is refused"),
            "{v}"
        );
        let (st, v) = slow.join().unwrap();
        assert_eq!((st, &v["results"][0]), (200, &json!(400)), "{b}: {v}");
        // A faulting upcall (ud2; the guest's handler reports SYMCALL_ERR with the vector).
        let (st, v) = call(3, &[], 5000);
        assert_eq!(st, 422, "{b}: {v}");
        assert!(v["error"].as_str().unwrap().contains("code 0x6"), "{v}");
        // An upcall that never returns is stopped at its timeout.
        let (st, v) = call(4, &[], 300);
        assert_eq!(st, 504, "{b}: {v}");
        // Call 0 is the guest's null upcall: straight back, ECX..EDI as they went in.
        let (_, v) = call(0, &[1, 2, 3, 4, 5], 5000);
        assert_eq!(
            (&v["status"], &v["results"]),
            (&json!(0), &json!([2, 3, 4, 5])),
            "{v}"
        );
        // Unknown call numbers are the guest's business: it answers status 0xee.
        let (_, v) = call(99, &[], 5000);
        assert_eq!(v["status"], 0xee, "{v}");
        // SymMod: the VMM queues a code blob, the upcall fetches it and runs it:
        // mov eax,[esp+4]; imul eax,eax,3; add eax,7; ret
        let blob = "8b4424046bc00383c007c3";
        let (st, v) = api(&sock, "PUT", "/vm/symmod", Some(json!({ "hex": blob })));
        assert_eq!(st, 200, "{v}");
        let (_, v) = call(5, &[10], 5000);
        assert_eq!(
            (&v["status"], &v["results"][0]),
            (&json!(0), &json!(37)),
            "{b}: {v}"
        );
        let (st, _) = api(&sock, "PUT", "/vm/symmod", Some(json!({ "hex": "abc" })));
        assert_eq!(st, 400);
        let (st, _) = api(
            &sock,
            "PUT",
            "/vm/symcall",
            Some(json!({ "call": 1, "args": [1, 2, 3, 4, 5, 6] })),
        );
        assert_eq!(st, 400);
        // The idle loop the SymCalls interrupted kept its registers, and runs on.
        s.send_raw(b"q");
        s.wait_for("idle: ok", at, Duration::from_secs(30));
        let out = s.output();
        assert!(
            // Calls 1, 2, 3, 4, 99 and 5 entered the guest; the refused one did not.
            out.contains("symtest: upcalls=6"),
            "{b}: every upcall counted\n{}",
            s.describe()
        );
        assert_eq!(s.wait_exit(Duration::from_secs(30)), 3, "{}", s.describe());
    }
}

#[test]
fn time_dilation_slows_every_guest_clock_on_the_emulator() {
    let dir = tmpdir("dilation");
    let cfg = symtest_config(
        &dir,
        "emu",
        "<time source=\"tsc\" dilation=\"2\" khz=\"1000000\"/>",
        "test=time",
    );
    let mut s = Session::start(&["run", cfg.to_str().unwrap()]);
    let at = s.wait_for("TIME ready", 0, Duration::from_secs(60));
    s.send_raw(b"a");
    std::thread::sleep(Duration::from_millis(1000));
    s.send_raw(b"b");
    assert_eq!(s.wait_exit(Duration::from_secs(30)), 3, "{}", s.describe());
    let out = s.output()[at..].to_string();
    let line = out
        .lines()
        .find(|l| l.starts_with("TIME tsc_us="))
        .unwrap_or_else(|| panic!("{}", s.describe()));
    let val = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in '{line}'"))
    };
    // The guest TSC runs at the configured 1 GHz (TIME_CPUFREQ says so, and the guest's TSC
    // figure, computed with CPUID's kHz, agrees with the PM timer's).
    assert_eq!(val("khz="), 1_000_000, "{line}");
    // 1 s of host time is 0.5 s for the guest, by its TSC and by the ACPI PM timer (the
    // bytes' arrival jitters by a few ms).
    for k in ["tsc_us=", "pm_us="] {
        let us = val(k);
        assert!(
            (430_000..=600_000).contains(&us),
            "{k}{us}: not about half of 1 s\n{line}"
        );
    }
    // KVM runs the TSC at host speed: dilation is refused with the reason.
    if kvm() {
        let cfg = symtest_config(&dir, "kvm", "<time dilation=\"2\"/>", "test=time");
        let r = v3(
            &["run", cfg.to_str().unwrap()],
            b"",
            Duration::from_secs(60),
        );
        assert_eq!(r.status, 2, "{}", r.out());
        assert!(
            r.stderr.contains("time dilation needs the emulator"),
            "{}",
            r.out()
        );
        // A TSC frequency KVM either runs (the guest sees it in CPUID) or refuses as a config
        // error with the reason (this project's software KVM cannot scale the TSC).
        let cfg = symtest_config(&dir, "kvm", "<time khz=\"1500000\"/>", "test=hcall");
        let r = v3(
            &["run", cfg.to_str().unwrap()],
            b"",
            Duration::from_secs(60),
        );
        if r.status == 3 {
            assert!(r.stdout.contains("tsc_khz=1500000"), "{}", r.out());
        } else {
            assert_eq!(r.status, 2, "{}", r.out());
            assert!(
                r.stderr
                    .contains("KVM cannot run the guest TSC at 1500000 kHz"),
                "{}",
                r.out()
            );
        }
    }
}

#[test]
fn extensions_are_listed_and_unknown_names_refused() {
    let r = v3(&["extensions"], b"", Duration::from_secs(30));
    assert_eq!(r.status, 0, "{}", r.out());
    for n in ["MTRRS", "VMWARE_IFACE", "inspector"] {
        assert!(r.stdout.contains(n), "{n} not listed\n{}", r.out());
    }
    let dir = tmpdir("ext-errors");
    let cfg = symtest_config(
        &dir,
        "emu",
        "<extensions><extension name=\"NOPE\"/></extensions>",
        "",
    );
    let r = v3(
        &["check", cfg.to_str().unwrap()],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(r.status, 2, "{}", r.out());
    assert!(
        r.stderr
            .contains("unknown extension 'NOPE' (known: MTRRS, VMWARE_IFACE, code_inject, concord, env_inject, guard_mods, inspector, syscall_intercept)"),
        "{}",
        r.out()
    );
    let cfg = symtest_config(
        &dir,
        "emu",
        "<extensions><extension name=\"MTRRS\" default=\"wt\"/></extensions>",
        "",
    );
    let r = v3(
        &["check", cfg.to_str().unwrap()],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(r.status, 2, "{}", r.out());
    assert!(
        r.stderr.contains("'default' must be none or wb"),
        "{}",
        r.out()
    );
}

/// One Linux boot: VMWARE_IFACE gives the kernel its TSC frequency, MTRRS takes the kernel's
/// MTRR writes, the inspector shows them, a checkpoint carries them, and the guest's SymSpy
/// page is read through the API.
#[test]
fn linux_guest_uses_the_extensions_and_publishes_a_symspy_page() {
    let Some((kernel, initrd, release)) = linux_guest() else {
        return;
    };
    let dir = tmpdir("linux-sym");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let helpers = std::process::Command::new("bash")
        .arg(root.join("scripts/build-linux-helpers.sh"))
        .arg(&dir)
        .output()
        .expect("run build-linux-helpers.sh");
    if !helpers.status.success() {
        palacios::vmm::test_support::missing_prerequisite(
            &test_name(),
            &format!(
                "scripts/build-linux-helpers.sh failed: {}",
                String::from_utf8_lossy(&helpers.stderr)
            ),
        );
        return;
    }
    let mut initrd_all = std::fs::read(&initrd).unwrap();
    initrd_all.extend(std::fs::read(dir.join("helpers.cpio.gz")).unwrap());
    let combined = dir.join("initrd");
    std::fs::write(&combined, initrd_all).unwrap();
    let sock = dir.join("vm.sock");
    let cfg = dir.join("linux.xml");
    let config = |kernel: &Path, initrd: &Path| {
        format!(
            r#"<vm class="PC"><memory>256</memory><backend>emu</backend>
  <extensions><extension name="MTRRS" default="wb"/><extension name="VMWARE_IFACE"/><extension name="inspector"/></extensions>
  <devices><device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/><device class="LAPIC" id="lapic"/>
  <device class="IOAPIC" id="ioapic"/><device class="NVRAM" id="nvram"/><device class="KEYBOARD" id="keyboard"/>
  <device class="PM_TIMER" id="pm_timer"/><device class="ACPI" id="acpi"/><device class="SERIAL" id="serial"/></devices>
  <boot format="linux" kernel="{}" initrd="{}" cmdline="console=ttyS0 nokaslr cryptomgr.notests"/></vm>"#,
            kernel.display(),
            initrd.display()
        )
    };
    std::fs::write(&cfg, config(&kernel, &combined)).unwrap();
    let mut s = Session::start(&[
        "run",
        cfg.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(200));
    let out = s.output();
    assert!(
        out.contains("Hypervisor detected: VMware"),
        "{}",
        s.describe()
    );
    assert!(
        out.contains("TSC freq read from hypervisor : 2000.000 MHz"),
        "{}",
        s.describe()
    );
    let mut at = s.wait_for("# ", ready, Duration::from_secs(60));
    // The kernel programs a variable MTRR through /proc/mtrr; the VMM's MTRRS keeps it.
    s.send(
        "echo 'base=0x4000000 size=0x1000000 type=write-combining' > /proc/mtrr; cat /proc/mtrr",
    );
    at = s.wait_for("count=1: write-combining", at, Duration::from_secs(60));
    let (st, tree) = api(&sock, "GET", "/vm/inspect", None);
    assert_eq!(st, 200, "{tree}");
    let var = &tree["extensions"]["MTRRS"][0]["var"];
    assert_eq!(
        (var[0].as_u64(), var[1].as_u64().map(|m| m & 0x800)),
        (Some(0x400_0001), Some(0x800)),
        "{tree}"
    );
    assert!(
        tree["extensions"]["VMWARE_IFACE"]["backdoor_calls"]
            .as_u64()
            .unwrap()
            >= 1,
        "{tree}"
    );
    assert!(
        tree["devices"]["serial"]["state"][0]["lcr"].is_u64(),
        "{tree}"
    );
    assert_eq!(tree["vm"]["backend"], "emu");
    // SymSpy: the guest's helper registers a page and publishes; the VMM reads it.
    s.send("/bin/symspy publish");
    s.wait_for("symspy: published", at, Duration::from_secs(60));
    let out = s.output();
    assert!(
        out.contains("symspy: vmm vmm=palacios-rs"),
        "{}",
        s.describe()
    );
    assert!(out.contains("symspy: vmm backend=emu"), "{}", s.describe());
    let (st, v) = api(&sock, "GET", "/vm/symspy", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["guest"]["kernel"], json!(release), "{v}");
    assert!(
        v["guest"]["pid"].as_str().unwrap().parse::<u32>().unwrap() > 1,
        "{v}"
    );
    assert!(v["guest_seq"].as_u64().unwrap() >= 1, "{v}");
    // A checkpoint carries the extensions' state: the restored VM has the same MTRR.
    let ck = dir.join("linux.ckpt");
    let (st, v) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(json!({ "path": ck, "stop": true })),
    );
    assert_eq!(st, 200, "{v}");
    s.wait_exit(Duration::from_secs(60));
    let sock2 = dir.join("vm2.sock");
    let mut l = load_vm(&ck, &sock2, &[]);
    let (st, tree2) = api(&sock2, "GET", "/vm/inspect", None);
    assert_eq!(st, 200, "{tree2}");
    assert_eq!(
        tree2["extensions"]["MTRRS"], tree["extensions"]["MTRRS"],
        "{tree2}"
    );
    let (st, v) = api(&sock2, "GET", "/vm/symspy", None);
    assert_eq!((st, &v["guest"]["kernel"]), (200, &json!(release)), "{v}");
    l.send("cat /proc/mtrr");
    l.wait_for("count=1: write-combining", 0, Duration::from_secs(60));
    let _ = api(&sock2, "PUT", "/vm/stop", None);
    l.wait_exit(Duration::from_secs(60));
}
