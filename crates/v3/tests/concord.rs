//! ConCORD (docs/concord.md): content tracking, the directory's queries against ground truth
//! computed here from the guests' memory, the collective checkpoint, a directory that is down
//! or fed garbage, and three hosts (network namespaces) sharing a Redis Cluster directory.
//!
//! The guests are guests/concord (concord.elf): each fills a region with pages shared by
//! every VM, pages of its own, and copies of one page of its own, then idles (or keeps
//! rewriting some pages with `churn=N`, checking the whole region now and then).
//! "Settled" means: every VM finished a tracking round that started after its guest printed
//! "concord ready" (`PUT /vm/concord/sync`, two rounds, at most 2 × interval_ms + hashing).

mod common;
use common::*;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn vm_config(dir: &Path, name: &str, directory: &str, host: &str, cmdline: &str) -> PathBuf {
    let p = dir.join(format!("{name}.xml"));
    std::fs::write(
        &p,
        format!(
            r#"<vm class="PC"><memory>32</memory><backend>emu</backend>
  <extensions><extension name="concord" directory="{directory}" host="{host}" interval_ms="50"/></extensions>
  <devices><device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/><device class="SERIAL" id="serial"/></devices>
  <boot kernel="{}" cmdline="{cmdline}"/></vm>"#,
            guest("concord.elf").display()
        ),
    )
    .unwrap();
    p
}

struct Vm {
    name: String,
    host: String,
    sock: PathBuf,
    s: Session,
}

fn start_vm(
    dir: &Path,
    prefix: &[&str],
    name: &str,
    directory: &str,
    host: &str,
    cmdline: &str,
) -> Vm {
    start_vm_on("emu", dir, prefix, name, directory, host, cmdline)
}

