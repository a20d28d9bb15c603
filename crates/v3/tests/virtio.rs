//! virtio over PCI with the stock Debian kernel on the emulator: one boot with three virtio
//! disks (a raw FILEDISK, a QCOWDISK overlay over a raw base, a NETDISK served by qemu-nbd)
//! and a virtio-rng. The guest mounts each ext4 disk, reads the file the test put there,
//! writes one, syncs and powers off; the host reads the written files back with debugfs and
//! checks the overlay's base image is unchanged. The guest's /proc/interrupts must show the
//! disks on PCI-MSI (MSI-X), /dev/hwrng must be the virtio one, a shell on /dev/hvc0 answers
//! through the virtio console's Unix socket, and the balloon takes 64 MiB out of MemTotal
//! and gives it back (`v3 balloon`).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn tool(name: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn need_tools(tools: &[&str]) -> bool {
    for t in tools {
        if !tool(t) {
            palacios::vmm::test_support::missing_prerequisite(
                &test_name(),
                &format!("{t} (Debian: e2fsprogs, qemu-utils)"),
            );
            return false;
        }
    }
    true
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An ext4 image of `mib` MiB holding hello.txt with `text`.
fn ext4_with(path: &Path, mib: u32, text: &str) {
    let src = path.with_extension("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), text).unwrap();
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            src.to_str().unwrap(),
            path.to_str().unwrap(),
            &format!("{mib}M"),
        ],
    );
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    run(
        "debugfs",
        &["-R", &format!("cat {file}"), image.to_str().unwrap()],
    )
}

