//! Live migration between two `v3` processes: the dirtier guest (a sequence and a 64 MiB
//! region rewritten without pause) over loopback and between network namespaces, the small
//! countdown guest across backends, the Linux shell, and the faults that must leave the
//! source running: a receiver killed mid-copy, a corrupted chunk, a receiver with another
//! device set.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(addr: &str, s: &Session) {
    // The receiver logs when it listens.
    let t = Instant::now();
    while !s.describe().contains("waiting for a migration") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the receiver does not listen on {addr}\n{}",
            s.describe()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The numbers of every complete "seq N" line.
fn seqs(out: &str) -> Vec<u32> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("seq ")?.parse().ok())
        .collect()
}

struct Pair {
    src: Session,
    src_sock: PathBuf,
    dst: Session,
    dst_sock: PathBuf,
    dest: String,
}

fn start_pair(
    tag: &str,
    src_args: &[&str],
    recv_extra: &[&str],
    recv_prefix: &[&str],
    dest_host: &str,
) -> Pair {
    let dir = tmpdir(tag);
    let src_sock = dir.join("src.sock");
    let dst_sock = dir.join("dst.sock");
    let port = free_port();
    let dest = format!("{dest_host}:{port}");
    let s_sock = src_sock.display().to_string();
    let mut a = vec!["run", "--api-sock", &s_sock];
    a.extend_from_slice(src_args);
    let src = Session::start(&a);
    wait_socket(&src_sock, &src);
    let d_sock = dst_sock.display().to_string();
    let listen = format!("{dest_host}:{port}");
    let mut b = vec!["receive", "--listen", &listen, "--api-sock", &d_sock];
    b.extend_from_slice(recv_extra);
    let dst = Session::start_in(recv_prefix, &b);
    wait_listening(&listen, &dst);
    Pair {
        src,
        src_sock,
        dst,
        dst_sock,
        dest,
    }
}

fn send(p: &Pair, extra: &[&str]) -> Run {
    let sock = p.src_sock.display().to_string();
    let mut a = vec!["send", &sock, &p.dest];
    a.extend_from_slice(extra);
    v3(&a, b"", Duration::from_secs(120))
}

fn stop(sock: &Path) {
    let _ = palacios_api::request(sock, "PUT", "/vm/stop", None, Duration::from_secs(10));
}

/// Migrate the dirtier; the sequence continues without gap or repeat, the destination's
/// verification of the 64 MiB region passes, the source ends with status 0.
fn dirtier_moves(tag: &str, recv_prefix: &[&str], host: &str) {
    let mut p = start_pair(
        tag,
        &[
            "--backend",
            "emu",
            "--mem",
            "128",
            "--kernel",
            "guest:dirtier.elf",
            "--cmdline",
            "mib=64 verify=8",
        ],
        &[],
        recv_prefix,
        host,
    );
    p.src.wait_for("seq 3\n", 0, Duration::from_secs(60));
    let r = send(&p, &[]);
    assert_eq!(
        r.status,
        0,
        "{}\n--- source\n{}\n--- destination\n{}",
        r.out(),
        p.src.describe(),
        p.dst.describe()
    );
    assert_eq!(
        p.src.wait_exit(Duration::from_secs(30)),
        0,
        "{}",
        p.src.describe()
    );
    let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let moved = seqs(&p.src.output()).last().copied().unwrap();
    // Two verifications on the destination, after the move.
    let next = (moved / 8 + 2) * 8;
    let at = p
        .dst
        .wait_for(&format!("seq {next}\n"), 0, Duration::from_secs(60));
    p.dst.wait_for("verify ", at, Duration::from_secs(60));
    stop(&p.dst_sock);
    p.dst.wait_exit(Duration::from_secs(30));
    let joined = format!("{}{}", p.src.output(), p.dst.output());
    let all = seqs(&joined);
    let want: Vec<u32> = (1..=*all.last().unwrap()).collect();
    assert_eq!(
        all, want,
        "the sequence must continue with no gap and no repeat\n{joined}"
    );
    assert!(!p.dst.output().contains("FAIL"), "{}", p.dst.output());
    assert!(p.dst.output().contains("verify ok"), "{}", p.dst.output());
    eprintln!(
        "{tag}: migrated at seq {moved}: {} rounds, {:.0} ms, downtime {:.1} ms",
        done["round"],
        done["total_ms"].as_f64().unwrap_or(0.0),
        done["downtime_ms"].as_f64().unwrap_or(0.0)
    );
}

