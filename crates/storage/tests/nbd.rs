//! The NBD client against `qemu-nbd` (TCP and Unix sockets) and against a small in-process
//! server that exercises what qemu-nbd does not: the NBD_OPT_EXPORT_NAME fallback, missing
//! TRIM/WRITE_ZEROES support, protocol violations.

mod common;

use common::{Rng, TempDir, assert_same, have_tool};
use palacios_storage::{BlockBackend, DiskError, connect_nbd};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A qemu-nbd child, killed when dropped.
struct QemuNbd {
    child: Option<Child>,
    addr: String,
}

impl QemuNbd {
    /// Serve `image` on a free TCP port of 127.0.0.1 (`export`: `-x` name) or, with
    /// `unix` set, on a Unix socket in `dir`.
    fn start(
        image: &Path,
        dir: &TempDir,
        export: Option<&str>,
        unix: bool,
        extra: &[&str],
    ) -> QemuNbd {
        for attempt in 0..5 {
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["-f", "raw", "--persistent", "--shared=8"])
                .args(extra);
            if let Some(x) = export {
                cmd.args(["-x", x]);
            }
            let addr = if unix {
                let sock = dir.join(&format!("nbd{attempt}.sock"));
                cmd.arg("-k").arg(&sock);
                format!("unix:{}", sock.display())
            } else {
                // A port that was free a moment ago; retried if qemu-nbd cannot bind it.
                let port = TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
                format!("127.0.0.1:{port}")
            };
            let log = std::fs::File::create(dir.join("qemu-nbd.log")).unwrap();
            cmd.arg(image)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            let child = cmd.spawn().expect("starting qemu-nbd");
            let mut server = QemuNbd {
                child: Some(child),
                addr,
            };
            if server.wait_ready() {
                return server;
            }
            drop(server);
        }
        let log = std::fs::read_to_string(dir.join("qemu-nbd.log")).unwrap_or_default();
        panic!("qemu-nbd did not start: {log}");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return false; // exited (e.g. the port was taken)
            }
            let up = match self.addr.strip_prefix("unix:") {
                Some(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                None => TcpStream::connect(&self.addr).is_ok(),
            };
            if up {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 % 253) as u8).collect()
}