fn sha(path: &Path) -> String {
    run("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// qemu-nbd serving `image` on a Unix socket; killed on drop.
struct Nbd(std::process::Child, PathBuf);

impl Nbd {
    fn start(image: &Path, sock: &Path) -> Nbd {
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-k",
                sock.to_str().unwrap(),
                "-x",
                "disk",
                "--persistent",
            ])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-nbd");
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert!(sock.exists(), "qemu-nbd did not create {}", sock.display());
        Nbd(child, sock.to_path_buf())
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

#[test]
fn linux_uses_virtio_disks_raw_qcow2_and_nbd_and_the_rng() {
    let Some((kernel, initrd, _release)) = linux_guest() else {
        return;
    };
    if !need_tools(&["mke2fs", "debugfs", "qemu-img", "qemu-nbd"]) {
        return;
    }
    let dir = tmpdir("virtio-linux");
    let hvc_path = dir.join("hvc.sock");
    let hvc_listener = std::os::unix::net::UnixListener::bind(&hvc_path).unwrap();
    let raw = dir.join("raw.img");
    let base = dir.join("base.img");
    let overlay = dir.join("overlay.qcow2");
    let nbd_img = dir.join("nbd.img");
    ext4_with(&raw, 16, "from-raw\n");
    ext4_with(&base, 16, "from-qcow2-base\n");
    ext4_with(&nbd_img, 16, "from-nbd\n");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ],
    );
    let base_sha = sha(&base);
    let sock = dir.join("nbd.sock");
    let nbd = Nbd::start(&nbd_img, &sock);

    let config = linux_pci_vm(
        &kernel,
        &initrd,
        &format!(
            r#"    <device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus><slot>3</slot></device>
    <device class="FILEDISK" id="raw" writable="1"><path>{raw}</path><frontend tag="blk0"/></device>
    <device class="LNX_VIRTIO_BLK" id="blk1"><bus>pci0</bus><slot>4</slot></device>
    <device class="QCOWDISK" id="qcow" writable="1"><path>{overlay}</path><frontend tag="blk1"/></device>
    <device class="LNX_VIRTIO_BLK" id="blk2"><bus>pci0</bus><slot>5</slot></device>
    <device class="NETDISK" id="nbd" writable="1" socket="{sock}" export="disk"><frontend tag="blk2"/></device>
    <device class="LNX_VIRTIO_RNG" id="rng0"><bus>pci0</bus><slot>6</slot></device>
    <device class="LNX_VIRTIO_CONSOLE" id="hvc"><bus>pci0</bus><slot>7</slot></device>
    <device class="CHAR_STREAM" id="hvc-sock"><name>unix:{hvc}</name><frontend tag="hvc"/></device>
    <device class="LNX_VIRTIO_BALLOON" id="balloon"><bus>pci0</bus><slot>8</slot></device>"#,
            raw = raw.display(),
            overlay = overlay.display(),
            sock = sock.display(),
            hvc = hvc_path.display(),
        ),
    );
    let cfg_path = dir.join("virtio.xml");
    std::fs::write(&cfg_path, config).unwrap();
    let api = dir.join("api.sock");

    let mut s = Session::start(&[
        "run",
        cfg_path.to_str().unwrap(),
        "--api-sock",
        api.to_str().unwrap(),
    ]);
    let hvc = hvc_listener.accept().map(|(c, _)| c);
    let mut hvc = hvc.expect("v3 connects the virtio console's stream");
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(240));
    let mut at = s.wait_for("# ", ready, Duration::from_secs(60));
    // The console wraps long lines, so commands are short and the answer is what lies
    // between the command and the next prompt.
    let mut cmd = |s: &mut Session, line: &str, limit: u64| -> String {
        s.send(line);
        let end = s.wait_for("\n/ # ", at, Duration::from_secs(limit));
        let out = s.output()[at..end].to_string();
        at = end + 3;
        out
    };
    cmd(
        &mut s,
        "m() { mount /dev/$1 /mnt && cat /mnt/hello.txt && echo written-by-$1 >/mnt/out.txt && sync && umount /mnt && echo DONE-$1; }",
        30,
    );
    for (dev, want) in [
        ("vda", "from-raw"),
        ("vdb", "from-qcow2-base"),
        ("vdc", "from-nbd"),
    ] {
        let out = cmd(&mut s, &format!("m {dev}"), 120);
        assert!(
            out.contains(want) && out.contains(&format!("DONE-{dev}")),
            "/dev/{dev}: {out:?}\n{}",
            s.describe()
        );
    }
    let irqs = cmd(&mut s, "grep virtio /proc/interrupts", 30);
    assert!(
        irqs.lines().filter(|l| l.contains("PCI-MSI")).count() >= 3,
        "the virtio disks should interrupt through MSI-X: {irqs:?}"
    );
    let rng = cmd(&mut s, "cat /sys/class/misc/hw_random/rng_current", 30);
    assert!(rng.contains("virtio_rng"), "hwrng: {rng:?}");
    let rng = cmd(
        &mut s,
        "dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | wc -w",
        60,
    );
    assert!(
        rng.lines().any(|l| l.trim() == "32"),
        "32 random bytes from /dev/hwrng: {rng:?}"
    );

    // A shell on /dev/hvc0, driven through the console's Unix socket.
    cmd(
        &mut s,
        "setsid sh -c 'exec sh </dev/hvc0 >/dev/hvc0 2>&1' &",
        30,
    );
    hvc.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = String::new();
    for _ in 0..3 {
        use std::io::{Read, Write};
        hvc.write_all(b"echo hvc-$((6*7))\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 256];
        while !got.contains("hvc-42") && std::time::Instant::now() < deadline {
            match hvc.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => break,
            }
        }
        if got.contains("hvc-42") {
            break;
        }
    }
    assert!(
        got.contains("hvc-42"),
        "no answer from the shell on /dev/hvc0: {got:?}"
    );

    // The balloon: 64 MiB out of the guest, then back.
    let meminfo =
        |s: &mut Session, cmd: &mut dyn FnMut(&mut Session, &str, u64) -> String| -> u64 {
            let out = cmd(s, "grep MemTotal /proc/meminfo", 30);
            out.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no MemTotal in {out:?}"))
        };
    let before = meminfo(&mut s, &mut cmd);
    let api_s = api.to_str().unwrap();
    let r = v3(
        &["balloon", api_s, "--target", "64"],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(r.status, 0, "{}", r.out());
    let mut after = before;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        after = meminfo(&mut s, &mut cmd);
        if before - after >= 60 * 1024 {
            break;
        }
    }
    assert!(
        before - after >= 60 * 1024 && before - after <= 68 * 1024,
        "MemTotal {before} kB -> {after} kB with a 64 MiB balloon"
    );
    let r = v3(&["balloon", api_s], b"", Duration::from_secs(30));
    assert!(
        r.stdout.contains("\"actual_mib\": 64") || r.stdout.contains("\"actual_mib\":64"),
        "{}",
        r.out()
    );
    let r = v3(
        &["balloon", api_s, "--target", "0"],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(r.status, 0, "{}", r.out());
    let mut back = after;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        back = meminfo(&mut s, &mut cmd);
        if back >= before {
            break;
        }
    }
    assert_eq!(back, before, "MemTotal after deflating");
    let r = v3(&["balloon", api_s], b"", Duration::from_secs(30));
    assert!(
        r.stdout.contains("total_memory"),
        "guest statistics: {}",
        r.out()
    );

    s.send("poweroff -f");
    let status = s.wait_exit(Duration::from_secs(60));
    assert_eq!(status, 0, "{}", s.describe());
    drop(nbd);

    assert_eq!(debugfs_cat(&raw, "/out.txt"), "written-by-vda\n");
    let flat = dir.join("overlay.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            overlay.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
    assert_eq!(debugfs_cat(&flat, "/out.txt"), "written-by-vdb\n");
    assert_eq!(debugfs_cat(&flat, "/hello.txt"), "from-qcow2-base\n");
    let check = Command::new("qemu-img")
        .args(["check", overlay.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert_eq!(sha(&base), base_sha, "the qcow2 base image must not change");
    assert_eq!(debugfs_cat(&nbd_img, "/out.txt"), "written-by-vdc\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The disk layout guests/virtio expects: "PALACIOS-VIRTIO-DISK" then i & 0xff, in sector 0.
fn layout_disk(path: &Path, mib: usize) {
    let mut d = vec![0u8; mib << 20];
    d[..20].copy_from_slice(b"PALACIOS-VIRTIO-DISK");
    for (i, b) in d.iter_mut().enumerate().take(512).skip(20) {
        *b = i as u8;
    }
    std::fs::write(path, d).unwrap();
}

fn small_guest_config(dir: &Path, disk: &str, irqchip: &str, cmdline: &str) -> PathBuf {
    let cfg = format!(
        r#"<vm class="PC">
  <memory>64</memory>
  <cores count="1"><core/></cores>
  {irqchip}
  <files><file id="disk" filename="ram.img"/></files>
  <devices>
    <device class="8259A" id="pic"/>
    <device class="LAPIC" id="lapic"/>
    <device class="IOAPIC" id="ioapic"/>
    <device class="8254_PIT" id="pit"/>
    <device class="SERIAL" id="serial"/>
    <device class="DEBUG_EXIT" id="exit"/>
    <device class="PCI" id="pci0"/>
    <device class="i440FX" id="nb"><bus>pci0</bus></device>
    <device class="PIIX3" id="sb"><bus>pci0</bus></device>
    <device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus></device>
    {disk}
  </devices>
  <boot format="multiboot" kernel="guest:virtio.elf" cmdline="{cmdline}"/>
</vm>
"#
    );
    let p = dir.join(format!("small-{}.xml", std::process::id()));
    std::fs::write(&p, cfg).unwrap();
    p
}

/// guests/virtio (a freestanding virtio 1.x driver: PCI probe, MSI-X, split rings) against
/// LNX_VIRTIO_BLK on every backend, and on KVM with the in-kernel irqchip too (ioeventfd for
/// notifications, KVM_SIGNAL_MSI for completions): every check passes, with MSI-X interrupts,
/// the same PASS lines everywhere, and the writes reach the FILEDISK image. A misbehaving
/// driver (guests/virtio `test=bad`) gets spec behaviour and the VMM lives.
#[test]
fn the_small_virtio_guest_passes_on_every_backend_with_msix() {
    let dir = tmpdir("virtio-small");
    layout_disk(&dir.join("ram.img"), 1);
    let file_disk = |dir: &Path| {
        let p = dir.join("disk.img");
        layout_disk(&p, 8);
        format!(
            r#"<device class="FILEDISK" id="d0" writable="1"><path>{}</path><frontend tag="blk0"/></device>"#,
            p.display()
        )
    };
    let check = |r: &Run, what: &str| {
        assert_eq!(r.status, 1, "{what}\n{}", r.out());
        assert!(r.stdout.contains("PASS blk msix"), "{}", r.out());
        assert!(r.stdout.contains("virtio: blk using MSI-X"), "{}", r.out());
        assert!(!r.stdout.contains("FAIL"), "{}", r.out());
    };
    // test=bad: read-only config fields, a BAR over the local APIC, a descriptor outside guest
    // RAM, a descriptor loop, an avail index far ahead, a bad queue size and MSI-X vector;
    // the device recovers after each through a reset.
    let bad = [
        "PASS bad ro config",
        "PASS bad bar overlap",
        "PASS bad desc oob",
        "PASS bad desc loop",
        "PASS bad avail idx",
        "PASS bad recover idx",
        "PASS bad queue size",
        "PASS bad queue vector",
    ];
    each_backend(|b| {
        let cfg = small_guest_config(&dir, &file_disk(&dir), "", "test=blk,bad");
        let r = v3(
            &["run", cfg.to_str().unwrap()],
            b"",
            Duration::from_secs(120),
        );
        check(&r, b);
        for want in bad {
            assert!(r.stdout.contains(want), "{want}\n{}", r.out());
        }
        assert!(r.stdout.contains("PASS pci cfg window"), "{}", r.out());
        // The guest wrote sectors 8..15 with (sector * 7 + i) & 0xff.
        let img = std::fs::read(dir.join("disk.img")).unwrap();
        for s in 8..16usize {
            for i in 0..512 {
                assert_eq!(
                    img[s * 512 + i],
                    ((s * 7 + i) & 0xff) as u8,
                    "sector {s} byte {i}"
                );
            }
        }
        assert!(
            img[16 * 512..].iter().all(|&x| x == 0),
            "nothing else written"
        );
    });
    if kvm() {
        let disk = r#"<device class="RAMDISK" id="d0" file="disk"><frontend tag="blk0"/></device>"#;
        let cfg = small_guest_config(&dir, disk, "<irqchip>kernel</irqchip>", "test=blk");
        let r = v3(
            &["run", "--backend", "kvm", "--stats", cfg.to_str().unwrap()],
            b"",
            Duration::from_secs(120),
        );
        check(&r, "kvm, in-kernel irqchip");
    }
    // Plain MSI instead of MSI-X (the ISR says what happened), on every backend.
    each_backend(|b| {
        let cfg = small_guest_config(&dir, &file_disk(&dir), "", "test=blk msi");
        let r = v3(
            &["run", cfg.to_str().unwrap()],
            b"",
            Duration::from_secs(120),
        );
        assert_eq!(r.status, 1, "{b}\n{}", r.out());
        assert!(r.stdout.contains("PASS blk msi"), "{}", r.out());
        assert!(!r.stdout.contains("FAIL"), "{}", r.out());
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint carries the virtio functions: Linux with a virtio disk mounted and the rng in
/// use is saved, killed and loaded; after the load the same mount reads and writes the disk
/// and the rng still answers (PCI config, MSI-X table, queue positions restored).
#[test]
fn a_linux_guest_with_virtio_devices_survives_save_kill_and_load() {
    let Some((kernel, initrd, _)) = linux_guest() else {
        return;
    };
    if !need_tools(&["mke2fs", "debugfs"]) {
        return;
    }
    let dir = tmpdir("virtio-ckpt");
    let disk = dir.join("disk.img");
    ext4_with(&disk, 16, "before-the-save\n");
    let config = linux_pci_vm(
        &kernel,
        &initrd,
        &format!(
            r#"    <device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus></device>
    <device class="FILEDISK" id="d0" writable="1"><path>{disk}</path><frontend tag="blk0"/></device>
    <device class="LNX_VIRTIO_RNG" id="rng0"><bus>pci0</bus></device>"#,
            disk = disk.display(),
        ),
    );
    let cfg = dir.join("ckpt.xml");
    std::fs::write(&cfg, config).unwrap();
    let sock = dir.join("vm.sock");
    let ck = dir.join("vm.ckpt");
    let mut s = Session::start(&[
        "run",
        cfg.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(240));
    let at = s.wait_for("# ", ready, Duration::from_secs(60));
    s.send("mount /dev/vda /mnt && cat /mnt/hello.txt && echo MOUNTED");
    let m = s.wait_for("\nMOUNTED", at, Duration::from_secs(60));
    assert!(
        s.output()[at..m].contains("before-the-save"),
        "{}",
        s.describe()
    );
    s.wait_for("# ", m, Duration::from_secs(30));
    let (st, v) = palacios_api::request(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&serde_json::json!({"path": ck.display().to_string()})),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(st, 200, "{v}");
    s.kill9();

    let mut l = Session::start(&["load", ck.to_str().unwrap()]);
    l.send("cat /mnt/hello.txt; echo after-the-load > /mnt/new.txt; sync; umount /mnt; echo DONE-$((1+1))");
    let done = l.wait_for("DONE-2", 0, Duration::from_secs(120));
    l.send("dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | wc -w");
    let words = l.wait_for("\n16", done, Duration::from_secs(60));
    assert!(words > done);
    l.send("poweroff -f");
    assert_eq!(l.wait_exit(Duration::from_secs(60)), 0, "{}", l.describe());
    assert_eq!(debugfs_cat(&disk, "/new.txt"), "after-the-load\n");
    let _ = std::fs::remove_dir_all(&dir);
}
