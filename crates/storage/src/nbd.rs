//! A Network Block Device client.
//!
//! The fixed newstyle handshake with `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` for
//! servers that do not know it, or that do not offer the fixed newstyle), then transmission
//! with simple replies only (structured replies are never requested): READ, WRITE, FLUSH,
//! TRIM and WRITE_ZEROES, the last three only when the server advertises them. One
//! connection (TCP or Unix socket) serves all requests, one at a time under a mutex; requests
//! larger than 32 MiB are split. Every socket operation has a 30-second timeout, and once a
//! connection fails (the server went away, a timeout, a protocol violation) every later
//! request fails at once with the first error rather than guessing where the stream stands.

use crate::{BlockBackend, DiskError, check_range, make_serial};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR | 1;
const INFO_EXPORT: u16 = 0;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Largest request sent to the server; larger ones are split.
pub const MAX_REQUEST: u64 = 32 << 20;
/// Timeout of every connect, read and write on the socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 1 << 20;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl Stream {
    fn connect(addr: &str) -> Result<Stream, DiskError> {
        let ctx = || format!("connecting to NBD server {addr}");
        let s = if let Some(path) = addr.strip_prefix("unix:") {
            Stream::Unix(UnixStream::connect(path).map_err(|e| DiskError::io(ctx(), e))?)
        } else {
            let addrs = addr
                .to_socket_addrs()
                .map_err(|e| DiskError::io(ctx(), e))?;
            let mut last = None;
            let mut stream = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = match (stream, last) {
                (Some(s), _) => s,
                (None, Some(e)) => return Err(DiskError::io(ctx(), e)),
                (None, None) => {
                    return Err(DiskError::Protocol(format!(
                        "{}: the address resolves to nothing",
                        ctx()
                    )));
                }
            };
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        };
        let timeouts = match &s {
            Stream::Tcp(t) => t
                .set_read_timeout(Some(IO_TIMEOUT))
                .and_then(|()| t.set_write_timeout(Some(IO_TIMEOUT))),
            Stream::Unix(u) => u
                .set_read_timeout(Some(IO_TIMEOUT))
                .and_then(|()| u.set_write_timeout(Some(IO_TIMEOUT))),
        };
        timeouts.map_err(|e| DiskError::io(format!("setting socket timeouts for {addr}"), e))?;
        Ok(s)
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// The handshake, on a fresh connection: returns (size, transmission flags).
struct Handshake<'a> {
    s: &'a mut Stream,
    addr: &'a str,
}

impl Handshake<'_> {
    fn io(&self, what: &str, e: std::io::Error) -> DiskError {
        let hint = match e.kind() {
            std::io::ErrorKind::UnexpectedEof => " (the server closed the connection)".to_string(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!(" (no answer within {} s)", IO_TIMEOUT.as_secs())
            }
            _ => String::new(),
        };
        DiskError::io(format!("NBD handshake with {}: {what}{hint}", self.addr), e)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), DiskError> {
        self.s.read_exact(buf).map_err(|e| self.io(what, e))
    }

    fn u16(&mut self, what: &str) -> Result<u16, DiskError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DiskError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DiskError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    fn send(&mut self, buf: &[u8], what: &str) -> Result<(), DiskError> {
        self.s.write_all(buf).map_err(|e| self.io(what, e))
    }

    fn proto(&self, msg: impl std::fmt::Display) -> DiskError {
        DiskError::Protocol(format!("NBD handshake with {}: {msg}", self.addr))
    }

    fn run(&mut self, export: &str) -> Result<(u64, u16), DiskError> {
        if self.u64("reading the greeting")? != NBDMAGIC {
            return Err(self.proto("not an NBD server (bad greeting)"));
        }
        let m = self.u64("reading the greeting")?;
        if m == OLDSTYLE_MAGIC {
            return Err(
                self.proto("the server speaks the oldstyle protocol, which is not supported")
            );
        }
        if m != IHAVEOPT {
            return Err(self.proto(format!("unknown handshake magic {m:#x}")));
        }
        let hflags = self.u16("reading the handshake flags")?;
        let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        self.send(&cflags.to_be_bytes(), "sending the client flags")?;
        if fixed {
            if let Some(r) = self.opt_go(export)? {
                return Ok(r);
            }
            tracing::debug!(
                addr = self.addr,
                "NBD server lacks NBD_OPT_GO; using NBD_OPT_EXPORT_NAME"
            );
        }
        self.export_name(export, no_zeroes)
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), DiskError> {
        let len = u32::try_from(data.len()).map_err(|_| self.proto("export name too long"))?;
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&opt.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(data);
        self.send(&msg, "sending an option")
    }

    /// `Ok(None)`: the server does not support NBD_OPT_GO.
    fn opt_go(&mut self, export: &str) -> Result<Option<(u64, u16)>, DiskError> {
        let name = export.as_bytes();
        if name.len() > 4096 {
            return Err(self.proto("export name longer than 4096 bytes"));
        }
        let mut data = Vec::with_capacity(6 + name.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes()); // no information requests
        self.send_option(OPT_GO, &data)?;
        let mut info = None;
        loop {
            let what = "reading the reply to NBD_OPT_GO";
            if self.u64(what)? != OPT_REPLY_MAGIC {
                return Err(self.proto("bad option reply magic"));
            }
            let opt = self.u32(what)?;
            let ty = self.u32(what)?;
            let len = self.u32(what)?;
            if opt != OPT_GO {
                return Err(self.proto(format!("reply to option {opt} instead of NBD_OPT_GO")));
            }
            if len > MAX_OPTION_REPLY {
                return Err(self.proto(format!("option reply of {len} bytes is too long")));
            }
            let mut payload = vec![0u8; len as usize];
            self.read_exact(&mut payload, what)?;
            match ty {
                REP_ACK => break,
                REP_INFO
                    if payload.len() >= 12
                        && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT =>
                {
                    let mut sz = [0u8; 8];
                    sz.copy_from_slice(&payload[2..10]);
                    info = Some((
                        u64::from_be_bytes(sz),
                        u16::from_be_bytes([payload[10], payload[11]]),
                    ));
                }
                REP_ERR_UNSUP => return Ok(None),
                t if t & REP_ERR != 0 => {
                    let msg = String::from_utf8_lossy(&payload);
                    let why = match t & !REP_ERR {
                        2 => "refused by the server's policy",
                        3 => "invalid request",
                        4 => "unsupported on the server's platform",
                        5 => "the server requires TLS, which is not supported",
                        6 => "no such export",
                        7 => "the server is shutting down",
                        8 => "the server requires block size negotiation",
                        9 => "the request is too big",
                        _ => "error",
                    };
                    return Err(self.proto(format!("export {export:?}: {why} ({msg})")));
                }
                _ => {} // an informational reply this client does not know
            }
        }
        info.map(Some).ok_or_else(|| {
            self.proto("the server accepted NBD_OPT_GO without giving the export's size")
        })
    }

    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(u64, u16), DiskError> {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        let what = "reading the reply to NBD_OPT_EXPORT_NAME (no such export?)";
        let size = self.u64(what)?;
        let flags = self.u16(what)?;
        if !no_zeroes {
            let mut pad = [0u8; 124];
            self.read_exact(&mut pad, what)?;
        }
        Ok((size, flags))
    }
}

