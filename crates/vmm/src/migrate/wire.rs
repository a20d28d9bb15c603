//! The migration stream: checksummed frames over a byte stream (TCP). Pure encoding and
//! parsing, fuzzed on its own; `docs/migration.md` describes it.
//!
//! A frame: `b"PM"`, type (u8), flags (u8, 0), payload length (u32 LE), the payload, then the
//! CRC-64/XZ of type, flags, length and payload (u64 LE).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Largest payload (a page batch of 256 data pages is just over 1 MiB).
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Pages in one batch frame, at most.
pub const BATCH: usize = 256;
pub const PAGE: usize = 4096;
/// Stream version (semver: a receiver takes the same major version).
pub const VERSION: &str = "1.0.0";

const CRC: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source → destination: [`Hello`] (JSON).
    Hello = 1,
    /// Destination → source: ready to receive (JSON `{}`).
    Ready = 2,
    /// Either way: `{"error": "..."}`; the sender of it gives up.
    Refuse = 3,
    /// Source → destination: a batch of pages ([`encode_pages`]).
    Pages = 4,
    /// Source → destination: the paused VM's state (the checkpoint metadata as JSON).
    State = 5,
    /// Source → destination: everything is sent; the destination restores and resumes.
    Done = 6,
    /// Destination → source: the VM runs here now; the source ends.
    Resumed = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Ready,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::State,
            6 => Kind::Done,
            7 => Kind::Resumed,
            _ => return None,
        })
    }
}

/// Why a stream cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed in the middle of the migration")]
    Closed,
    #[error("not a migration stream (bad frame magic)")]
    Magic,
    #[error("unknown frame type {0}")]
    UnknownKind(u8),
    #[error("a frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("a frame is corrupt (CRC-64 mismatch): the data was damaged in transit")]
    Crc,
    #[error("a malformed {what} frame: {msg}")]
    Malformed { what: &'static str, msg: String },
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// A frame's header (8 bytes) and trailer (the CRC) around `payload`, for writing the three
/// without copying the payload.
pub fn frame_parts(kind: Kind, payload: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut h = [0u8; 8];
    h[..2].copy_from_slice(b"PM");
    h[2] = kind as u8;
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut d = CRC.digest();
    d.update(&h[2..]);
    d.update(payload);
    (h, d.finalize().to_le_bytes())
}

/// Encode a frame.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(b"PM");
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let mut d = CRC.digest();
    d.update(&out[2..]);
    out.extend_from_slice(&d.finalize().to_le_bytes());
    out
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    w.write_all(&encode(kind, payload))?;
    Ok(())
}

/// Read one frame (checks magic, size and CRC).
pub fn read_frame(r: &mut impl Read) -> Result<Frame, WireError> {
    let mut h = [0u8; 8];
    read_exact(r, &mut h)?;
    if &h[..2] != b"PM" {
        return Err(WireError::Magic);
    }
    let kind = Kind::from_u8(h[2]).ok_or(WireError::UnknownKind(h[2]))?;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    read_exact(r, &mut payload)?;
    let mut c = [0u8; 8];
    read_exact(r, &mut c)?;
    let mut d = CRC.digest();
    d.update(&h[2..]);
    d.update(&payload);
    if d.finalize() != u64::from_le_bytes(c) {
        return Err(WireError::Crc);
    }
    Ok(Frame { kind, payload })
}

/// Parse a frame from a byte slice (for fuzzing): the frame and the bytes it used.
pub fn parse_frame(b: &[u8]) -> Result<(Frame, usize), WireError> {
    let mut r = b;
    let f = read_frame(&mut r)?;
    Ok((f, b.len() - r.len()))
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Closed
        } else {
            WireError::Io(e)
        }
    })
}

/// The source's opening: what it is about to send.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub version: String,
    /// The VM's config (serde form).
    pub config: serde_json::Value,
    /// The source's CPUID feature leaves.
    pub cpuid: Vec<(u32, u32, [u32; 4])>,
    pub backend: String,
    /// Guest RAM: (guest-physical start, length) of each region.
    pub regions: Vec<(u64, u64)>,
}

