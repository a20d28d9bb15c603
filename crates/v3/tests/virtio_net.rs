//! virtio-net with the stock Debian kernel on the emulator, in a network namespace made (and
//! removed) by the test, with `v3` itself running inside it: eth0 on a TAP, eth1 on a TAP
//! joined to a Linux bridge (NIC_BRIDGE). Ping both ways on each; 20 MB over TCP each way on
//! eth0 (host HTTP server to guest wget, guest httpd back to the host), checked by sha256;
//! the guest's negotiated features show the checksum and TSO offloads and mergeable buffers.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::Duration;

struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("v3net{}-{k}", std::process::id());
        // A namespace of this name can only be a leftover of a killed run with the same pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let o = Command::new("ip").args(["netns", "add", &name]).output();
        match o {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                palacios::vmm::test_support::skip_machine(
                    &test_name(),
                    &format!(
                        "cannot create a network namespace here: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                );
                return None;
            }
            Err(e) => {
                palacios::vmm::test_support::skip_machine(
                    &test_name(),
                    &format!("cannot run ip: {e}"),
                );
                return None;
            }
        }
        let ns = Netns(name);
        if !std::path::Path::new("/dev/net/tun").exists() {
            palacios::vmm::test_support::skip_machine(&test_name(), "no /dev/net/tun here");
            return None;
        }
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ip(&self, args: &[&str]) {
        let mut a = vec!["ip"];
        a.extend_from_slice(args);
        let o = self.exec(&a);
        assert!(
            o.status.success(),
            "ip {args:?} in {}: {}",
            self.0,
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A background process inside the namespace, killed on drop.
struct Bg(std::process::Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sha256(path: &std::path::Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn linux_virtio_net_pings_and_moves_20mb_each_way_over_tap_and_bridge() {
    let Some((kernel, initrd, _)) = linux_guest() else {
        return;
    };
    let has_ping = Command::new("sh")
        .args(["-c", "command -v ping"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_ping {
        palacios::vmm::test_support::missing_prerequisite(
            &test_name(),
            "ping (Debian: iputils-ping)",
        );
        return;
    }
    let Some(ns) = Netns::create() else {
        return;
    };
    let tap = format!("v3tap{}", std::process::id() % 100_000);
    ns.ip(&["link", "add", "v3br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "v3br0"]);
    ns.ip(&["link", "set", "v3br0", "up"]);

    let dir = tmpdir("virtio-net");
    let data = dir.join("data.bin");
    {
        let mut v = vec![0u8; 20 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for c in v.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        std::fs::write(&data, v).unwrap();
    }
    let want = sha256(&data);
    let config = linux_pci_vm(
        &kernel,
        &initrd,
        &format!(
            r#"    <device class="LNX_VIRTIO_NIC" id="net0"><bus>pci0</bus><slot>3</slot><mac>52:54:00:aa:00:01</mac></device>
    <device class="TAP" id="net0-tap" ifname="{tap}"><frontend tag="net0"/></device>
    <device class="LNX_VIRTIO_NIC" id="net1"><bus>pci0</bus><slot>4</slot><mac>52:54:00:aa:00:02</mac></device>
    <device class="NIC_BRIDGE" id="net1-br"><frontend tag="net1"/><hostnic name="v3br0"/></device>"#,
        ),
    );
    let cfg = dir.join("net.xml");
    std::fs::write(&cfg, config).unwrap();

    let prefix = ["ip", "netns", "exec", ns.0.as_str()];
    let mut s = Session::start_in(&prefix, &["run", cfg.to_str().unwrap()]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(240));
    // The TAP exists once the VM is built: give it the host side's address.
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", &tap]);
    ns.ip(&["link", "set", &tap, "up"]);
    let srv_dir = dir.to_str().unwrap().to_string();
    let _http = Bg(Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "python3",
            "-m",
            "http.server",
            "8081",
            "--bind",
            "10.77.0.1",
            "--directory",
            &srv_dir,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());

    let mut at = s.wait_for("# ", ready, Duration::from_secs(60));
    let mut cmd = |s: &mut Session, line: &str, limit: u64| -> String {
        s.send(line);
        let end = s.wait_for("\n/ # ", at, Duration::from_secs(limit));
        let out = s.output()[at..end].to_string();
        at = end + 3;
        out
    };
    cmd(
        &mut s,
        "ip link set eth0 up; ip addr add 10.77.0.2/24 dev eth0",
        30,
    );
    cmd(
        &mut s,
        "ip link set eth1 up; ip addr add 10.78.0.2/24 dev eth1",
        30,
    );
    let p = cmd(&mut s, "ping -c 3 -W 5 10.77.0.1", 60);
    assert!(
        p.contains("3 packets received"),
        "guest ping over the TAP: {p:?}\n{}",
        s.describe()
    );
    let p = cmd(&mut s, "ping -c 3 -W 5 10.78.0.1", 60);
    assert!(
        p.contains("3 packets received"),
        "guest ping over the bridge: {p:?}\n{}",
        s.describe()
    );
    for addr in ["10.77.0.2", "10.78.0.2"] {
        let o = ns.exec(&["ping", "-c", "3", "-W", "5", addr]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("3 received"),
            "host ping {addr}: {out}"
        );
    }

    // Features the driver accepted: a string of 0/1 by bit number.
    let f = cmd(&mut s, "cat /sys/class/net/eth0/device/features", 30);
    let bits = f
        .lines()
        .map(str::trim)
        .find(|l| l.len() >= 16 && l.chars().all(|c| c == '0' || c == '1'))
        .unwrap_or_else(|| panic!("no feature bits in {f:?}"))
        .to_string();
    for (bit, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
        (15, "MRG_RXBUF"),
    ] {
        assert_eq!(
            &bits[bit..bit + 1],
            "1",
            "{name} (bit {bit}) not negotiated: {bits}"
        );
    }

    // 20 MB host -> guest, then guest -> host, each checked by sha256.
    let out = cmd(
        &mut s,
        "wget -q -O /tmp/d http://10.77.0.1:8081/data.bin && sha256sum /tmp/d",
        300,
    );
    assert!(
        out.contains(&want),
        "guest's sha256 of the download: {out:?} (want {want})"
    );
    cmd(&mut s, "httpd -p 8080 -h /tmp", 30);
    let back = dir.join("back.bin");
    let o = ns.exec(&[
        "python3",
        "-c",
        &format!(
            "import urllib.request,shutil;shutil.copyfileobj(urllib.request.urlopen('http://10.77.0.2:8080/d',timeout=300),open('{}','wb'))",
            back.display()
        ),
    ]);
    assert!(
        o.status.success(),
        "fetching from the guest: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        sha256(&back),
        want,
        "the file the guest served back differs"
    );

    s.send("poweroff -f");
    assert_eq!(s.wait_exit(Duration::from_secs(60)), 0, "{}", s.describe());
    let _ = std::fs::remove_dir_all(&dir);
}

/// guests/virtio's net test on every backend: the guest sends a frame of ethertype 0x88b5 on
/// LNX_VIRTIO_NIC and waits for it to come back (MSI-X); an AF_PACKET echoer on the TAP
/// (inside a namespace the test makes) returns it.
#[test]
fn the_small_guest_sends_and_receives_on_virtio_net_on_every_backend() {
    let Some(ns) = Netns::create() else {
        return;
    };
    let tap = format!("v3e{}", std::process::id() % 100_000);
    ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"]);
    ns.ip(&["link", "set", &tap, "up"]);
    let echo = format!(
        "import socket\n\
         s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(0x88b5))\n\
         s.bind(('{tap}',0x88b5))\n\
         print('ready',flush=True)\n\
         while True:\n\
         \x20   f,a=s.recvfrom(2048)\n\
         \x20   if a[2]==socket.PACKET_OUTGOING: continue\n\
         \x20   s.send(f)\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c", &echo])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
    }
    let _echo = Bg(child);
    let dir = tmpdir("virtio-net-small");
    let cfg = dir.join("net.xml");
    std::fs::write(
        &cfg,
        format!(
            r#"<vm class="PC">
  <memory>64</memory>
  <cores count="1"><core/></cores>
  <devices>
    <device class="8259A" id="pic"/>
    <device class="LAPIC" id="lapic"/>
    <device class="IOAPIC" id="ioapic"/>
    <device class="8254_PIT" id="pit"/>
    <device class="SERIAL" id="serial"/>
    <device class="DEBUG_EXIT" id="exit"/>
    <device class="PCI" id="pci0"/>
    <device class="LNX_VIRTIO_NIC" id="net0"><bus>pci0</bus></device>
    <device class="TAP" id="t" ifname="{tap}"><frontend tag="net0"/></device>
  </devices>
  <boot format="multiboot" kernel="guest:virtio.elf" cmdline="test=net"/>
</vm>
"#
        ),
    )
    .unwrap();
    let prefix = ["ip", "netns", "exec", ns.0.as_str()];
    each_backend(|b| {
        let mut s = Session::start_in(&prefix, &["run", "--backend", b, cfg.to_str().unwrap()]);
        let status = s.wait_exit(Duration::from_secs(120));
        let out = s.output();
        assert_eq!(status, 1, "{b}: {}", s.describe());
        for want in [
            "PASS net init",
            "PASS net tx",
            "PASS net echo",
            "PASS net msix",
        ] {
            assert!(out.contains(want), "{b}: {want}\n{out}");
        }
        assert!(!out.contains("FAIL"), "{b}\n{out}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
