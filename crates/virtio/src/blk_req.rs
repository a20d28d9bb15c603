//! Parsing a virtio-blk request (virtio 1.2, 5.2.6) from its descriptor chain. Pure and
//! guest-facing: no I/O, every field checked; fuzzed by `fuzz/fuzz_targets/virtio_blk_chain.rs`.

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Largest data a request may carry (the device advertises SEG_MAX × SIZE_MAX below it).
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// One descriptor as the chain gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write_only: bool,
}

/// A parsed request: the data segments between the header and the status byte.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    pub data: Vec<Desc>,
    /// Total data bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReqError {
    /// No writable byte to put a status in: the request cannot even be failed; it is
    /// returned with length 0.
    NoStatus,
    /// The request is malformed; the status byte gets IOERR.
    Bad { status: u64, why: &'static str },
}

/// `header` is the 16 bytes at the first descriptor (type, reserved, sector).
pub fn parse(header: [u8; 16], descs: &[Desc]) -> Result<Request, ReqError> {
    let last = descs.last().ok_or(ReqError::NoStatus)?;
    if !last.write_only || last.len == 0 {
        return Err(ReqError::NoStatus);
    }
    // The status byte is the last byte of the last descriptor.
    let status = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .ok_or(ReqError::NoStatus)?;
    let bad = |why| ReqError::Bad { status, why };
    let first = descs[0];
    if descs.len() < 2 && first.len < 17 {
        return Err(bad("no header and status in the chain"));
    }
    if first.write_only || first.len < 16 {
        return Err(bad("the header is not a readable 16-byte descriptor"));
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let mut data = Vec::new();
    // Data: everything after the header, less the status byte. A header descriptor longer
    // than 16 bytes carries data after it (any descriptor layout is allowed: 2.7.4).
    let mut segs: Vec<Desc> = Vec::with_capacity(descs.len());
    if first.len > 16 {
        segs.push(Desc {
            addr: first
                .addr
                .checked_add(16)
                .ok_or(bad("the header wraps around the address space"))?,
            len: first.len - 16,
            write_only: false,
        });
    }
    segs.extend_from_slice(&descs[1..]);
    // Drop the status byte from the last segment.
    if let Some(l) = segs.last_mut() {
        if l.len == 1 {
            segs.pop();
        } else {
            l.len -= 1;
        }
    }
    let mut data_len = 0u64;
    for d in segs {
        if d.len == 0 {
            continue;
        }
        data_len += u64::from(d.len);
        data.push(d);
    }
    if data_len > MAX_REQUEST_BYTES {
        return Err(bad("request larger than the device's maximum"));
    }
    let want_write_only = match kind {
        T_IN | T_GET_ID => Some(true),
        T_OUT | T_DISCARD | T_WRITE_ZEROES => Some(false),
        _ => None,
    };
    if let Some(w) = want_write_only
        && data.iter().any(|d| d.write_only != w)
    {
        return Err(bad("data descriptors of the wrong direction"));
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }
    const fn d(addr: u64, len: u32, write_only: bool) -> Desc {
        Desc {
            addr,
            len,
            write_only,
        }
    }

    #[test]
    fn the_usual_three_descriptor_read() {
        let r = parse(
            hdr(T_IN, 7),
            &[
                d(0x1000, 16, false),
                d(0x2000, 4096, true),
                d(0x3000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(
            (r.kind, r.sector, r.data_len, r.status),
            (T_IN, 7, 4096, 0x3000)
        );
        assert_eq!(r.data, vec![d(0x2000, 4096, true)]);
    }

    #[test]
    fn data_and_status_in_one_descriptor() {
        let r = parse(hdr(T_IN, 0), &[d(0x1000, 16, false), d(0x2000, 513, true)]).unwrap();
        assert_eq!((r.data_len, r.status), (512, 0x2200));
        let r = parse(
            hdr(T_OUT, 0),
            &[d(0x1000, 16 + 512, false), d(0x3000, 1, true)],
        )
        .unwrap();
        assert_eq!(r.data, vec![d(0x1010, 512, false)]);
    }

    #[test]
    fn malformed_chains_are_refused() {
        assert_eq!(parse(hdr(T_IN, 0), &[]), Err(ReqError::NoStatus));
        assert_eq!(
            parse(hdr(T_IN, 0), &[d(0x1000, 16, false)]),
            Err(ReqError::NoStatus)
        );
        assert!(matches!(
            parse(hdr(T_IN, 0), &[d(0x1000, 8, false), d(0x2000, 1, true)]),
            Err(ReqError::Bad { .. })
        ));
        // A read into a device-readable buffer.
        assert!(matches!(
            parse(
                hdr(T_IN, 0),
                &[
                    d(0x1000, 16, false),
                    d(0x2000, 512, false),
                    d(0x3000, 1, true)
                ]
            ),
            Err(ReqError::Bad { status: 0x3000, .. })
        ));
        // A header whose data part wraps (found by the fuzzer).
        assert!(matches!(
            parse(
                hdr(T_OUT, 0),
                &[d(u64::MAX, 0x7a0a, false), d(0x2000, 2, true)]
            ),
            Err(ReqError::Bad { .. })
        ));
        // Status address that wraps.
        assert_eq!(
            parse(hdr(T_IN, 0), &[d(0x1000, 16, false), d(u64::MAX, 2, true)]),
            Err(ReqError::NoStatus)
        );
        // Too large.
        let big: Vec<Desc> = std::iter::once(d(0, 16, false))
            .chain((0..40).map(|i| d(i << 32, u32::MAX, true)))
            .collect();
        assert!(matches!(
            parse(hdr(T_IN, 0), &big),
            Err(ReqError::Bad { .. })
        ));
    }
}