fn exercise(b: &dyn BlockBackend, model: &mut [u8]) {
    let cap = b.capacity();
    let mut all = vec![0u8; cap as usize];
    b.read_at(&mut all, 0).unwrap();
    assert_same(&all, model, "initial contents");
    let mut rng = Rng(77);
    for _ in 0..50 {
        let len = 1 + rng.below(100_000);
        let off = rng.below(cap - len);
        let data = rng.bytes(len as usize);
        b.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    // Larger than one request (32 MiB): split.
    let big = rng.bytes((33 << 20) + 1234);
    b.write_at(&big, 4097).unwrap();
    model[4097..4097 + big.len()].copy_from_slice(&big);
    b.write_zeroes(1 << 20, 300_000, false).unwrap();
    model[1 << 20..(1 << 20) + 300_000].fill(0);
    b.write_zeroes(5 << 20, 1 << 20, true).unwrap();
    model[5 << 20..6 << 20].fill(0);
    b.discard(10 << 20, 1 << 20).unwrap(); // may keep or drop the data: overwrite it after
    b.write_at(&vec![0x3c; 1 << 20], 10 << 20).unwrap();
    model[10 << 20..11 << 20].fill(0x3c);
    b.flush().unwrap();
    assert!(matches!(
        b.write_at(&[1, 2], cap - 1),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.read_at(&mut [0; 1], cap),
        Err(DiskError::OutOfRange { .. })
    ));
    b.read_at(&mut all, 0).unwrap();
    assert_same(&all, model, "read back over NBD");
    let mut piece = vec![0u8; 40 << 20];
    b.read_at(&mut piece, 3).unwrap();
    assert_same(&piece, &model[3..3 + (40 << 20)], "split read");
}

#[test]
fn qemu_nbd_tcp_read_write_flush() {
    if !have_tool("qemu-nbd", "qemu_nbd_tcp_read_write_flush") {
        return;
    }
    let dir = TempDir::new("nbd-tcp");
    let img = dir.join("disk.raw");
    let mut model = pattern(48 << 20);
    std::fs::write(&img, &model).unwrap();
    let mut server = QemuNbd::start(&img, &dir, Some("exportname"), false, &[]);
    let b = connect_nbd(&server.addr, Some("exportname"), true).unwrap();
    assert_eq!(b.kind(), "nbd");
    assert_eq!(b.capacity(), 48 << 20);
    assert!(!b.read_only());
    assert!(b.serial().len() <= 20);
    exercise(&*b, &mut model);
    // Several threads share the one connection.
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let off = (i * 4 + u64::from(t)) * 8192;
                    b.write_at(&[t + 1; 8192], off).unwrap();
                    let mut back = [0u8; 8192];
                    b.read_at(&mut back, off).unwrap();
                    assert_eq!(back, [t + 1; 8192]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for blk in 0..200usize {
        model[blk * 8192..(blk + 1) * 8192].fill((blk % 4) as u8 + 1);
    }
    b.flush().unwrap();
    drop(b); // sends NBD_CMD_DISC
    server.kill();
    assert_same(
        &std::fs::read(&img).unwrap(),
        &model,
        "image file after the session",
    );

    // A wrong export name is refused with a clear error.
    let server = QemuNbd::start(&img, &dir, Some("exportname"), false, &[]);
    let e = connect_nbd(&server.addr, Some("nope"), true)
        .err()
        .expect("unknown export");
    assert!(e.to_string().contains("nope"), "{e}");
    let e = connect_nbd("127.0.0.1:1", None, true)
        .err()
        .expect("nothing listening");
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
}

#[test]
fn qemu_nbd_unix_socket_default_export_and_read_only() {
    if !have_tool(
        "qemu-nbd",
        "qemu_nbd_unix_socket_default_export_and_read_only",
    ) {
        return;
    }
    let dir = TempDir::new("nbd-unix");
    let img = dir.join("disk.raw");
    let mut model = pattern(48 << 20);
    std::fs::write(&img, &model).unwrap();
    {
        let _server = QemuNbd::start(&img, &dir, None, true, &[]);
        let b = connect_nbd(&_server.addr, None, true).unwrap();
        exercise(&*b, &mut model);
        // writable=false on a writable export: read-only here.
        let ro = connect_nbd(&_server.addr, None, false).unwrap();
        assert!(ro.read_only());
        assert!(matches!(ro.write_at(&[0], 0), Err(DiskError::ReadOnly)));
        assert!(matches!(
            ro.write_zeroes(0, 512, false),
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(ro.discard(0, 512), Err(DiskError::ReadOnly)));
    }
    assert_same(
        &std::fs::read(&img).unwrap(),
        &model,
        "image file after the session",
    );

    // A read-only export (qemu-nbd -r) is read-only even when asked for writing.
    let _server = QemuNbd::start(&img, &dir, None, true, &["-r"]);
    let b = connect_nbd(&_server.addr, None, true).unwrap();
    assert!(b.read_only());
    assert!(matches!(b.write_at(&[0], 0), Err(DiskError::ReadOnly)));
    let mut buf = vec![0u8; 65536];
    b.read_at(&mut buf, 1 << 20).unwrap();
    assert_same(&buf, &model[1 << 20..(1 << 20) + 65536], "read-only export");
}

#[test]
fn killed_server_gives_an_error_quickly() {
    if !have_tool("qemu-nbd", "killed_server_gives_an_error_quickly") {
        return;
    }
    let dir = TempDir::new("nbd-kill");
    let img = dir.join("disk.raw");
    std::fs::write(&img, pattern(4 << 20)).unwrap();
    for unix in [false, true] {
        let mut server = QemuNbd::start(&img, &dir, Some("x"), unix, &[]);
        let b = connect_nbd(&server.addr, Some("x"), true).unwrap();
        let mut buf = vec![0u8; 4096];
        b.read_at(&mut buf, 0).unwrap();
        server.kill();
        let t = Instant::now();
        let e = b
            .read_at(&mut buf, 4096)
            .expect_err("read after the server died");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        let msg = e.to_string();
        assert!(msg.contains(&server.addr), "{msg}");
        // Later requests fail at once, naming the first failure.
        let t = Instant::now();
        let e = b
            .write_at(&buf, 0)
            .expect_err("write after the server died");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(e.to_string().contains("failed earlier"), "{e}");
        assert!(b.flush().is_err());
    }
}

// ---- an in-process server ----

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

fn rd<const N: usize>(s: &mut TcpStream) -> [u8; N] {
    let mut b = [0u8; N];
    s.read_exact(&mut b).unwrap();
    b
}

fn rd_u32(s: &mut TcpStream) -> u32 {
    u32::from_be_bytes(rd(s))
}

fn rd_u64(s: &mut TcpStream) -> u64 {
    u64::from_be_bytes(rd(s))
}

#[derive(Clone, Copy, PartialEq)]
enum Fake {
    /// No NBD_OPT_GO, no NO_ZEROES; only READ/WRITE/FLUSH.
    OldServer,
    /// NBD_OPT_GO; answers the second request with the wrong cookie.
    BadCookie,
}

/// Serve one client; returns the commands seen.
fn fake_server(kind: Fake, size: u64) -> (String, std::thread::JoinHandle<Vec<u16>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut disk = vec![0u8; size as usize];
        let mut seen = Vec::new();
        let hflags: u16 = if kind == Fake::OldServer { 1 } else { 3 };
        let mut hello = Vec::new();
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&hflags.to_be_bytes());
        s.write_all(&hello).unwrap();
        let cflags = rd_u32(&mut s);
        assert_eq!(cflags, u32::from(hflags), "client flags");
        let tflags: u16 = 1 | 4; // HAS_FLAGS | SEND_FLUSH
        loop {
            assert_eq!(rd_u64(&mut s), IHAVEOPT);
            let opt = rd_u32(&mut s);
            let len = rd_u32(&mut s) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).unwrap();
            let reply = |s: &mut TcpStream, ty: u32, payload: &[u8]| {
                let mut r = Vec::new();
                r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
                r.extend_from_slice(&opt.to_be_bytes());
                r.extend_from_slice(&ty.to_be_bytes());
                r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                r.extend_from_slice(payload);
                s.write_all(&r).unwrap();
            };
            match (kind, opt) {
                (Fake::OldServer, 7) => reply(&mut s, (1 << 31) | 1, b""),
                (Fake::OldServer, 1) => {
                    assert_eq!(data, b"old");
                    let mut r = Vec::new();
                    r.extend_from_slice(&size.to_be_bytes());
                    r.extend_from_slice(&tflags.to_be_bytes());
                    r.extend_from_slice(&[0u8; 124]);
                    s.write_all(&r).unwrap();
                    break;
                }
                (Fake::BadCookie, 7) => {
                    let mut info = vec![0u8, 0];
                    info.extend_from_slice(&size.to_be_bytes());
                    info.extend_from_slice(&tflags.to_be_bytes());
                    reply(&mut s, 3, &info);
                    reply(&mut s, 1, b"");
                    break;
                }
                _ => panic!("unexpected option {opt}"),
            }
        }
        loop {
            let mut hdr = [0u8; 28];
            if s.read_exact(&mut hdr).is_err() {
                break;
            }
            assert_eq!(&hdr[..4], &0x2560_9513u32.to_be_bytes());
            let ty = u16::from_be_bytes([hdr[6], hdr[7]]);
            let mut cookie = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
            let off = u64::from_be_bytes(hdr[16..24].try_into().unwrap()) as usize;
            let len = u32::from_be_bytes(hdr[24..28].try_into().unwrap()) as usize;
            seen.push(ty);
            if kind == Fake::BadCookie && seen.len() == 2 {
                cookie ^= 0xdead;
            }
            let mut rep = Vec::new();
            rep.extend_from_slice(&0x6744_6698u32.to_be_bytes());
            rep.extend_from_slice(&0u32.to_be_bytes());
            rep.extend_from_slice(&cookie.to_be_bytes());
            match ty {
                0 => rep.extend_from_slice(&disk[off..off + len]),
                1 => s.read_exact(&mut disk[off..off + len]).unwrap(),
                2 => break,
                3 => {}
                _ => panic!("command {ty} was not advertised"),
            }
            s.write_all(&rep).unwrap();
        }
        seen
    });
    (addr, h)
}

