//! virtio over PCI with the stock Debian kernel on the emulator: one boot with three virtio
//! disks (a raw FILEDISK, a QCOWDISK overlay over a raw base, a NETDISK served by qemu-nbd)
//! and a virtio-rng. The guest mounts each ext4 disk, reads the file the test put there,
//! writes one, syncs and powers off; the host reads the written files back with debugfs and
//! checks the overlay's base image is unchanged. The guest's /proc/interrupts must show the
//! disks on PCI-MSI (MSI-X), and /dev/hwrng must be the virtio one.

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

    let config = format!(
        r#"<vm class="PC">
  <memory>256</memory>
  <cores count="1"><core/></cores>
  <backend>emu</backend>
  <files>
    <file id="kernel" filename="{kernel}"/>
    <file id="initrd" filename="{initrd}"/>
  </files>
  <devices>
    <device class="8259A" id="pic"/>
    <device class="8254_PIT" id="pit"/>
    <device class="LAPIC" id="lapic"/>
    <device class="IOAPIC" id="ioapic"/>
    <device class="NVRAM" id="nvram"><start_time>now</start_time></device>
    <device class="KEYBOARD" id="keyboard" on_reset="stop"/>
    <device class="PM_TIMER" id="pm_timer"/>
    <device class="ACPI" id="acpi"/>
    <device class="SERIAL" id="serial"/>
    <device class="PCI" id="pci0"/>
    <device class="i440FX" id="northbridge"><bus>pci0</bus></device>
    <device class="PIIX3" id="southbridge"><bus>pci0</bus></device>
    <device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus><slot>3</slot></device>
    <device class="FILEDISK" id="raw" writable="1"><path>{raw}</path><frontend tag="blk0"/></device>
    <device class="LNX_VIRTIO_BLK" id="blk1"><bus>pci0</bus><slot>4</slot></device>
    <device class="QCOWDISK" id="qcow" writable="1"><path>{overlay}</path><frontend tag="blk1"/></device>
    <device class="LNX_VIRTIO_BLK" id="blk2"><bus>pci0</bus><slot>5</slot></device>
    <device class="NETDISK" id="nbd" writable="1" socket="{sock}" export="disk"><frontend tag="blk2"/></device>
    <device class="LNX_VIRTIO_RNG" id="rng0"><bus>pci0</bus><slot>6</slot></device>
  </devices>
  <boot format="linux" kernel="kernel" initrd="initrd"
        cmdline="console=ttyS0 nokaslr cryptomgr.notests"/>
</vm>
"#,
        kernel = kernel.display(),
        initrd = initrd.display(),
        raw = raw.display(),
        overlay = overlay.display(),
        sock = sock.display(),
    );
    let cfg_path = dir.join("virtio.xml");
    std::fs::write(&cfg_path, config).unwrap();

    let mut s = Session::start(&["run", cfg_path.to_str().unwrap()]);
    let ready = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(240));
    let mut at = s.wait_for("# ", ready, Duration::from_secs(60));
    let mut cmd = |s: &mut Session, line: &str, limit: u64| -> String {
        s.send(line);
        let echoed = s.wait_for(line, at, Duration::from_secs(30));
        let end = s.wait_for("\n/ # ", echoed, Duration::from_secs(limit));
        let out = s.output()[echoed + line.len()..end].to_string();
        at = end + 3;
        out
    };
    let mut seen = Vec::new();
    for (dev, want) in [
        ("vda", "from-raw"),
        ("vdb", "from-qcow2-base"),
        ("vdc", "from-nbd"),
    ] {
        let out = cmd(
            &mut s,
            &format!(
                "mount /dev/{dev} /mnt && cat /mnt/hello.txt && echo written-by-{dev} > /mnt/out.txt && sync && umount /mnt && echo DONE-{dev}"
            ),
            120,
        );
        assert!(
            out.contains(want) && out.contains(&format!("DONE-{dev}")),
            "/dev/{dev}: {out:?}\n{}",
            s.describe()
        );
        seen.push(dev);
    }
    let irqs = cmd(&mut s, "grep virtio /proc/interrupts", 30);
    assert!(
        irqs.lines().filter(|l| l.contains("PCI-MSI")).count() >= 3,
        "the virtio disks should interrupt through MSI-X: {irqs:?}"
    );
    let rng = cmd(
        &mut s,
        "cat /sys/class/misc/hw_random/rng_current; dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | wc -w",
        60,
    );
    assert!(rng.contains("virtio_rng"), "hwrng: {rng:?}");
    assert!(
        rng.lines().any(|l| l.trim() == "32"),
        "32 random bytes from /dev/hwrng: {rng:?}"
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
