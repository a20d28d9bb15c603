//! End-to-end check of the emulator's block translator: every emubench workload (dec/jnz,
//! memory, call/ret, flag-heavy ALU loops, CRC-32 and a sieve in C) runs on the emulator
//! backend with the translator and with the interpreter only (`PALACIOS_EMU_JIT=0`); the
//! guest's checksums must agree, and only the first run may translate blocks.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

struct Out {
    status: i32,
    stdout: String,
    stderr: String,
}

fn run(cmdline: &str, jit: bool) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_v3"))
        .args([
            "--log-level",
            "error",
            "run",
            "--backend",
            "emu",
            "--stats",
            "--kernel",
        ])
        .arg(common::guest("emubench.elf"))
        .args(["--mem", "128", "--cmdline", cmdline])
        .env("PALACIOS_EMU_JIT", if jit { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start v3");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for v3") {
            break s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("v3 ({cmdline}, translator {jit}) did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Out {
        status,
        stdout,
        stderr,
    }
}

fn result(o: &Out) -> Option<&str> {
    o.stdout
        .lines()
        .find_map(|l| l.strip_prefix("emubench: result "))
}

fn translated(o: &Out) -> u64 {
    o.stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("emu blocks translated"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn emubench_agrees_with_and_without_the_translator() {
    for (bench, n) in [
        ("dec", 2_000_000),
        ("mem", 200_000),
        ("call", 500_000),
        ("alu", 100_000),
        ("crc32", 500_000),
        ("sieve", 2),
    ] {
        let cmdline = format!("bench={bench} n={n}");
        let interp = run(&cmdline, false);
        let jit = run(&cmdline, true);
        for (what, o) in [("interpreter", &interp), ("translator", &jit)] {
            assert_eq!(
                o.status, 1,
                "{bench} ({what}) did not exit through debug-exit 0\n{}\n{}",
                o.stdout, o.stderr
            );
            assert!(
                result(o).is_some(),
                "{bench} ({what}): no result\n{}",
                o.stdout
            );
        }
        assert_eq!(result(&jit), result(&interp), "{bench}: checksums differ");
        assert_eq!(
            translated(&interp),
            0,
            "{bench}: the interpreter translated"
        );
        assert!(
            translated(&jit) > 0,
            "{bench}: nothing translated\n{}",
            jit.stderr
        );
    }
}