struct Conn {
    stream: Stream,
    next_cookie: u64,
    /// The first failure of the connection; later requests fail with it.
    broken: Option<String>,
}

/// A disk served by an NBD server.
pub struct NbdBackend {
    conn: Mutex<Conn>,
    addr: String,
    export: String,
    size: u64,
    flags: u16,
    read_only: bool,
    serial: String,
}

impl std::fmt::Debug for NbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdBackend")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish()
    }
}

impl NbdBackend {
    /// Connect to `addr` ("host:port" or "unix:/path") and open `export` (the default
    /// export, "", when `None`).
    pub fn connect(
        addr: &str,
        export: Option<&str>,
        writable: bool,
    ) -> Result<NbdBackend, DiskError> {
        let export = export.unwrap_or("");
        let mut stream = Stream::connect(addr)?;
        let (size, mut flags) = Handshake {
            s: &mut stream,
            addr,
        }
        .run(export)?;
        if flags & TFLAG_HAS_FLAGS == 0 {
            flags = 0;
        }
        if size > i64::MAX as u64 {
            return Err(DiskError::Protocol(format!(
                "NBD server {addr}: export size {size} is too large"
            )));
        }
        let read_only = !writable || flags & TFLAG_READ_ONLY != 0;
        tracing::debug!(
            addr,
            export,
            size,
            flags,
            read_only,
            "connected to NBD server"
        );
        let label = if export.is_empty() { "nbd" } else { export };
        Ok(NbdBackend {
            conn: Mutex::new(Conn {
                stream,
                next_cookie: 1,
                broken: None,
            }),
            serial: make_serial(label, &format!("nbd:{addr}/{export}")),
            addr: addr.to_string(),
            export: export.to_string(),
            size,
            flags,
            read_only,
        })
    }