fn start_vm_on(
    backend: &str,
    dir: &Path,
    prefix: &[&str],
    name: &str,
    directory: &str,
    host: &str,
    cmdline: &str,
) -> Vm {
    let cfg = vm_config(dir, name, directory, host, cmdline);
    let sock = dir.join(format!("{name}.sock"));
    // The entity is named after the API socket's stem (the session's name).
    let mut s = Session::start_in(
        prefix,
        &[
            "run",
            cfg.to_str().unwrap(),
            "--backend",
            backend,
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    wait_socket(&sock, &s);
    s.wait_for("concord ready", 0, Duration::from_secs(60));
    Vm {
        name: name.into(),
        host: host.into(),
        sock,
        s,
    }
}

fn sync(vm: &Vm) -> Value {
    let (st, v) = api(&vm.sock, "PUT", "/vm/concord/sync", None);
    assert_eq!(st, 200, "{v}\n{}", vm.s.describe());
    v
}

/// The whole guest RAM of a VM, from a checkpoint saved with `store` (the VM goes on).
fn save_image(vm: &Vm, path: &Path) -> Vec<u8> {
    let (st, v) = api(
        &vm.sock,
        "PUT",
        "/snapshot/create",
        Some(json!({ "path": path, "stop": false })),
    );
    assert_eq!(st, 200, "{v}");
    image_of(path)
}

/// The memory of the VM restored (paused) from `map`, saved to `ckpt` through `sock`.
fn restored_image(map: &Path, sock: &Path, ckpt: &Path) -> Vec<u8> {
    let vm = Vm {
        name: String::new(),
        host: String::new(),
        sock: sock.to_path_buf(),
        s: load_vm(map, sock, &["--paused"]),
    };
    save_image(&vm, ckpt)
}

fn image_of(path: &Path) -> Vec<u8> {
    let o = palacios_checkpoint::open(path, &mut |_, _| {}).unwrap();
    let mut img = vec![0u8; o.header.mem_len as usize];
    for &(off, len) in &o.meta.memory.extents {
        o.memory
            .read_exact_at(
                &mut img[off as usize..(off + len) as usize],
                o.mem_offset + off,
            )
            .unwrap();
    }
    img
}

/// Ground truth over (host, image) pairs, by content (not by hash).
#[derive(Debug, PartialEq, Eq)]
struct Truth {
    total: u64,
    distinct: u64,
    zero_pages: u64,
    nonzero_distinct: u64,
    intra_host: u64,
    inter_host: u64,
    shared_contents: u64,
    at_least_k: u64,
}

fn truth(vms: &[(&str, &[u8])], k: u64) -> Truth {
    let mut copies: HashMap<&[u8], (u64, HashSet<usize>)> = HashMap::new();
    let mut per_host: BTreeMap<&str, (u64, HashSet<&[u8]>)> = BTreeMap::new();
    let mut zero_pages = 0;
    for (i, (host, img)) in vms.iter().enumerate() {
        for p in img.chunks_exact(4096) {
            let e = copies.entry(p).or_default();
            e.0 += 1;
            e.1.insert(i);
            let h = per_host.entry(host).or_default();
            h.0 += 1;
            h.1.insert(p);
            if p.iter().all(|&b| b == 0) {
                zero_pages += 1;
            }
        }
    }
    let total: u64 = copies.values().map(|c| c.0).sum();
    let distinct = copies.len() as u64;
    let intra_host = per_host.values().map(|(t, d)| t - d.len() as u64).sum();
    Truth {
        total,
        distinct,
        zero_pages,
        nonzero_distinct: copies.keys().filter(|p| p.iter().any(|&b| b != 0)).count() as u64,
        intra_host,
        inter_host: total - distinct - intra_host,
        shared_contents: copies.values().filter(|c| c.1.len() >= 2).count() as u64,
        at_least_k: copies.values().filter(|c| c.0 >= k).count() as u64,
    }
}

/// Each VM's memory (saved to DIR/NAME.ckpt, the VMs go on) and the truth over all of them.
fn ground_truth(vms: &[Vm], dir: &Path, k: u64) -> (Vec<Vec<u8>>, Truth) {
    let images: Vec<Vec<u8>> = vms
        .iter()
        .map(|vm| save_image(vm, &dir.join(format!("{}.ckpt", vm.name))))
        .collect();
    let pairs: Vec<(&str, &[u8])> = vms
        .iter()
        .zip(&images)
        .map(|(vm, img)| (vm.host.as_str(), img.as_slice()))
        .collect();
    let t = truth(&pairs, k);
    (images, t)
}

fn answered(v: &Value) -> Truth {
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    Truth {
        total: n("total"),
        distinct: n("distinct"),
        zero_pages: n("zero_pages"),
        nonzero_distinct: n("nonzero_distinct"),
        intra_host: n("intra_host"),
        inter_host: n("inter_host"),
        shared_contents: n("shared_contents"),
        at_least_k: n("at_least_k"),
    }
}

fn concord(args: &[&str]) -> (i32, Value, String) {
    let r = v3(
        &[&["concord"], args].concat(),
        b"",
        Duration::from_secs(120),
    );
    let v = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
    (r.status, v, r.stderr)
}

/// `v3 concord checkpoint --stop` of `names` into `store`; its report.
fn collective_checkpoint(d: &str, store: &Path, names: &[&str]) -> Value {
    let (st, rep, err) = concord(
        &[
            &[
                "--directory",
                d,
                "checkpoint",
                "--store",
                store.to_str().unwrap(),
                "--stop",
            ],
            names,
        ]
        .concat(),
    );
    assert_eq!(st, 0, "{err}");
    rep
}

/// One host, four guests: the queries match ground truth; a collective checkpoint stores
/// each distinct page once, is smaller than four individual checkpoints by what the queries
/// say is shared, and every VM restores from it with exactly its memory.
#[test]
fn four_guests_queries_and_collective_checkpoint() {
    let dir = tmpdir("concord-one");
    let d = format!("unix:{}", dir.join("concord.sock").display());
    let mut vms: Vec<Vm> = (0..4)
        .map(|i| {
            start_vm(
                &dir,
                &[],
                &format!("vm{i}"),
                &d,
                "h1",
                &format!("id={i} mib=4 shared=256 private=128 dups=32"),
            )
        })
        .collect();
    for vm in &vms {
        sync(vm);
    }
    // Ground truth from each VM's memory (guests idle: nothing changes after "ready").
    let (images, want) = ground_truth(&vms, &dir, 3);
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let (st, v, err) = concord(&[&["--directory", &d, "sharing", "-k", "3"], &names[..]].concat());
    assert_eq!(st, 0, "{err}");
    assert_eq!(answered(&v), want, "{v}");
    assert!(want.shared_contents >= 256, "{want:?}");
    assert_eq!(v["unreachable"], json!([]));
    // Through a VM's control API too.
    let (st, v2) = api(&vms[0].sock, "GET", "/vm/concord/sharing?k=3", None);
    assert_eq!(st, 200, "{v2}");
    assert_eq!(answered(&v2), want);
    // Copies of a page shared by all four (the region starts at 16 MiB), and of a private one.
    for (gpa, copies) in [(0x100_0000u64, 4u64), (0x100_0000 + 300 * 4096, 1)] {
        let (_, p) = api(
            &vms[1].sock,
            "GET",
            &format!("/vm/concord/page?gpa={gpa:#x}"),
            None,
        );
        let h = p["hash"].as_str().unwrap().to_string();
        let (st, c, err) = concord(&["--directory", &d, "copies", &h]);
        assert_eq!(st, 0, "{err}");
        assert_eq!(c["copies"], copies, "{c}");
    }
    // The collective checkpoint.
    let store = dir.join("store");
    let rep = collective_checkpoint(&d, &store, &names);
    for vm in &mut vms {
        vm.s.wait_exit(Duration::from_secs(30));
    }
    assert_eq!(
        rep["stored_pages"].as_u64().unwrap(),
        want.nonzero_distinct,
        "each distinct non-zero page once: {rep}"
    );
    let written: u64 = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["collective"]["handled"].as_u64().unwrap())
        .sum();
    assert_eq!(
        written, want.nonzero_distinct,
        "all by the collective phase: {rep}"
    );
    let individual: u64 = vms
        .iter()
        .map(|vm| allocated(&dir.join(format!("{}.ckpt", vm.name))))
        .sum();
    let collective = rep["store_bytes"].as_u64().unwrap();
    let shared = (want.total - want.zero_pages - want.nonzero_distinct) as f64
        / (want.total - want.zero_pages) as f64;
    let saved = 1.0 - collective as f64 / individual as f64;
    eprintln!(
        "collective {collective} B vs individual {individual} B: saved {saved:.3}, shared fraction {shared:.3}"
    );
    // The page maps and metadata cost a little: allow 10 % of the shared fraction.
    assert!(
        saved >= shared * 0.9,
        "saved {saved:.3} < shared {shared:.3}"
    );
    // Each VM restores alone, with exactly the memory it had.
    for (vm, img) in vms.iter().zip(&images) {
        let back = restored_image(
            &store.join(format!("{}.vm", vm.name)),
            &dir.join(format!("r-{}.sock", vm.name)),
            &dir.join(format!("r-{}.ckpt", vm.name)),
        );
        assert!(back == *img, "{}: restored memory differs", vm.name);
    }
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Guests that keep rewriting pages while the collective checkpoint runs: pages change
/// between hashing and the collective phase, the local phase saves them, and each guest,
/// restored, checks its whole region and finds it as it wrote it. On each backend (the
/// dirty log comes from the emulator's write translations, or from KVM's dirty log).
#[test]
fn pages_changed_during_the_collective_phase_are_saved() {
    for b in backends() {
        changed_pages_on(b);
    }
}

fn changed_pages_on(backend: &str) {
    let dir = tmpdir(&format!("concord-churn-{backend}"));
    let d = format!("unix:{}", dir.join("concord.sock").display());
    let mut vms: Vec<Vm> = (0..2)
        .map(|i| {
            start_vm_on(
                backend,
                &dir,
                &[],
                &format!("c{i}"),
                &d,
                "h1",
                &if backend == "kvm" {
                    // This host's KVM runs the guest's (kernel-mode) code at 1-2 MIPS.
                    format!("id={i} mib=1 shared=32 private=32 dups=4 churn=16")
                } else {
                    format!("id={i} mib=4 shared=256 private=256 dups=16 churn=256")
                },
            )
        })
        .collect();
    for vm in &mut vms {
        vm.s.wait_for("verify ok", 0, Duration::from_secs(60));
        sync(vm);
    }
    let store = dir.join("store");
    let rep = collective_checkpoint(&d, &store, &["c0", "c1"]);
    let missed: u64 = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["collective"]["missed"].as_u64().unwrap())
        .sum();
    assert!(
        missed > 0,
        "{backend}: the guests changed pages the directory knew: {rep}"
    );
    for vm in &mut vms {
        vm.s.wait_exit(Duration::from_secs(30));
    }
    for vm in &vms {
        let sock = dir.join(format!("r-{}.sock", vm.name));
        let map = store.join(format!("{}.vm", vm.name));
        let mut l = Session::start(&[
            "load",
            map.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ]);
        let at = l.output().len();
        let v = l.wait_for("verify ", at, Duration::from_secs(60));
        let out = l.output();
        assert!(out[v..].starts_with("ok"), "{backend}: {}", l.describe());
    }
}

/// A directory that is down: tracking goes on, the status and the queries say so, and the
/// whole content reaches the directory once it answers. Garbage sent to the embedded
/// directory is refused without harming it.
#[test]
fn directory_down_and_garbage() {
    let dir = tmpdir("concord-down");
    // Nothing listens on this port: every publish fails.
    let vm = start_vm(
        &dir,
        &[],
        "lonely",
        "redis://127.0.0.1:9",
        "h1",
        "id=7 mib=2 shared=8 private=8 dups=2",
    );
    let t = Instant::now();
    let st = loop {
        let (_, v) = api(&vm.sock, "GET", "/vm/concord", None);
        if v["rounds"].as_u64().unwrap() >= 5 && v["publish_errors"].as_u64().unwrap() >= 1 {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st["connected"], false, "{st}");
    assert!(st["unpublished_rounds"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        st["last_error"].as_str().unwrap().contains("unreachable"),
        "{st}"
    );
    let (code, q) = api(&vm.sock, "GET", "/vm/concord/sharing", None);
    assert_eq!(code, 503, "{q}");
    assert!(q["tracking"]["rounds"].as_u64().unwrap() >= 5, "{q}");

    // The embedded directory: an independent server, then garbage.
    let sockp = dir.join("dir.sock");
    let d = format!("unix:{}", sockp.display());
    let mut server = Session::start(&["concord", "--directory", &d, "serve"]);
    server.wait_for("serving", 0, Duration::from_secs(10));
    let mut a = start_vm(
        &dir,
        &[],
        "a",
        &d,
        "h1",
        "id=1 mib=2 shared=8 private=8 dups=2",
    );
    sync(&a);
    for bad in [
        vec![],                                               // an empty frame
        vec![3, 0, 0, 0, 9, 9, 9],                            // unknown kind
        vec![20, 0, 0, 0, 1, 1, 0],                           // truncated
        vec![0xff, 0xff, 0xff, 0x7f, 1],                      // larger than the limit
        vec![9, 0, 0, 0, 1, 0, 3, 0, b'a', 0xff, b'b', 0, 0], // not UTF-8
    ] {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&sockp).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut frame = bad.clone();
        if bad.is_empty() {
            frame = vec![0, 0, 0, 0];
        }
        c.write_all(&frame).unwrap();
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(
            got.len() > 5 && got[4] == 0x81,
            "{bad:?}: expected an error reply, got {got:?}"
        );
    }
    let (st, v, err) = concord(&["--directory", &d, "entities"]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(v[0]["name"], "a", "the directory still serves: {v}");
    // The server goes away: the VM's tracker serves the directory itself and publishes all.
    server.kill9();
    let t = Instant::now();
    loop {
        let (_, s) = api(&a.sock, "GET", "/vm/concord", None);
        let (st, v, _) = concord(&["--directory", &d, "entities"]);
        if s["hosting_directory"] == true && st == 0 && v[0]["pages"] == s["pages"] {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{s} {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = api(&a.sock, "PUT", "/vm/stop", None);
    a.s.wait_exit(Duration::from_secs(30));
}

/// Three hosts (network namespaces), a Redis Cluster across them: the same queries across
/// hosts match ground truth, a collective checkpoint across them stores each distinct page
/// once and restores; a host leaving (its Redis node and its VM killed) makes the answers
/// partial, not errors.
#[test]
fn three_hosts_on_redis_cluster() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("scripts/redis-cluster-ns.sh");
    let work = tmpdir("concord-redis");
    let prefix = format!("cc{}", std::process::id() % 10000);
    let up = std::process::Command::new("bash")
        .arg(&script)
        .args(["up", &prefix, work.to_str().unwrap()])
        .output()
        .unwrap();
    if up.status.code() == Some(77) {
        palacios::vmm::test_support::missing_prerequisite(
            &test_name(),
            &String::from_utf8_lossy(&up.stderr),
        );
        return;
    }
    struct Down(PathBuf, String, PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = std::process::Command::new("bash")
                .arg(&self.0)
                .args(["down", &self.1, self.2.to_str().unwrap()])
                .output();
        }
    }
    let _down = Down(script.clone(), prefix.clone(), work.clone());
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let nodes: Vec<String> = String::from_utf8_lossy(&up.stdout)
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(nodes.len(), 3);
    let mut vms = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let ns = format!("{prefix}{}", i + 1);
        let d = format!("redis://{node}");
        vms.push(start_vm(
            &work,
            &["ip", "netns", "exec", &ns],
            &format!("r{i}"),
            &d,
            &format!("host{}", i + 1),
            &format!("id={i} mib=2 shared=128 private=64 dups=16"),
        ));
    }
    for vm in &vms {
        let s = sync(vm);
        assert_eq!(s["connected"], true, "{s}");
    }
    let (images, want) = ground_truth(&vms, &work, 2);
    let all = nodes.join(",");
    let d = format!("redis://{all}");
    let (st, v, err) = concord(&["--directory", &d, "sharing"]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(answered(&v), want, "{v}");
    assert!(want.inter_host > 0 && want.intra_host > 0, "{want:?}");
    let (_, p) = api(&vms[0].sock, "GET", "/vm/concord/page?gpa=0x1000000", None);
    let (st, c, err) = concord(&["--directory", &d, "copies", p["hash"].as_str().unwrap()]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(c["copies"], 3, "{c}");
    // A collective checkpoint across the three hosts (the VMs go on), each VM restorable
    // with exactly its memory: one restored here.
    let store = work.join("store");
    let (st, rep, err) = concord(&[
        "--directory",
        &d,
        "checkpoint",
        "--store",
        store.to_str().unwrap(),
        "r0",
        "r1",
        "r2",
    ]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(
        rep["stored_pages"].as_u64().unwrap(),
        want.nonzero_distinct,
        "{rep}"
    );
    let back = restored_image(
        &store.join("r1.vm"),
        &work.join("back-r1.sock"),
        &work.join("back-r1.ckpt"),
    );
    assert!(back == images[1], "r1 restored with different memory");
    // Host 3 leaves: its Redis node dies, and its VM with it.
    let k = std::process::Command::new("bash")
        .arg(&script)
        .args(["kill", &prefix, work.to_str().unwrap(), "3"])
        .output()
        .unwrap();
    assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
    vms[2].s.kill9();
    std::thread::sleep(Duration::from_secs(3));
    let (st, v2, err) = concord(&["--directory", &d, "sharing"]);
    assert_eq!(st, 0, "a host leaving is not an error: {err}");
    let lost =
        v2["unreachable"].as_array().unwrap().len() + v2["missing"].as_array().unwrap().len();
    assert!(
        lost >= 1 || v2["total"].as_u64().unwrap() < want.total,
        "the answer covers what is left: {v2}"
    );
    assert!(v2["total"].as_u64().unwrap() <= want.total, "{v2}");
    // The survivors keep tracking.
    let (_, s) = api(&vms[0].sock, "GET", "/vm/concord", None);
    assert!(s["rounds"].as_u64().unwrap() > 0, "{s}");
}

/// Four stock Debian guests booted from the same kernel and initramfs: the collective
/// checkpoint's store is smaller than four individual checkpoints by at least the shared
/// fraction the queries report (less 10 % for page maps and metadata), a page one guest keeps
/// changing during the collective phase is saved by the local phase, and each VM restores
/// from the store and answers at its shell.
#[test]
fn four_linux_guests_collective_checkpoint() {
    let Some((kernel, initrd, _)) = linux_guest() else {
        return;
    };
    let dir = tmpdir("concord-linux");
    let d = format!("unix:{}", dir.join("concord.sock").display());
    let cfg = dir.join("linux.xml");
    std::fs::write(
        &cfg,
        format!(
            r#"<vm class="PC"><memory>128</memory><backend>emu</backend>
  <extensions><extension name="concord" directory="{d}" host="h1" interval_ms="200"/></extensions>
  <devices><device class="8259A" id="pic"/><device class="8254_PIT" id="pit"/><device class="LAPIC" id="lapic"/>
  <device class="IOAPIC" id="ioapic"/><device class="NVRAM" id="nvram"/><device class="KEYBOARD" id="keyboard"/>
  <device class="PM_TIMER" id="pm_timer"/><device class="ACPI" id="acpi"/><device class="SERIAL" id="serial"/></devices>
  <boot format="linux" kernel="{}" initrd="{}" cmdline="console=ttyS0 nokaslr cryptomgr.notests"/></vm>"#,
            kernel.display(),
            initrd.display()
        ),
    )
    .unwrap();
    let names = ["l0", "l1", "l2", "l3"];
    let mut vms: Vec<(Session, PathBuf)> = names
        .iter()
        .map(|n| {
            let sock = dir.join(format!("{n}.sock"));
            let s = Session::start(&[
                "run",
                cfg.to_str().unwrap(),
                "--api-sock",
                sock.to_str().unwrap(),
            ]);
            (s, sock)
        })
        .collect();
    for (s, _) in &mut vms {
        let r = s.wait_for("PALACIOS-LINUX-READY", 0, Duration::from_secs(400));
        s.wait_for("# ", r, Duration::from_secs(60));
    }
    // l0 keeps rewriting a file while everything below runs.
    let at = vms[0].0.output().len();
    vms[0]
        .0
        .send("(while :; do dd if=/dev/urandom of=/tmp/w bs=4k count=32 2>/dev/null; done) & echo W''RITER=$!");
    vms[0].0.wait_for("WRITER=", at, Duration::from_secs(30));
    for (s, sock) in &vms {
        let (st, v) = api(sock, "PUT", "/vm/concord/sync", None);
        assert_eq!(st, 200, "{v}\n{}", s.describe());
    }
    let (st, q, err) = concord(&[&["--directory", &d, "sharing"], &names[..]].concat());
    assert_eq!(st, 0, "{err}");
    let n = |k: &str| q[k].as_u64().unwrap() as f64;
    let shared = (n("nonzero_total") - n("nonzero_distinct")) / n("nonzero_total");
    assert!(
        shared > 0.3,
        "four boots of one kernel share most pages: {q}"
    );
    // Four individual checkpoints (the VMs go on), for the sizes.
    let individual: u64 = vms
        .iter()
        .enumerate()
        .map(|(i, (_, sock))| {
            let p = dir.join(format!("l{i}.ckpt"));
            let (st, v) = api(
                sock,
                "PUT",
                "/snapshot/create",
                Some(json!({ "path": p, "stop": false })),
            );
            assert_eq!(st, 200, "{v}");
            allocated(&p)
        })
        .sum();
    let store = dir.join("store");
    let rep = collective_checkpoint(&d, &store, &names);
    for (s, _) in &mut vms {
        s.wait_exit(Duration::from_secs(60));
    }
    let collective = rep["store_bytes"].as_u64().unwrap();
    let saved = 1.0 - collective as f64 / individual as f64;
    eprintln!(
        "linux: collective {collective} B vs individual {individual} B: saved {saved:.3}, shared fraction {shared:.3}; {}",
        rep["total_ms"]
    );
    assert!(
        saved >= shared * 0.9,
        "saved {saved:.3} < shared {shared:.3}: {rep}"
    );
    let l0 = &rep["vms"][0]["collective"];
    assert!(
        l0["missed"].as_u64().unwrap() > 0,
        "the writer changed pages: {rep}"
    );
    for n in names {
        let sock = dir.join(format!("r-{n}.sock"));
        let map = store.join(format!("{n}.vm"));
        let mut l = load_vm(&map, &sock, &[]);
        let at = l.output().len();
        l.send("echo R''ESTORED-$((6*7)) $(wc -c < /tmp/w 2>/dev/null)");
        let r = l.wait_for("RESTORED-42", at, Duration::from_secs(60));
        if n == "l0" {
            // The writer's file is there (its size depends on where dd was).
            let e = l.wait_for("\n", r, Duration::from_secs(10));
            let size = l.output()[r..e].trim().to_string();
            assert!(size.parse::<u64>().is_ok(), "/tmp/w: '{size}'");
        }
        let _ = api(&sock, "PUT", "/vm/stop", None);
        l.wait_exit(Duration::from_secs(30));
    }
}
