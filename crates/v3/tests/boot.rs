//! Boot every kind of guest through `v3` on every backend (the emulator, and KVM where it is
//! usable) and assert on serial output, device logs
//! and exit status; the backends must agree. Each run has a hard time limit.

mod common;
use common::*;

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[test]
fn demo_guest_boots_by_default() {
    each_backend(|_b| {
        let r = v3(&["run"], b"", LIMIT);
        assert_eq!(r.status, 0, "{}", r.out());
        assert!(r.stdout.contains("multiboot: ok"), "{}", r.out());
        assert!(r.stdout.contains("usable RAM: 127 MiB"), "{}", r.out());
        assert!(r.stdout.contains("'motd'"), "{}", r.out());
        assert!(r.stdout.contains("Goodbye."), "{}", r.out());
    });
}

#[test]
fn flat_binary_in_real_mode() {
    each_backend(|_b| {
        let k = s(&guest("flat16.bin"));
        for extra in [&["--format", "flat"][..], &[][..]] {
            let mut args = vec!["run", "--kernel", &k];
            args.extend_from_slice(extra);
            let r = v3(&args, b"", LIMIT);
            assert_eq!(r.status, (0x2a << 1) | 1, "{}", r.out());
            assert!(
                r.stdout.contains("flat16: hello from real mode"),
                "{}",
                r.out()
            );
            assert!(r.stdout.contains("flat16: ip ok"), "{}", r.out());
            assert!(r.stderr.contains("bochs console: bochs-e9"), "{}", r.out());
        }
    });
}

#[test]
fn multiboot_test_kernel_with_every_device() {
    each_backend(|_b| {
        let d = tmpdir("mball");
        std::fs::copy(guest("mbtest.elf"), d.join("mbtest.elf")).unwrap();
        std::fs::write(d.join("settings.txt"), "KEY=VALUE\nOTHER=2\n").unwrap();
        let cfg = d.join("vm.xml");
        std::fs::write(
            &cfg,
            r#"<vm class="PC">
      <memory>64</memory>
      <telemetry>enable</telemetry>
      <files><file id="kernel" filename="mbtest.elf"/><file id="settings" filename="settings.txt"/></files>
      <devices>
        <device class="SERIAL" id="serial"/>
        <device class="CHAR_STREAM" id="com2log"><name>file:com2.log</name><frontend tag="serial"><com_port>2</com_port></frontend></device>
        <device class="BOCHS_DEBUG" id="bochs"/>
        <device class="OS_DEBUG" id="osdebug"/>
        <device class="GENERIC" id="generic"><ports start="0x510" end="0x51f" mode="PRINT_AND_IGNORE"/></device>
        <device class="DEBUG_EXIT" id="exit" iobase="0xf4" iosize="4"/>
      </devices>
      <boot format="multiboot" kernel="kernel" cmdline="test=all"><module file="settings" cmdline="settings"/></boot>
    </vm>"#,
        )
        .unwrap();
        let r = v3(&["run", &s(&cfg)], b"", LIMIT);
        assert_eq!(
            r.status,
            1,
            "verdict: 0 written to the debug-exit port\n{}",
            r.out()
        );
        assert!(!r.stdout.contains("FAIL"), "{}", r.out());
        for want in [
            "PASS unclaimed port",
            "PASS unclaimed mmio",
            "PASS page0 ram",
            "PASS generic ignore reads 0",
            "mbtest: cmdline 'test=all'",
            "mbtest: module 'settings' size 18 first-line 'KEY=VALUE'",
            "mbtest: ram 65151 KiB",
            " 0 failed",
        ] {
            assert!(
                r.stdout.contains(want),
                "stdout lacks {want:?}\n{}",
                r.out()
            );
        }
        for want in [
            "bochs console: hello bochs",
            "bochs info: info port",
            "os_debug: hello osdebug",
            "os_debug: heartbeat 0x1234",
            "generic: write 0x5a (1 byte(s)) to port 0x510",
            "generic: read 1 byte(s) from port 0x510",
            // Telemetry from <telemetry>enable</telemetry>, with the unclaimed ports.
            "=== telemetry",
            "io-out",
            "0x2f0:",
            "0xfed00000:",
        ] {
            assert!(
                r.stderr.contains(want),
                "stderr lacks {want:?}\n{}",
                r.out()
            );
        }
        let com2 = std::fs::read_to_string(d.join("com2.log")).unwrap();
        assert!(com2.contains("com2 says hi"), "COM2 stream got {com2:?}");
    });
}

#[test]
fn multiboot_aout_kludge() {
    each_backend(|_b| {
        let k = s(&guest("mbaout.bin"));
        let r = v3(
            &["run", "--kernel", &k, "--cmdline", "test=regs"],
            b"",
            LIMIT,
        );
        assert_eq!(r.status, 1, "{}", r.out());
        assert!(r.stdout.to_lowercase().contains("2badb002"), "{}", r.out());
    });
}