#[test]
fn export_name_fallback_and_unadvertised_commands() {
    let (addr, h) = fake_server(Fake::OldServer, 1 << 20);
    let b = connect_nbd(&addr, Some("old"), true).unwrap();
    assert_eq!(b.capacity(), 1 << 20);
    b.write_at(&[7u8; 3000], 100).unwrap();
    // Without SEND_WRITE_ZEROES: written as data; without SEND_TRIM: nothing sent.
    b.write_zeroes(1000, 1000, true).unwrap();
    b.discard(0, 4096).unwrap();
    b.flush().unwrap();
    let mut buf = vec![0u8; 4000];
    b.read_at(&mut buf, 0).unwrap();
    let mut want = vec![0u8; 4000];
    want[100..3100].fill(7);
    want[1000..2000].fill(0);
    assert_same(&buf, &want, "fake server");
    drop(b);
    let seen = h.join().unwrap();
    assert_eq!(
        seen,
        vec![1, 1, 3, 0, 2],
        "WRITE, WRITE (zeroes), FLUSH, READ, DISC"
    );
}

#[test]
fn protocol_violation_breaks_the_connection() {
    let (addr, h) = fake_server(Fake::BadCookie, 1 << 20);
    let b = connect_nbd(&addr, None, true).unwrap();
    let mut buf = [0u8; 512];
    b.read_at(&mut buf, 0).unwrap();
    let e = b.read_at(&mut buf, 512).expect_err("wrong cookie");
    assert!(matches!(e, DiskError::Protocol(_)), "{e}");
    assert!(e.to_string().contains("expected"), "{e}");
    let e = b.read_at(&mut buf, 0).expect_err("after a protocol error");
    assert!(e.to_string().contains("failed earlier"), "{e}");
    drop(b);
    assert_eq!(h.join().unwrap(), vec![0, 0]);
}
