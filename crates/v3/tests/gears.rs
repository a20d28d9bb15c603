//! GEARS services and guarded modules on the stock Debian kernel (docs/gears.md), on the
//! emulator: one boot for system-call interception, environment and code injection (with a
//! checkpoint round trip), one for guarded modules. The guest pieces (gears.ko, guarded.ko,
//! attacker.ko, the user programs and the code blobs) are built by scripts/build-gears-guest.sh
//! against Debian's linux-headers package for the guest's exact kernel.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A VM config with `extensions` booting the guest kernel with the GEARS overlay appended to
/// its initramfs: (config path, the build directory of the guest pieces).
fn gears_guest(tag: &str, extensions: &str) -> Option<(PathBuf, PathBuf)> {
    let (kernel, initrd, _) = linux_guest()?;
    let dir = tmpdir(tag);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out_dir = root.join("target/gears-guest");
    let b = std::process::Command::new("bash")
        .arg(root.join("scripts/build-gears-guest.sh"))
        .arg(&out_dir)
        .output()
        .expect("run build-gears-guest.sh");
    if !b.status.success() {
        palacios::vmm::test_support::missing_prerequisite(
            &test_name(),
            &format!(
                "scripts/build-gears-guest.sh failed ({}): {}",
                b.status,
                String::from_utf8_lossy(&b.stderr)
            ),
        );
        return None;
    }
    let mut all = std::fs::read(&initrd).unwrap();
    all.extend(std::fs::read(out_dir.join("gears.cpio.gz")).unwrap());
    let combined = dir.join("initrd");
    std::fs::write(&combined, all).unwrap();
    let cfg = dir.join("gears.xml");
    std::fs::write(&cfg, config(&kernel, &combined, extensions)).unwrap();
    Some((cfg, out_dir))
}

fn config(kernel: &Path, initrd: &Path, extensions: &str) -> String {
    format!(
        r#"<vm class="PC"><memory>256</memory><backend>emu</backend>
  <extensions>{extensions}</extensions>
  <devices><device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/><device class="LAPIC" id="lapic"/>
  <device class="IOAPIC" id="ioapic"/><device class="NVRAM" id="nvram"/><device class="KEYBOARD" id="keyboard"/>
  <device class="PM_TIMER" id="pm_timer"/><device class="ACPI" id="acpi"/><device class="SERIAL" id="serial"/></devices>
  <boot format="linux" kernel="{}" initrd="{}" cmdline="console=ttyS0 nokaslr cryptomgr.notests"/></vm>"#,
        kernel.display(),
        initrd.display()
    )
}

/// The number after `key` in the output, at or after `from`.
fn number_after(s: &Session, key: &str, from: usize) -> u32 {
    let out = s.output();
    let tail = &out[from..];
    let at = tail
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?}\n{}", s.describe()));
    tail[at + key.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?}\n{}", s.describe()))
}