/// A page in a batch: its guest-physical address, and its data (`None`: all zero).
pub type Page<'a> = (u64, Option<&'a [u8]>);

/// A batch: count (u32), then per page its address (u64, bit 0 set for a zero page) and, for
/// a data page, its 4096 bytes.
pub fn encode_pages(pages: &[Page]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + pages.len() * (8 + PAGE));
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for &(gpa, data) in pages {
        match data {
            Some(d) => {
                out.extend_from_slice(&gpa.to_le_bytes());
                out.extend_from_slice(&d[..PAGE]);
            }
            None => out.extend_from_slice(&(gpa | 1).to_le_bytes()),
        }
    }
    out
}

/// Parse a batch; calls `f(gpa, data)` for each page (`None`: zero page).
pub fn decode_pages(
    b: &[u8],
    mut f: impl FnMut(u64, Option<&[u8]>) -> Result<(), WireError>,
) -> Result<usize, WireError> {
    let bad = |msg: String| WireError::Malformed { what: "pages", msg };
    if b.len() < 4 {
        return Err(bad("no page count".into()));
    }
    let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if n > BATCH {
        return Err(bad(format!("{n} pages in one batch (at most {BATCH})")));
    }
    let mut at = 4;
    for _ in 0..n {
        let a = b
            .get(at..at + 8)
            .ok_or_else(|| bad("truncated page address".into()))?;
        let gpa = u64::from_le_bytes(a.try_into().unwrap_or_default());
        at += 8;
        if gpa & 1 != 0 {
            if (gpa & !1) % PAGE as u64 != 0 {
                return Err(bad(format!(
                    "zero page address {:#x} is not page aligned",
                    gpa & !1
                )));
            }
            f(gpa & !1, None)?;
            continue;
        }
        if gpa % PAGE as u64 != 0 {
            return Err(bad(format!("page address {gpa:#x} is not page aligned")));
        }
        let d = b
            .get(at..at + PAGE)
            .ok_or_else(|| bad("truncated page data".into()))?;
        at += PAGE;
        f(gpa, Some(d))?;
    }
    if at != b.len() {
        return Err(bad(format!("{} bytes after the last page", b.len() - at)));
    }
    Ok(n)
}

/// A refusal's message.
pub fn refusal(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| "no reason given".into())
}

pub fn refuse_payload(msg: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": msg })).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_caught() {
        let f = encode(Kind::State, b"{\"x\":1}");
        let (got, used) = parse_frame(&f).unwrap();
        assert_eq!(
            (got.kind, got.payload.as_slice(), used),
            (Kind::State, &b"{\"x\":1}"[..], f.len())
        );
        for i in 0..f.len() {
            let mut bad = f.clone();
            bad[i] ^= 0x20;
            assert!(parse_frame(&bad).is_err(), "byte {i} flipped unnoticed");
        }
        assert!(matches!(
            parse_frame(&f[..f.len() - 1]),
            Err(WireError::Closed)
        ));
        let mut big = encode(Kind::Pages, b"");
        big[4..8].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(parse_frame(&big), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn page_batches_round_trip_and_refuse_nonsense() {
        let data = vec![7u8; PAGE];
        let b = encode_pages(&[(0x1000, Some(&data)), (0x5000, None)]);
        let mut seen = Vec::new();
        assert_eq!(
            decode_pages(&b, |g, d| {
                seen.push((g, d.map(|d| d[0])));
                Ok(())
            })
            .unwrap(),
            2
        );
        assert_eq!(seen, vec![(0x1000, Some(7)), (0x5000, None)]);
        assert!(decode_pages(&b[..b.len() - 1], |_, _| Ok(())).is_err());
        let mut odd = b.clone();
        odd[4] = 0x10; // address 0x1010: not aligned
        assert!(decode_pages(&odd, |_, _| Ok(())).is_err());
        let mut many = b.clone();
        many[..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(decode_pages(&many, |_, _| Ok(())).is_err());
    }
}