    /// The transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        // A panic mid-request leaves the stream in an unknown place: mark it broken.
        match self.conn.lock() {
            Ok(g) => g,
            Err(p) => {
                let mut g = p.into_inner();
                g.broken.get_or_insert_with(|| "a request panicked".into());
                g
            }
        }
    }

    /// One request and its simple reply; `out` receives a read's data.
    fn request(
        &self,
        ty: u16,
        cmd_flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<(), DiskError> {
        let name = match ty {
            CMD_READ => "READ",
            CMD_WRITE => "WRITE",
            CMD_FLUSH => "FLUSH",
            CMD_TRIM => "TRIM",
            CMD_WRITE_ZEROES => "WRITE_ZEROES",
            _ => "command",
        };
        let mut c = self.lock();
        if let Some(why) = &c.broken {
            return Err(DiskError::Protocol(format!(
                "NBD server {}: the connection failed earlier ({why}); no further requests are sent",
                self.addr
            )));
        }
        let cookie = c.next_cookie;
        c.next_cookie += 1;
        let r = Self::exchange(&mut c, ty, cmd_flags, cookie, offset, len, data, out);
        let ctx = |what: &str| {
            format!(
                "NBD server {}: {name} of {len} bytes at {offset}: {what}",
                self.addr
            )
        };
        match r {
            Ok(0) => Ok(()),
            Ok(err) => Err(DiskError::io(
                ctx("the server returned an error"),
                std::io::Error::from_raw_os_error(err as i32),
            )),
            Err(Failure::Io(e)) => {
                let what = match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => {
                        "the server closed the connection".to_string()
                    }
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        format!("no answer within {} s", IO_TIMEOUT.as_secs())
                    }
                    _ => "connection lost".to_string(),
                };
                c.broken = Some(format!("{what}: {e}"));
                c.stream.shutdown();
                Err(DiskError::io(ctx(&what), e))
            }
            Err(Failure::Protocol(msg)) => {
                c.broken = Some(msg.clone());
                c.stream.shutdown();
                Err(DiskError::Protocol(ctx(&msg)))
            }
        }
    }

    /// Send one request and read its reply header (and data); returns the reply's error.
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        c: &mut Conn,
        ty: u16,
        cmd_flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<u32, Failure> {
        let mut hdr = [0u8; 28];
        hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr[4..6].copy_from_slice(&cmd_flags.to_be_bytes());
        hdr[6..8].copy_from_slice(&ty.to_be_bytes());
        hdr[8..16].copy_from_slice(&cookie.to_be_bytes());
        hdr[16..24].copy_from_slice(&offset.to_be_bytes());
        hdr[24..28].copy_from_slice(&len.to_be_bytes());
        if data.len() <= 64 << 10 {
            let mut msg = Vec::with_capacity(28 + data.len());
            msg.extend_from_slice(&hdr);
            msg.extend_from_slice(data);
            c.stream.write_all(&msg)?;
        } else {
            c.stream.write_all(&hdr)?;
            c.stream.write_all(data)?;
        }
        let mut rep = [0u8; 16];
        c.stream.read_exact(&mut rep)?;
        let magic = u32::from_be_bytes([rep[0], rep[1], rep[2], rep[3]]);
        let err = u32::from_be_bytes([rep[4], rep[5], rep[6], rep[7]]);
        let mut ck = [0u8; 8];
        ck.copy_from_slice(&rep[8..16]);
        let got = u64::from_be_bytes(ck);
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(Failure::Protocol(
                "structured reply that was never requested".into(),
            ));
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(Failure::Protocol(format!("bad reply magic {magic:#x}")));
        }
        if got != cookie {
            return Err(Failure::Protocol(format!(
                "reply for request {got}, expected {cookie}"
            )));
        }
        // A simple error reply carries no payload.
        if err == 0 && !out.is_empty() {
            c.stream.read_exact(out)?;
        }
        Ok(err)
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// TRIM or WRITE_ZEROES over a range, in requests of at most [`MAX_REQUEST`].
    fn ranged(&self, ty: u16, flags: u16, offset: u64, len: u64) -> Result<(), DiskError> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_REQUEST);
            self.request(ty, flags, offset + done, n as u32, &[], &mut [])?;
            done += n;
        }
        Ok(())
    }
}

enum Failure {
    Io(std::io::Error),
    Protocol(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Io(e)
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        let c = match self.conn.get_mut() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if c.broken.is_none() {
            let mut hdr = [0u8; 28];
            hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            hdr[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
            hdr[8..16].copy_from_slice(&c.next_cookie.to_be_bytes());
            let _ = c.stream.write_all(&hdr);
        }
        c.stream.shutdown();
    }
}

impl BlockBackend for NbdBackend {
    fn capacity(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut pos = offset;
        for chunk in buf.chunks_mut(MAX_REQUEST as usize) {
            self.request(CMD_READ, 0, pos, chunk.len() as u32, &[], chunk)?;
            pos += chunk.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_write(offset, buf.len() as u64)?;
        let mut pos = offset;
        for chunk in buf.chunks(MAX_REQUEST as usize) {
            self.request(CMD_WRITE, 0, pos, chunk.len() as u32, chunk, &mut [])?;
            pos += chunk.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only || self.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, &[], &mut [])
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        if self.flags & TFLAG_SEND_TRIM == 0 {
            return Ok(()); // discarded ranges may keep their data
        }
        self.ranged(CMD_TRIM, 0, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        if self.flags & TFLAG_SEND_WRITE_ZEROES == 0 {
            return crate::write_zero_data(self, offset, len);
        }
        let flags = if unmap { 0 } else { CMD_FLAG_NO_HOLE };
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len)
    }

    fn serial(&self) -> String {
        self.serial.clone()
    }

    fn kind(&self) -> &'static str {
        "nbd"
    }
}