fn hex(path: &Path) -> String {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Poll a code_inject job until it is no longer pending or running.
fn job_result(sock: &Path, id: u64, s: &mut Session, nudge: &str) -> Value {
    let t = Instant::now();
    let mut nudged = false;
    loop {
        let (st, v) = api(sock, "GET", "/vm/gears/code_inject", None);
        assert_eq!(st, 200, "{v}");
        let job = v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no job {id}: {v}"));
        if job["status"] != "pending" && job["status"] != "running" {
            return job;
        }
        if !nudged && !nudge.is_empty() {
            s.send(nudge);
            nudged = true;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let (_, ps) = api(sock, "GET", "/vm/gears/processes", None);
            panic!("job {id} still {job}\nprocesses: {ps}\n{}", s.describe());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn linux_guest_syscall_interception_env_and_code_injection() {
    let Some((cfg, out)) = gears_guest(
        "gears-svc",
        r#"<extension name="syscall_intercept"/><extension name="env_inject"/><extension name="code_inject"/>"#,
    ) else {
        return;
    };
    let dir = cfg.parent().unwrap().to_path_buf();
    let sock = dir.join("vm.sock");
    let mut s = Session::start(&[
        "run",
        cfg.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(200));
    let mut at = s.wait_for("# ", ready, Duration::from_secs(60));

    // Before the helper module: a pid rule needs the layout.
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/syscall_intercept",
        Some(json!({"syscalls": ["write"], "pid": 1})),
    );
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("gears.ko"), "{v}");
    s.send("insmod /lib/gears/gears.ko");
    at = s.wait_for(
        "registered with the VMM (ret=0)",
        at,
        Duration::from_secs(60),
    );
    let (st, v) = api(&sock, "GET", "/vm/gears", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["backend"], "ok", "{v}");
    assert_eq!(v["linux"]["thread_size"], 16384, "{v}");
    // The v3 verb: the process list and a service's (empty) rules; a bad action is an error.
    let ps = v3(
        &["gears", sock.to_str().unwrap(), "ps"],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(ps.status, 0, "{}", ps.out());
    assert!(ps.stdout.contains("\"comm\": \"kthreadd\""), "{}", ps.out());
    let l = v3(
        &["gears", sock.to_str().unwrap(), "syscall_intercept"],
        b"",
        Duration::from_secs(30),
    );
    assert!(
        l.status == 0 && l.stdout.contains("\"rules\": []"),
        "{}",
        l.out()
    );
    let bad = v3(
        &["gears", sock.to_str().unwrap(), "syscall_intercept", "frob"],
        b"",
        Duration::from_secs(30),
    );
    assert!(
        bad.status != 0 && bad.stderr.contains("unknown action"),
        "{}",
        bad.out()
    );
    let (st, v) = api(&sock, "GET", "/vm/gears/processes", None);
    assert_eq!(st, 200, "{v}");
    assert!(
        v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == 1),
        "{v}"
    );

    // Interception by pid: a background shell's writes are counted, the console shell's are
    // not (they never stop: the filter is on the process's address space).
    s.send("sh -c 'echo B\"\"G=$$; sleep 3; for i in 1 2 3 4 5; do echo line$i; done; echo BG\"\"-DONE' &");
    let bg_at = s.wait_for("BG=", at, Duration::from_secs(30));
    let bg = number_after(&s, "BG=", bg_at - 3);
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/syscall_intercept",
        Some(json!({"syscalls": ["write"], "pid": bg})),
    );
    assert_eq!(st, 200, "{v}");
    let rule = v["id"].as_u64().unwrap();
    s.send("echo console-write");
    at = s.wait_for("BG-DONE", bg_at, Duration::from_secs(60));
    let (_, v) = api(&sock, "GET", "/vm/gears/syscall_intercept", None);
    let r = &v["rules"][0];
    assert_eq!(r["calls"], 6, "{v}");
    assert_eq!(r["by_call"]["write"], 6, "{v}");
    assert_eq!(v["unmatched"], 0, "{v}");
    for c in r["recent"].as_array().unwrap() {
        assert_eq!(c["pid"], bg, "{v}");
        assert_eq!(c["args"][0], 1, "{v}");
        assert_eq!(c["abi"], "syscall64", "{v}");
    }
    assert_eq!(
        api(
            &sock,
            "DELETE",
            &format!("/vm/gears/syscall_intercept/{rule}"),
            None
        )
        .0,
        200
    );

    // A changed result is what the program sees: its first write fails with ENOSPC.
    s.send("sh -c 'echo B\"\"G2=$$; sleep 2; echo hello || echo WRITE\"\"-FAILED-$?; echo BG2\"\"-DONE' &");
    let b2 = s.wait_for("BG2=", at, Duration::from_secs(30));
    let bg2 = number_after(&s, "BG2=", b2 - 4);
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/syscall_intercept",
        Some(json!({"syscalls": ["write"], "pid": bg2, "result": -28, "times": 1})),
    );
    assert_eq!(st, 200, "{v}");
    let rule = v["id"].as_u64().unwrap();
    at = s.wait_for("BG2-DONE", b2, Duration::from_secs(60));
    let tail = s.output()[b2..].to_string();
    assert!(tail.contains("No space left on device"), "{}", s.describe());
    assert!(tail.contains("WRITE-FAILED-1"), "{}", s.describe());
    assert!(!tail.contains("\nhello"), "{}", s.describe());
    api(
        &sock,
        "DELETE",
        &format!("/vm/gears/syscall_intercept/{rule}"),
        None,
    );

    // INT 0x80, selected by name.
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/syscall_intercept",
        Some(json!({"syscalls": ["write"], "name": "gears-int80"})),
    );
    assert_eq!(st, 200, "{v}");
    let rule = v["id"].as_u64().unwrap();
    s.send("gears-int80 via-int80 && echo INT80''-OK");
    at = s.wait_for("INT80-OK", at, Duration::from_secs(60));
    let (_, v) = api(&sock, "GET", "/vm/gears/syscall_intercept", None);
    let r = v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == rule)
        .unwrap();
    assert_eq!(r["calls"], 1, "{v}");
    assert_eq!(r["recent"][0]["abi"], "int80", "{v}");
    assert_eq!(r["recent"][0]["nr"], 4, "{v}");
    assert_eq!(r["recent"][0]["comm"], "gears-int80", "{v}");
    api(
        &sock,
        "DELETE",
        &format!("/vm/gears/syscall_intercept/{rule}"),
        None,
    );

    // Environment injection: the named program sees the variable, others do not.
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/env_inject",
        Some(json!({"program": "env", "vars": {"GEARS_INJECTED": "yes-123"}})),
    );
    assert_eq!(st, 200, "{v}");
    s.send("/bin/env | grep GEARS_INJECTED; sh -c 'echo oth\"\"er=[$GEARS_INJECTED]'");
    at = s.wait_for("other=[", at, Duration::from_secs(60));
    let tail = s.output()[at - 40..].to_string();
    assert!(
        s.output().contains("GEARS_INJECTED=yes-123"),
        "{}",
        s.describe()
    );
    assert!(
        s.output()[at..].starts_with(']'),
        "{tail}\n{}",
        s.describe()
    );
    let (_, v) = api(&sock, "GET", "/vm/gears/env_inject", None);
    assert!(v["rules"][0]["hits"].as_u64().unwrap() >= 1, "{v}");

    // Code injection into the console shell: the blob returns the shell's pid, and the
    // shell goes on working.
    s.send("echo S''H=$$");
    let sh_at = s.wait_for("SH=", at, Duration::from_secs(30));
    let sh = number_after(&s, "SH=", sh_at - 3);
    at = s.wait_for("# ", sh_at, Duration::from_secs(30));
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/code_inject",
        Some(json!({"pid": sh, "blob_hex": hex(&out.join("blob_getpid.bin"))})),
    );
    assert_eq!(st, 200, "{v}");
    let job = job_result(&sock, v["id"].as_u64().unwrap(), &mut s, "echo nudge1");
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["ret"], sh, "{job}");
    s.send("echo alive''-after-inject");
    at = s.wait_for("alive-after-inject\r\n", at, Duration::from_secs(30));

    // A blob that faults is reported and the process is put back.
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/code_inject",
        Some(json!({"pid": sh, "blob_hex": hex(&out.join("blob_fault.bin"))})),
    );
    assert_eq!(st, 200, "{v}");
    let job = job_result(&sock, v["id"].as_u64().unwrap(), &mut s, "echo nudge2");
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("exception 14"),
        "{job}"
    );
    s.send("echo still''-alive");
    at = s.wait_for("still-alive\r\n", at, Duration::from_secs(30));

    // Injection into a process that is killed before it returns to user mode.
    s.send("sleep 30 & sleep 1; echo SLE''EP=$!");
    let sl_at = s.wait_for("SLEEP=", at, Duration::from_secs(30));
    let sl = number_after(&s, "SLEEP=", sl_at - 6);
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/code_inject",
        Some(json!({"pid": sl, "blob_hex": hex(&out.join("blob_getpid.bin"))})),
    );
    assert_eq!(st, 200, "{v}");
    let job = job_result(
        &sock,
        v["id"].as_u64().unwrap(),
        &mut s,
        &format!("kill -9 {sl}"),
    );
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("exited before"),
        "{job}"
    );
    // Bad input: an unknown pid, a blob that is not hex.
    let (st, _) = api(
        &sock,
        "POST",
        "/vm/gears/code_inject",
        Some(json!({"pid": 99999, "blob_hex": "c3"})),
    );
    assert_eq!(st, 404);
    let (st, _) = api(
        &sock,
        "POST",
        "/vm/gears/code_inject",
        Some(json!({"pid": sh, "blob_hex": "xyz"})),
    );
    assert_eq!(st, 400);

    // A checkpoint carries the rules and the guest layout: the restored VM keeps counting.
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/syscall_intercept",
        Some(json!({"syscalls": ["getppid"], "name": "gears-sysloop"})),
    );
    assert_eq!(st, 200, "{v}");
    let ck = dir.join("gears.ckpt");
    let (st, v) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(json!({ "path": ck, "stop": true })),
    );
    assert_eq!(st, 200, "{v}");
    s.wait_exit(Duration::from_secs(60));
    let sock2 = dir.join("vm2.sock");
    let mut r = load_vm(&ck, &sock2, &[]);
    let (st, v) = api(&sock2, "GET", "/vm/gears", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["linux"]["thread_size"], 16384, "{v}");
    let (_, v) = api(&sock2, "GET", "/vm/gears/env_inject", None);
    assert_eq!(
        v["rules"][0]["spec"]["vars"]["GEARS_INJECTED"], "yes-123",
        "{v}"
    );
    r.send("");
    r.send("gears-sysloop 3 && echo LOOP''-DONE");
    r.wait_for("LOOP-DONE", 0, Duration::from_secs(60));
    let (_, v) = api(&sock2, "GET", "/vm/gears/syscall_intercept", None);
    let rule = &v["rules"][0];
    assert_eq!(rule["spec"]["name"], "gears-sysloop", "{v}");
    assert_eq!(rule["calls"], 3, "{v}\n{}", r.describe());
    assert_eq!(rule["recent"][2]["name"], "getppid", "{v}");
}

