//! Palacios-style XML configuration.
//!
//! [`node`] turns XML into an owned tree with positions and applies Palacios' value rule; [`vm`]
//! reads the VM-level model ([`VmConfig`]) out of it. Devices read their own subtrees.

pub mod ext;
pub mod node;
pub mod vm;

pub use ext::{ExtensionConfig, TimeConfig};
pub use node::{ConfigNode, Pos};
pub use vm::{
    BackendChoice, BootConfig, BootFormat, DeviceConfig, IrqchipMode, ModuleConfig, VmConfig,
};

use std::path::PathBuf;

/// A configuration error, with the file and position where known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub pos: Option<Pos>,
    pub msg: String,
}

impl ConfigError {
    pub fn new(pos: Option<Pos>, msg: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            pos,
            msg: msg.into(),
        }
    }
    /// Attach the file name if none is set yet.
    pub fn in_file(mut self, file: Option<&std::path::Path>) -> Self {
        if self.file.is_none() {
            self.file = file.map(|f| f.to_path_buf());
        }
        self
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.pos) {
            (Some(file), Some(p)) => {
                write!(f, "{}:{}:{}: {}", file.display(), p.line, p.col, self.msg)
            }
            (None, Some(p)) => write!(f, "line {}, column {}: {}", p.line, p.col, self.msg),
            (Some(file), None) => write!(f, "{}: {}", file.display(), self.msg),
            (None, None) => write!(f, "{}", self.msg),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parse a number: decimal, or hexadecimal with a `0x` prefix; `_` separators allowed.
pub fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parse a size with an optional unit suffix (B, K/KB, M/MB, G/GB; binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let (num, mult) = [
        ("GB", 1u64 << 30),
        ("G", 1 << 30),
        ("MB", 1 << 20),
        ("M", 1 << 20),
        ("KB", 1 << 10),
        ("K", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| upper.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((upper.clone(), 1));
    parse_number(&num)?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_sizes() {
        assert_eq!(parse_number("0x7c00"), Some(0x7c00));
        assert_eq!(parse_number(" 42 "), Some(42));
        assert_eq!(parse_number("1_000"), Some(1000));
        assert_eq!(parse_number("0xzz"), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_size("2MB"), Some(2 << 20));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    #[test]
    fn error_display_has_file_line_column() {
        let e = ConfigError::new(Some(Pos { line: 3, col: 7 }), "bad")
            .in_file(Some(std::path::Path::new("vm.xml")));
        assert_eq!(e.to_string(), "vm.xml:3:7: bad");
    }
}
