//! Line buffering for debug-output ports: bytes are collected and logged a line at a time.

/// Lines longer than this are logged in pieces (a guest cannot grow the buffer without bound).
const MAX_LINE: usize = 256;

/// Its serde form (the partial line) is part of its device's checkpoint state.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LineBuf {
    #[serde(with = "super::serde_util::hex")]
    buf: Vec<u8>,
}

impl LineBuf {
    /// Add a byte; returns a complete line (without the newline) when one ends.
    pub fn push(&mut self, b: u8) -> Option<String> {
        match b {
            b'\n' => Some(self.take()),
            b'\r' => None,
            _ => {
                self.buf.push(b);
                (self.buf.len() >= MAX_LINE).then(|| self.take())
            }
        }
    }

    fn take(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        s
    }

    /// Refuses a partial line longer than a line can get (a restored checkpoint).
    pub fn check(&self) -> Result<(), String> {
        if self.buf.len() >= MAX_LINE {
            return Err(format!(
                "a partial line of {} bytes (lines are cut at {MAX_LINE})",
                self.buf.len()
            ));
        }
        Ok(())
    }

    /// What is left at the end.
    pub fn flush(&mut self) -> Option<String> {
        (!self.buf.is_empty()).then(|| self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_limits() {
        let mut l = LineBuf::default();
        let got: Vec<String> = b"ab\r\ncd\n".iter().filter_map(|&b| l.push(b)).collect();
        assert_eq!(got, vec!["ab", "cd"]);
        let long: Vec<String> = std::iter::repeat_n(b'x', 600)
            .filter_map(|b| l.push(b))
            .collect();
        assert_eq!(long.len(), 2);
        assert_eq!(l.flush().unwrap().len(), 600 - 512);
        assert_eq!(l.flush(), None);
    }
}
