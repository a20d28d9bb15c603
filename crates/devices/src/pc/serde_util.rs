//! Serde helpers for device state: byte strings as hex, big arrays, `i128` as text and large,
//! mostly empty memories as their non-zero chunks.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

fn encode_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * b.len());
    for &x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("hex string of odd length {}", s.len()));
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("'{}' is not a hex digit", char::from(c))),
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Bytes (`Vec<u8>` or `[u8; N]`) as a hex string; a wrong length is an error.
pub mod hex {
    use super::*;

    pub fn serialize<S: Serializer, B: AsRef<[u8]>>(b: &B, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode_hex(b.as_ref()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, B: TryFrom<Vec<u8>>>(
        d: D,
    ) -> Result<B, D::Error> {
        let s = String::deserialize(d)?;
        let v = decode_hex(&s).map_err(D::Error::custom)?;
        let n = v.len();
        B::try_from(v).map_err(|_| D::Error::custom(format!("wrong number of bytes: {n}")))
    }
}

/// `[T; N]` of any length (serde derives arrays up to 32) as a sequence; a wrong length is an
/// error.
pub mod array {
    use super::*;

    pub fn serialize<S: Serializer, T: Serialize, const N: usize>(
        a: &[T; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        a.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
        d: D,
    ) -> Result<[T; N], D::Error> {
        let v = Vec::<T>::deserialize(d)?;
        let n = v.len();
        v.try_into()
            .map_err(|_| D::Error::invalid_length(n, &&*format!("{N} elements")))
    }
}

/// An `i128` as a decimal string (JSON numbers in a state value hold 64 bits).
pub mod i128_text {
    use super::*;

    pub fn serialize<S: Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        let s = String::deserialize(d)?;
        s.trim()
            .parse()
            .map_err(|_| D::Error::custom(format!("'{s}' is not an integer")))
    }
}

/// Chunk size of [`sparse`].
const CHUNK: usize = 256;
/// Largest memory [`sparse`] accepts (a bad value must not make the restore allocate wildly).
const SPARSE_MAX: usize = 16 << 20;

#[derive(Serialize, Deserialize)]
struct Sparse {
    len: usize,
    /// (offset, hex) of every chunk that is not all zero.
    chunks: Vec<(usize, String)>,
}

/// A byte buffer that is mostly zero (a device's scratch memory): its length and the non-zero
/// 256-byte chunks.
pub mod sparse {
    use super::*;

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let chunks = b
            .chunks(CHUNK)
            .enumerate()
            .filter(|(_, c)| c.iter().any(|&x| x != 0))
            .map(|(i, c)| (i * CHUNK, encode_hex(c)))
            .collect();
        Sparse {
            len: b.len(),
            chunks,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let sp = Sparse::deserialize(d)?;
        if sp.len > SPARSE_MAX {
            return Err(D::Error::custom(format!("length {} is too large", sp.len)));
        }
        let mut v = vec![0u8; sp.len];
        for (off, hex) in sp.chunks {
            let bytes = decode_hex(&hex).map_err(D::Error::custom)?;
            let dst = off
                .checked_add(bytes.len())
                .and_then(|end| v.get_mut(off..end))
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "chunk at {off} of {} bytes is beyond the length {}",
                        bytes.len(),
                        sp.len
                    ))
                })?;
            dst.copy_from_slice(&bytes);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct T {
        #[serde(with = "hex")]
        h: [u8; 3],
        #[serde(with = "array")]
        a: [u16; 40],
        #[serde(with = "i128_text")]
        i: i128,
        #[serde(with = "sparse")]
        s: Vec<u8>,
    }

    #[test]
    fn round_trip_and_errors() {
        let mut s = vec![0u8; 1000];
        s[300] = 7;
        let t = T {
            h: [1, 0xab, 0xff],
            a: [9; 40],
            i: -(1i128 << 100),
            s,
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["h"], "01abff");
        assert_eq!(v["s"]["chunks"].as_array().unwrap().len(), 1);
        assert_eq!(serde_json::from_value::<T>(v.clone()).unwrap(), t);
        let mut bad = v.clone();
        bad["h"] = "01ab".into();
        assert!(serde_json::from_value::<T>(bad).is_err());
        let mut bad = v.clone();
        bad["h"] = "01abzz".into();
        assert!(serde_json::from_value::<T>(bad).is_err());
        let mut bad = v.clone();
        bad["a"] = serde_json::json!([1, 2]);
        assert!(serde_json::from_value::<T>(bad).is_err());
        let mut bad = v.clone();
        bad["s"]["chunks"] = serde_json::json!([[999, "0102"]]);
        assert!(serde_json::from_value::<T>(bad).is_err());
        let mut bad = v;
        bad["s"]["len"] = serde_json::json!(usize::MAX);
        assert!(serde_json::from_value::<T>(bad).is_err());
    }
}