#[test]
fn the_dirtier_migrates_over_loopback() {
    dirtier_moves("mig-lo", &[], "127.0.0.1");
}

/// Two network namespaces joined by a veth pair: the receiver runs in its own namespace.
#[test]
fn the_dirtier_migrates_between_network_namespaces() {
    let Some(ns) = Netns::create() else {
        return;
    };
    let prefix = ["ip", "netns", "exec", ns.name.as_str()];
    dirtier_moves("mig-ns", &prefix, &ns.peer_ip.clone());
    drop(ns);
}

/// A small guest across backends (with the CPU model both present).
#[test]
fn a_guest_migrates_between_the_emulator_and_kvm() {
    if !kvm() {
        return;
    }
    for (from, to) in [("emu", "kvm"), ("kvm", "emu")] {
        let step = if from == "emu" {
            "20000000"
        } else {
            "100000000"
        };
        let cmdline = format!("from=60 step={step}");
        let mut p = start_pair(
            &format!("mig-{from}-{to}"),
            &[
                "--backend",
                from,
                "--cpu",
                "portable",
                "--kernel",
                "guest:countdown.elf",
                "--cmdline",
                &cmdline,
            ],
            &["--backend", to],
            &[],
            "127.0.0.1",
        );
        p.src.wait_for("countdown 55 ", 0, Duration::from_secs(60));
        let r = send(&p, &[]);
        assert_eq!(
            r.status,
            0,
            "{}\n{}\n{}",
            r.out(),
            p.src.describe(),
            p.dst.describe()
        );
        assert_eq!(p.src.wait_exit(Duration::from_secs(30)), 0);
        assert_eq!(
            p.dst.wait_exit(Duration::from_secs(60)),
            0,
            "{}",
            p.dst.describe()
        );
        let joined = format!("{}{}", p.src.output(), p.dst.output());
        let n: Vec<u32> = joined
            .split_inclusive('\n')
            .filter_map(|l| {
                l.strip_prefix("countdown ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        assert_eq!(
            n,
            (1..=60).rev().collect::<Vec<u32>>(),
            "{from} -> {to}\n{joined}"
        );
        assert!(p.dst.output().contains("countdown done"));
    }
}

/// Debian's shell on the emulator moves with its state: a command typed after the move runs.
#[test]
fn the_linux_shell_migrates_alive() {
    if linux_guest().is_none() {
        return;
    }
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/linux.xml");
    let mut p = start_pair("mig-linux", &[config], &[], &[], "127.0.0.1");
    let ready = p
        .src
        .wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(150));
    p.src.wait_for("# ", ready, Duration::from_secs(60));
    p.src.send("echo before > /tmp/moved");
    std::thread::sleep(Duration::from_millis(500));
    let r = send(&p, &[]);
    assert_eq!(
        r.status,
        0,
        "{}\n{}\n{}",
        r.out(),
        p.src.describe(),
        p.dst.describe()
    );
    assert_eq!(p.src.wait_exit(Duration::from_secs(30)), 0);
    p.dst.send("cat /tmp/moved; echo after-$((6*7))");
    let at = p.dst.wait_for("before", 0, Duration::from_secs(60));
    p.dst.wait_for("after-42", at, Duration::from_secs(60));
    p.dst.send("poweroff -f");
    assert_eq!(
        p.dst.wait_exit(Duration::from_secs(60)),
        0,
        "{}",
        p.dst.describe()
    );
}

/// The source keeps running and says why: the receiver is killed mid-copy; a chunk is
/// corrupted on the way; the receiver has another device set.
#[test]
fn faults_leave_the_source_running() {
    let src_args = [
        "--backend",
        "emu",
        "--mem",
        "128",
        "--kernel",
        "guest:dirtier.elf",
        "--cmdline",
        "mib=64 verify=0",
    ];
    let still_running = |p: &mut Pair| {
        let n = seqs(&p.src.output()).last().copied().unwrap_or(0);
        p.src
            .wait_for(&format!("seq {}\n", n + 3), 0, Duration::from_secs(60));
        let (st, v) =
            palacios_api::request(&p.src_sock, "GET", "/vm", None, Duration::from_secs(10))
                .unwrap();
        assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
    };

    // 1. The receiver dies in the middle of the copy (the link is capped so it takes a while).
    let mut p = start_pair("mig-kill", &src_args, &[], &[], "127.0.0.1");
    p.src.wait_for("seq 2\n", 0, Duration::from_secs(60));
    let sock = p.src_sock.display().to_string();
    let dest = p.dest.clone();
    let sender = std::thread::spawn(move || {
        v3(
            &["send", &sock, &dest, "--bandwidth", "200"],
            b"",
            Duration::from_secs(120),
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    p.dst.kill9();
    let r = sender.join().unwrap();
    assert_eq!(r.status, 2, "{}", r.out());
    assert!(r.stderr.contains("failed"), "{}", r.out());
    still_running(&mut p);
    stop(&p.src_sock);
    assert_eq!(p.src.wait_exit(Duration::from_secs(30)), 130);

    // 2. A byte flipped on the way (a proxy between the two).
    let mut p = start_pair("mig-corrupt", &src_args, &[], &[], "127.0.0.1");
    p.src.wait_for("seq 2\n", 0, Duration::from_secs(60));
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    let upstream = p.dest.clone();
    std::thread::spawn(move || {
        let (mut down, _) = proxy.accept().unwrap();
        let mut up = TcpStream::connect(&upstream).unwrap();
        let (mut down2, mut up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut up2, &mut down2);
        });
        let mut buf = vec![0u8; 65536];
        let mut total = 0usize;
        let mut flipped = false;
        loop {
            let n = match down.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !flipped && total + n > 3 << 20 {
                let i = (3 << 20) - total.min(3 << 20);
                buf[i.min(n - 1)] ^= 0x40;
                flipped = true;
            }
            total += n;
            if up.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let sock = p.src_sock.display().to_string();
    let r = v3(&["send", &sock, &proxy_addr], b"", Duration::from_secs(120));
    assert_eq!(r.status, 2, "{}", r.out());
    assert!(
        r.stderr.contains("corrupt"),
        "the cause is named\n{}",
        r.out()
    );
    assert_eq!(
        p.dst.wait_exit(Duration::from_secs(30)),
        2,
        "{}",
        p.dst.describe()
    );
    assert!(p.dst.describe().contains("corrupt"), "{}", p.dst.describe());
    still_running(&mut p);
    stop(&p.src_sock);
    p.src.wait_exit(Duration::from_secs(30));

    // 3. A receiver whose config has another device set: refused before the source pauses.
    let dir = tmpdir("mig-devs-cfg");
    let cfg = dir.join("other.xml");
    std::fs::write(
        &cfg,
        "<vm class=\"PC\"><memory>128</memory><devices><device class=\"SERIAL\" id=\"serial\"/>\
         <device class=\"DEBUG_EXIT\" id=\"exit\"/></devices></vm>",
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();
    let mut p = start_pair(
        "mig-devs",
        &src_args,
        &["--config", &cfg_s],
        &[],
        "127.0.0.1",
    );
    p.src.wait_for("seq 2\n", 0, Duration::from_secs(60));
    let r = send(&p, &[]);
    assert_eq!(r.status, 2, "{}", r.out());
    assert!(r.stderr.contains("device set differs"), "{}", r.out());
    assert_eq!(p.dst.wait_exit(Duration::from_secs(30)), 2);
    still_running(&mut p);
    stop(&p.src_sock);
    p.src.wait_exit(Duration::from_secs(30));
}

/// A network namespace with a veth link to this one: 10.77.K.1 here, 10.77.K.2 there.
struct Netns {
    name: String,
    veth: String,
    peer_ip: String,
}

impl Netns {
    fn create() -> Option<Netns> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 7;
        let id = std::process::id() % 10_000;
        let name = format!("v3mig{id}-{k}");
        let veth = format!("v3m{id}{k}a");
        let peer = format!("v3m{id}{k}b");
        let (here, there) = (format!("10.77.{k}.1/24"), format!("10.77.{k}.2/24"));
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .map(|o| {
                    (
                        o.status.success(),
                        String::from_utf8_lossy(&o.stderr).into_owned(),
                    )
                })
                .unwrap_or((false, "cannot run ip".into()))
        };
        let (ok, err) = ip(&["netns", "add", &name]);
        if !ok {
            palacios::vmm::test_support::skip_machine(
                &test_name(),
                &format!("cannot create a network namespace here: {}", err.trim()),
            );
            return None;
        }
        let ns = Netns {
            name: name.clone(),
            veth: veth.clone(),
            peer_ip: format!("10.77.{k}.2"),
        };
        for args in [
            vec!["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &peer, "netns", &name],
            vec!["addr", "add", &here, "dev", &veth],
            vec!["link", "set", &veth, "up"],
            vec![
                "netns", "exec", &name, "ip", "addr", "add", &there, "dev", &peer,
            ],
            vec!["netns", "exec", &name, "ip", "link", "set", &peer, "up"],
            vec!["netns", "exec", &name, "ip", "link", "set", "lo", "up"],
        ] {
            let (ok, err) = ip(&args);
            assert!(ok, "ip {args:?}: {err}");
        }
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The veth link between the namespaces goes down in the middle of the copy: the source's
/// write stalls, times out, and the source runs on; the reason is printed.
#[test]
fn a_dropped_link_leaves_the_source_running() {
    let Some(ns) = Netns::create() else {
        return;
    };
    let prefix = ["ip", "netns", "exec", ns.name.as_str()];
    let mut p = start_pair(
        "mig-drop",
        &[
            "--backend",
            "emu",
            "--mem",
            "128",
            "--kernel",
            "guest:dirtier.elf",
            "--cmdline",
            "mib=64 verify=0",
        ],
        &[],
        &prefix,
        &ns.peer_ip.clone(),
    );
    p.src.wait_for("seq 2\n", 0, Duration::from_secs(60));
    let sock = p.src_sock.display().to_string();
    let dest = p.dest.clone();
    let sender = std::thread::spawn(move || {
        v3(
            &["send", &sock, &dest, "--bandwidth", "200"],
            b"",
            Duration::from_secs(120),
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    let down = Command::new("ip")
        .args(["link", "set", &ns.veth, "down"])
        .status()
        .unwrap();
    assert!(down.success());
    let r = sender.join().unwrap();
    assert_eq!(r.status, 2, "{}", r.out());
    assert!(r.stderr.contains("failed"), "{}", r.out());
    let n = seqs(&p.src.output()).last().copied().unwrap_or(0);
    p.src
        .wait_for(&format!("seq {}\n", n + 3), 0, Duration::from_secs(60));
    let (st, v) =
        palacios_api::request(&p.src_sock, "GET", "/vm", None, Duration::from_secs(10)).unwrap();
    assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
    stop(&p.src_sock);
    assert_eq!(p.src.wait_exit(Duration::from_secs(30)), 130);
    p.dst.kill9();
    drop(ns);
}

/// A receiver without --config takes nothing host-specific from the source's config: a
/// stream to a host file becomes null there (the file is not created), and the VM runs.
#[test]
fn the_receiver_opens_no_host_file_the_source_names() {
    let dir = tmpdir("mig-untrusted-cfg");
    let log = dir.join("com2.log");
    let cfg = dir.join("vm.xml");
    std::fs::write(
        &cfg,
        format!(
            "<vm class=\"PC\"><memory>64</memory><devices><device class=\"SERIAL\" id=\"serial\"/>\
             <device class=\"CHAR_STREAM\" id=\"com2\"><name>file:{}</name>\
             <frontend tag=\"serial\"><com_port>2</com_port></frontend></device></devices>\
             <boot kernel=\"guest:countdown.elf\" cmdline=\"from=300 step=20000000\"/></vm>",
            log.display()
        ),
    )
    .unwrap();
    let c = cfg.display().to_string();
    let mut p = start_pair(
        "mig-untrusted",
        &["--backend", "emu", &c],
        &[],
        &[],
        "127.0.0.1",
    );
    p.src.wait_for("countdown 295 ", 0, Duration::from_secs(60));
    assert!(log.exists(), "the source opened its stream");
    std::fs::remove_file(&log).unwrap();
    let r = send(&p, &[]);
    assert_eq!(r.status, 0, "{}\n{}", r.out(), p.dst.describe());
    p.dst.wait_for("countdown 280 ", 0, Duration::from_secs(60));
    assert!(!log.exists(), "the receiver created the source's host file");
    assert!(
        p.dst.describe().contains("becomes null here"),
        "{}",
        p.dst.describe()
    );
    stop(&p.dst_sock);
    p.dst.wait_exit(Duration::from_secs(30));
}

/// Migration carries the virtio functions (shared-storage model: both ends name the same disk
/// image). Linux with a mounted virtio disk and the rng moves; on the destination the same
/// mount reads and writes and the rng answers. A receiver without --config refuses a VM whose
/// disk is a host file, naming it, and the source runs on.
#[test]
fn a_linux_guest_with_virtio_devices_migrates() {
    let Some((kernel, initrd, _)) = linux_guest() else {
        return;
    };
    let tools = ["mke2fs", "debugfs"];
    if let Some(t) = tools.iter().find(|t| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }) {
        palacios::vmm::test_support::missing_prerequisite(
            &test_name(),
            &format!("{t} (e2fsprogs)"),
        );
        return;
    }
    let dir = tmpdir("mig-virtio-cfg");
    let disk = dir.join("disk.img");
    let src_dir = dir.join("src");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::write(src_dir.join("hello.txt"), "on-the-source\n").unwrap();
    let o = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src_dir)
        .arg(&disk)
        .arg("16M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = dir.join("vm.xml");
    std::fs::write(
        &cfg,
        linux_pci_vm(
            &kernel,
            &initrd,
            &format!(
                r#"    <device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus></device>
    <device class="FILEDISK" id="d0" writable="1"><path>{}</path><frontend tag="blk0"/></device>
    <device class="LNX_VIRTIO_RNG" id="rng0"><bus>pci0</bus></device>"#,
                disk.display()
            ),
        ),
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();

    // Without --config: refused, the source runs on.
    let mut p = start_pair("mig-virtio-refuse", &[&cfg_s], &[], &[], "127.0.0.1");
    let ready = p
        .src
        .wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(150));
    p.src.wait_for("# ", ready, Duration::from_secs(60));
    let r = send(&p, &[]);
    assert_ne!(r.status, 0, "{}", r.out());
    assert!(r.stderr.contains("FILEDISK 'd0'"), "{}", r.out());
    let (st, v) =
        palacios_api::request(&p.src_sock, "GET", "/vm", None, Duration::from_secs(10)).unwrap();
    assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
    stop(&p.src_sock);
    let _ = p.src.wait_exit(Duration::from_secs(30));
    p.dst.kill9();

    // With this host's config on the receiver: the VM moves with its devices.
    let mut p = start_pair(
        "mig-virtio",
        &[&cfg_s],
        &["--config", &cfg_s],
        &[],
        "127.0.0.1",
    );
    let ready = p
        .src
        .wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(150));
    let at = p.src.wait_for("# ", ready, Duration::from_secs(60));
    p.src
        .send("mount /dev/vda /mnt && cat /mnt/hello.txt && echo MOUNTED");
    p.src.wait_for("\nMOUNTED", at, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    let r = send(&p, &[]);
    assert_eq!(
        r.status,
        0,
        "{}\n{}\n{}",
        r.out(),
        p.src.describe(),
        p.dst.describe()
    );
    assert_eq!(p.src.wait_exit(Duration::from_secs(30)), 0);
    p.dst.send(
        "cat /mnt/hello.txt; echo moved > /mnt/moved.txt; sync; umount /mnt; echo DONE-$((2+3))",
    );
    let at = p.dst.wait_for("on-the-source", 0, Duration::from_secs(60));
    let done = p.dst.wait_for("DONE-5", at, Duration::from_secs(60));
    p.dst
        .send("dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | wc -w");
    p.dst.wait_for("\n16", done, Duration::from_secs(60));
    p.dst.send("poweroff -f");
    assert_eq!(
        p.dst.wait_exit(Duration::from_secs(60)),
        0,
        "{}",
        p.dst.describe()
    );
    let o = Command::new("debugfs")
        .args(["-R", "cat /moved.txt"])
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "moved\n");
    let _ = std::fs::remove_dir_all(&dir);
}