#[test]
fn elf64_in_long_mode() {
    each_backend(|_b| {
        let k = s(&guest("elf64test.elf"));
        let r = v3(
            &[
                "run",
                "--kernel",
                &k,
                "--mem",
                "256",
                "--cmdline",
                "hello64",
            ],
            b"",
            LIMIT,
        );
        assert_eq!(r.status, (0x40 << 1) | 1, "{}", r.out());
        assert!(r.stdout.contains("elf64: long mode entered"), "{}", r.out());
        assert!(r.stdout.contains("elf64: cmdline 'hello64'"), "{}", r.out());
        assert!(!r.stdout.contains("FAIL"), "{}", r.out());
    });
}

#[test]
fn debug_exit_values_and_halt() {
    each_backend(|_b| {
        let k = s(&guest("mbtest.elf"));
        let r = v3(
            &["run", "--kernel", &k, "--cmdline", "test=exit exit=3"],
            b"",
            LIMIT,
        );
        assert_eq!(r.status, 7, "{}", r.out());
        let r = v3(
            &["run", "--kernel", &k, "--cmdline", "test=exit exit=100"],
            b"",
            LIMIT,
        );
        assert_eq!(r.status, 201, "{}", r.out());
        let r = v3(
            &[
                "run",
                "--kernel",
                &k,
                "--cmdline",
                "test=halt",
                "--cores",
                "2",
                "--stats",
            ],
            b"",
            LIMIT,
        );
        assert_eq!(r.status, 0, "{}", r.out());
        assert!(r.stdout.contains("mbtest: halting"), "{}", r.out());
        assert!(
            r.stderr.contains("core 0:") && r.stderr.contains("core 1:"),
            "one vCPU thread per core\n{}",
            r.out()
        );
    });
}

#[test]
fn triple_fault_is_a_vm_failure() {
    each_backend(|_b| {
        let k = s(&guest("mbtest.elf"));
        let r = v3(
            &["run", "--kernel", &k, "--cmdline", "test=triple"],
            b"",
            LIMIT,
        );
        assert_eq!(r.status, 4, "{}", r.out());
        assert!(r.stderr.contains("vCPU 0"), "names the vCPU\n{}", r.out());
        assert!(r.stderr.contains("RIP 0x"), "names the RIP\n{}", r.out());
    });
}

#[test]
fn console_input_reaches_com1() {
    each_backend(|_b| {
        let k = s(&guest("mbtest.elf"));
        let r = v3(
            &["run", "--kernel", &k, "--cmdline", "test=echo"],
            b"hello palacios\n",
            LIMIT,
        );
        assert_eq!(r.status, 1, "{}", r.out());
        assert!(r.stdout.contains("ECHO: HELLO PALACIOS"), "{}", r.out());
    });
}

#[test]
fn unix_socket_stream_both_ways() {
    each_backend(|_b| {
        use std::io::{BufRead, BufReader, Write};
        let d = tmpdir("sock");
        let sock = d.join("com1.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::copy(guest("mbtest.elf"), d.join("k.elf")).unwrap();
        let cfg = d.join("vm.xml");
        std::fs::write(
            &cfg,
            r#"<vm class="PC"><memory>32</memory><devices>
      <device class="SERIAL" id="serial"/>
      <device class="CHAR_STREAM" id="sock"><name>unix:com1.sock</name><frontend tag="serial" com_port="1"/></device>
      <device class="DEBUG_EXIT" id="exit"/>
    </devices><boot kernel="k.elf" cmdline="test=echo"/></vm>"#,
        )
        .unwrap();
        let peer = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut w = conn.try_clone().unwrap();
            let mut lines = BufReader::new(conn).lines();
            let mut seen = Vec::new();
            while let Some(Ok(l)) = lines.next() {
                if l.contains("echo ready") {
                    w.write_all(b"over the socket\n").unwrap();
                }
                seen.push(l);
            }
            seen
        });
        let r = v3(&["run", &s(&cfg)], b"", LIMIT);
        assert_eq!(r.status, 1, "{}", r.out());
        let seen = peer.join().unwrap();
        assert!(
            seen.iter().any(|l| l.contains("ECHO: OVER THE SOCKET")),
            "socket saw {seen:?}"
        );
        assert!(
            !r.stdout.contains("ECHO"),
            "COM1 went to the socket, not the console"
        );
    });
}

#[test]
fn sigint_stops_the_vm_cleanly() {
    each_backend(|_b| {
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        let k = s(&guest("mbtest.elf"));
        // The echo scenario waits for input forever; stdin stays open.
        let mut child = Command::new(env!("CARGO_BIN_EXE_v3"))
            .args(["run", "--kernel", &k, "--cmdline", "test=echo"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("v3 did not stop on SIGINT");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(130));
    });
}