#[test]
fn linux_guest_guarded_module_gets_its_port_only_inside_its_crossings() {
    let Some((cfg, out)) = gears_guest(
        "gears-guard",
        r#"<extension name="guard_mods" port="0x5100" budget_ms="1000"/>"#,
    ) else {
        return;
    };
    let dir = cfg.parent().unwrap().to_path_buf();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("guarded.manifest.json")).unwrap())
            .unwrap();
    let sock = dir.join("vm.sock");
    let mut s = Session::start(&[
        "run",
        cfg.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(200));
    let mut at = s.wait_for("# ", ready, Duration::from_secs(60));
    // Bad manifests are refused with a reason.
    let mut bad = manifest.clone();
    bad["entries"][0]["enter"] = json!(1_000_000);
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/guard_mods",
        Some(json!({ "manifest": bad })),
    );
    assert_eq!(st, 400, "{v}");
    let (st, v) = api(
        &sock,
        "POST",
        "/vm/gears/guard_mods",
        Some(json!({ "manifest": manifest })),
    );
    assert_eq!(st, 200, "{v}");

    s.send("insmod /lib/gears/guarded.ko && cat /proc/guarded");
    at = s.wait_for("secret=0x600df00d", at, Duration::from_secs(60));
    let (_, v) = api(&sock, "GET", "/vm/gears/guard_mods", None);
    let c = &v["counters"];
    assert!(v["modules"][0]["base"].is_string(), "{v}");
    assert!(c["entries"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(c["entries"], c["exits"], "{v}");
    assert!(c["granted_accesses"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(c["refused_crossings"], 0, "{v}");
    assert_eq!(c["refused_accesses"], 0, "{v}");

    // Another module: its own read, a call into the middle of the guarded module (past the
    // entry crossing), and a forged ENTER from its own code: all refused.
    s.send("insmod /lib/gears/attacker.ko; dmesg | grep 'attacker:'; echo ATTACK''-DONE");
    at = s.wait_for("ATTACK-DONE\r\n", at, Duration::from_secs(60));
    let o = s.output();
    for line in [
        "attacker: direct port read 0xffffffff",
        "attacker: jump into guarded 0xffffffff",
        "attacker: forged enter ret=-1",
    ] {
        assert!(o.contains(line), "{line}\n{}", s.describe());
    }
    // A user program with iopl(3).
    s.send("gears-ioprobe");
    at = s.wait_for("ioprobe: 0xffffffff", at, Duration::from_secs(60));
    let (_, v) = api(&sock, "GET", "/vm/gears/guard_mods", None);
    let c = &v["counters"];
    assert!(c["refused_accesses"].as_u64().unwrap() >= 3, "{v}");
    assert!(c["refused_crossings"].as_u64().unwrap() >= 1, "{v}");
    let log = v["log"].to_string();
    assert!(
        log.contains("not inside a guarded module's crossing"),
        "{v}"
    );
    assert!(log.contains("not its wrapper's crossing"), "{v}");
    // The guarded module still works.
    s.send("cat /proc/guarded");
    at = s.wait_for("secret=0x600df00d", at, Duration::from_secs(60));

    // A module that does not cross back in time loses the privilege; the guest goes on.
    s.send("echo 'hang 2500' > /proc/guarded; echo HANG''-DONE");
    at = s.wait_for("HANG-DONE\r\n", at, Duration::from_secs(60));
    let (_, v) = api(&sock, "GET", "/vm/gears/guard_mods", None);
    assert_eq!(v["counters"]["revoked"], 1, "{v}");
    assert!(
        v["log"]
            .to_string()
            .contains("did not cross back within 1000 ms"),
        "{v}"
    );
    s.send("cat /proc/guarded");
    at = s.wait_for("secret=0x600df00d", at, Duration::from_secs(60));

    // Without the stack check crossings still work; settings are validated.
    let (st, v) = api(
        &sock,
        "PUT",
        "/vm/gears/guard_mods",
        Some(json!({"check_stack": false})),
    );
    assert_eq!(st, 200, "{v}");
    let (st, _) = api(
        &sock,
        "PUT",
        "/vm/gears/guard_mods",
        Some(json!({"budget_ms": 0})),
    );
    assert_eq!(st, 400);
    s.send("echo 'bench 200' > /proc/guarded; cat /proc/guarded_bench");
    s.wait_for("crossing=", at, Duration::from_secs(60));
}

/// The freestanding sysguest (a CPL3 program making SYSCALL and INT 0x80 calls) with a rule
/// from the config that answers getpid: both ABIs see the VMM's answer and the guest kernel
/// never runs the call. On each backend; this host's KVM cannot run SYSCALL from user mode at
/// all (guests/README.md), which the unintercepted run shows first.
#[test]
fn sysguest_calls_are_answered_by_the_vmm_on_each_backend() {
    let dir = tmpdir("sysguest");
    for b in backends() {
        let devices: String = palacios::platform::standard_devices()
            .iter()
            .map(|d| format!("<device class=\"{}\" id=\"{}\"/>", d.class, d.id))
            .collect();
        let cfg = |rules: &str| {
            let p = dir.join(format!("sysguest-{b}-{}.xml", rules.len()));
            std::fs::write(
                &p,
                format!(
                    "<vm class=\"PC\"><memory>64</memory><backend>{b}</backend>\
                     <extensions><extension name=\"syscall_intercept\">{rules}</extension></extensions>\
                     <devices>{devices}</devices>\
                     <boot kernel=\"{}\" cmdline=\"loops=100\"/></vm>",
                    guest("sysguest.elf").display()
                ),
            )
            .unwrap();
            p
        };
        let plain = v3(
            &["run", cfg("").to_str().unwrap()],
            b"",
            Duration::from_secs(120),
        );
        if b == "kvm" && plain.status == 5 {
            palacios::vmm::test_support::skip_machine(
                &test_name(),
                "this host's KVM does not run SYSCALL from user mode (the guest faults without any rule)",
            );
            continue;
        }
        assert_eq!(plain.status, 1, "{b}: {}", plain.out());
        assert!(
            plain.stdout.contains("sysguest: getpid=42"),
            "{b}: {}",
            plain.out()
        );
        assert!(
            plain.stdout.contains("kernel saw syscall=108 int80=2"),
            "{b}: {}",
            plain.out()
        );
        let r = v3(
            &[
                "run",
                cfg(
                    r#"<rule syscalls="getpid" result="7"/><rule syscalls="write" name="nosuch"/>"#,
                )
                .to_str()
                .unwrap(),
            ],
            b"",
            Duration::from_secs(120),
        );
        assert_eq!(r.status, 1, "{b}: {}", r.out());
        for line in [
            "sysguest: getpid=7",
            "sysguest: int80 getpid=7",
            // The kernel never saw the two answered calls.
            "kernel saw syscall=107 int80=1",
            "sysguest: hello from user mode",
        ] {
            assert!(r.stdout.contains(line), "{b}: {line}\n{}", r.out());
        }
    }
}
