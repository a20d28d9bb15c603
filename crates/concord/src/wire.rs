//! The embedded directory's protocol on its Unix socket: length-prefixed binary frames.
//! Parsing is separate from I/O and never panics (fuzz target `concord_wire`).
//!
//! A frame is a little-endian u32 body length (at most [`MAX_FRAME`]) and the body; the
//! body's first byte is its kind. Strings are a u16 length and UTF-8 bytes; an update is a
//! u64 content hash and a u32 count (the entity's absolute number of pages with that content;
//! 0 removes it), so applying an update twice changes nothing.

use std::io::{Read, Write};

/// Largest frame accepted (a publish of about 5.5 million updates).
pub const MAX_FRAME: usize = 64 << 20;
const MAX_STR: usize = 255;

/// A request to the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// An entity's updates; `full`: they are its whole content (anything else it had is gone).
    Publish {
        entity: String,
        host: String,
        /// The entity's control-API socket (for collective commands), or empty.
        api: String,
        full: bool,
        updates: Vec<(u64, u32)>,
    },
    /// Every entity, with its host, page count and age.
    Entities,
    /// Who holds a content hash, and how many copies each.
    Holders(u64),
    /// One entity's contents.
    Contents(String),
    /// Forget an entity.
    Remove(String),
}

/// The directory's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Ok,
    Error(String),
    Json(serde_json::Value),
    Contents(Vec<(u64, u32)>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes is larger than the limit ({MAX_FRAME})")]
    TooLarge(usize),
    #[error("truncated message (wanted {0} more bytes)")]
    Truncated(usize),
    #[error("unknown message kind {0:#x}")]
    UnknownKind(u8),
    #[error("{0} bytes left over after the message")]
    Trailing(usize),
    #[error("bad string: {0}")]
    BadString(&'static str),
    #[error("empty message")]
    Empty,
}

struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(n - self.0.len()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().unwrap_or_default()) as usize;
        if n > MAX_STR {
            return Err(WireError::BadString("longer than 255 bytes"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::BadString("not UTF-8"))
    }
    fn updates(&mut self) -> Result<Vec<(u64, u32)>, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(12) > self.0.len() {
            return Err(WireError::Truncated(n.saturating_mul(12) - self.0.len()));
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push((self.u64()?, self.u32()?));
        }
        Ok(v)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.0.len()))
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_STR)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_updates(out: &mut Vec<u8>, u: &[(u64, u32)]) {
    out.extend_from_slice(&(u.len() as u32).to_le_bytes());
    for &(h, c) in u {
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Request::Publish {
                entity,
                host,
                api,
                full,
                updates,
            } => {
                b.push(1);
                b.push(*full as u8);
                put_str(&mut b, entity);
                put_str(&mut b, host);
                put_str(&mut b, api);
                put_updates(&mut b, updates);
            }
            Request::Entities => b.push(2),
            Request::Holders(h) => {
                b.push(3);
                b.extend_from_slice(&h.to_le_bytes());
            }
            Request::Contents(e) => {
                b.push(4);
                put_str(&mut b, e);
            }
            Request::Remove(e) => {
                b.push(5);
                put_str(&mut b, e);
            }
        }
        b
    }

    pub fn decode(body: &[u8]) -> Result<Request, WireError> {
        let mut c = Cur(body);
        let r = match c.take(1).map_err(|_| WireError::Empty)?[0] {
            1 => {
                let full = c.u8()? != 0;
                Request::Publish {
                    full,
                    entity: c.str()?,
                    host: c.str()?,
                    api: c.str()?,
                    updates: c.updates()?,
                }
            }
            2 => Request::Entities,
            3 => Request::Holders(c.u64()?),
            4 => Request::Contents(c.str()?),
            5 => Request::Remove(c.str()?),
            k => return Err(WireError::UnknownKind(k)),
        };
        c.end()?;
        Ok(r)
    }
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Reply::Ok => b.push(0x80),
            Reply::Error(m) => {
                b.push(0x81);
                b.extend_from_slice(m.as_bytes());
            }
            Reply::Json(v) => {
                b.push(0x82);
                b.extend_from_slice(v.to_string().as_bytes());
            }
            Reply::Contents(u) => {
                b.push(0x83);
                put_updates(&mut b, u);
            }
        }
        b
    }

    pub fn decode(body: &[u8]) -> Result<Reply, WireError> {
        let mut c = Cur(body);
        let r = match c.take(1).map_err(|_| WireError::Empty)?[0] {
            0x80 => Reply::Ok,
            0x81 => Reply::Error(String::from_utf8_lossy(c.take(c.0.len())?).into_owned()),
            0x82 => Reply::Json(
                serde_json::from_slice(c.take(c.0.len())?)
                    .map_err(|_| WireError::BadString("reply is not JSON"))?,
            ),
            0x83 => Reply::Contents(c.updates()?),
            k => return Err(WireError::UnknownKind(k)),
        };
        c.end()?;
        Ok(r)
    }
}

/// Write one frame.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(body.len() + 4);
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(body);
    w.write_all(&b)
}

/// Read one frame's body; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            WireError::TooLarge(n),
        ));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for r in [
            Request::Publish {
                entity: "vm1".into(),
                host: "h1".into(),
                api: "/tmp/x.sock".into(),
                full: true,
                updates: vec![(1, 2), (u64::MAX, 0)],
            },
            Request::Entities,
            Request::Holders(0xdead),
            Request::Contents("e".into()),
            Request::Remove("e".into()),
        ] {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
        for r in [
            Reply::Ok,
            Reply::Error("no".into()),
            Reply::Json(serde_json::json!({"a": 1})),
            Reply::Contents(vec![(5, 6)]),
        ] {
            assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let good = Request::Publish {
            entity: "vm1".into(),
            host: "h1".into(),
            api: String::new(),
            full: false,
            updates: vec![(1, 2), (3, 4)],
        }
        .encode();
        for n in 0..good.len() {
            assert!(Request::decode(&good[..n]).is_err(), "prefix {n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Request::decode(&long), Err(WireError::Trailing(1)));
        assert_eq!(Request::decode(&[9]), Err(WireError::UnknownKind(9)));
        // A count claiming more updates than the frame holds is refused before allocating.
        let mut huge = vec![4u8 + 1 - 4, 0, 0, 0, 0, 0, 0, 0, 0];
        huge[0] = 1;
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Request::decode(&huge),
            Err(WireError::Truncated(_))
        ));
        let mut big = std::io::Cursor::new(((MAX_FRAME + 1) as u32).to_le_bytes().to_vec());
        assert!(read_frame(&mut big).is_err());
    }
}
