//! QEMU firmware configuration interface, traditional I/O-port flavour.
//!
//! * Port 0x510 (selector, normally 16-bit write): selects an item and rewinds
//!   its read offset to 0. A write of 2 or more bytes uses the low 16 bits of
//!   the value, a 1-byte write the low 8 bits (upper selector byte 0); reads
//!   of the selector return 0.
//! * Port 0x511 (data): each byte read returns the next byte of the selected
//!   item, 0 past its end or for unknown keys. A read of `len` bytes (1-8)
//!   returns that many consecutive item bytes packed little-endian, i.e. the
//!   first byte in bits 0-7, so that storing the value to memory reproduces the
//!   item's byte order. Writes to the data port are ignored (the write bit
//!   0x4000 is not supported) and there is no DMA interface (ID bit 1 clear).
//!
//! Items are stored as byte strings; numbers in the fixed keys are
//! little-endian, while the file directory is big-endian, as QEMU defines.
//! Files get keys from 0x0020 upward in the order they are added; the
//! directory lists them sorted by name. Names longer than 55 bytes are
//! truncated to keep the 56-byte NUL-terminated field.

use std::collections::BTreeMap;

/// Selector port.
pub const SELECTOR_PORT: u16 = 0x510;
/// Data port.
pub const DATA_PORT: u16 = 0x511;

/// Signature, "QEMU".
pub const KEY_SIGNATURE: u16 = 0x0000;
/// Interface ID/feature bits (u32 LE).
pub const KEY_ID: u16 = 0x0001;
/// RAM size in bytes (u64 LE).
pub const KEY_RAM_SIZE: u16 = 0x0003;
/// Number of boot CPUs (u16 LE).
pub const KEY_NB_CPUS: u16 = 0x0005;
/// Maximum number of CPUs (u16 LE).
pub const KEY_MAX_CPUS: u16 = 0x000F;
/// Kernel command line size including the NUL (u32 LE).
pub const KEY_CMDLINE_SIZE: u16 = 0x0014;
/// Kernel command line, NUL-terminated.
pub const KEY_CMDLINE_DATA: u16 = 0x0015;
/// File directory.
pub const KEY_FILE_DIR: u16 = 0x0019;
/// First key used for files.
pub const FILE_FIRST: u16 = 0x0020;
/// Maximum number of files [`FwCfg::add_file`] accepts.
pub const MAX_FILES: usize = 1024;
/// Size of the name field of a directory entry.
pub const FILE_NAME_LEN: usize = 56;

const KEYS: &[(u16, &str)] = &[
    (KEY_SIGNATURE, "signature \"QEMU\""),
    (
        KEY_ID,
        "interface ID (u32 LE): bit 0 = traditional I/O interface, no DMA",
    ),
    (KEY_RAM_SIZE, "guest RAM size in bytes (u64 LE)"),
    (KEY_NB_CPUS, "number of boot CPUs (u16 LE)"),
    (KEY_MAX_CPUS, "maximum number of CPUs (u16 LE)"),
    (
        KEY_CMDLINE_SIZE,
        "kernel command line size including NUL (u32 LE)",
    ),
    (KEY_CMDLINE_DATA, "kernel command line, NUL-terminated"),
    (
        KEY_FILE_DIR,
        "file directory: u32 BE count, then per file u32 BE size, u16 BE key, u16 reserved, 56-byte name",
    ),
    (FILE_FIRST, "first file key; files use 0x0020 upward"),
];

/// One named file.
#[derive(Clone, Debug)]
struct File {
    name: String,
    key: u16,
}

/// The fw_cfg device.
#[derive(Clone, Debug)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<File>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// Creates the device with the fixed items filled in.
    pub fn new(cpus: u16, ram_bytes: u64, cmdline: &str) -> Self {
        let mut items = BTreeMap::new();
        items.insert(KEY_SIGNATURE, b"QEMU".to_vec());
        items.insert(KEY_ID, 1u32.to_le_bytes().to_vec());
        items.insert(KEY_RAM_SIZE, ram_bytes.to_le_bytes().to_vec());
        items.insert(KEY_NB_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(KEY_MAX_CPUS, cpus.to_le_bytes().to_vec());
        let mut cmd = cmdline.as_bytes().to_vec();
        cmd.push(0);
        let size = u32::try_from(cmd.len()).unwrap_or(u32::MAX);
        items.insert(KEY_CMDLINE_SIZE, size.to_le_bytes().to_vec());
        items.insert(KEY_CMDLINE_DATA, cmd);
        let mut fw = FwCfg {
            items,
            files: Vec::new(),
            selected: 0,
            offset: 0,
        };
        fw.rebuild_dir();
        fw
    }

    /// The keys this model provides, with descriptions.
    pub fn keys() -> &'static [(u16, &'static str)] {
        KEYS
    }

    /// Adds (or replaces) a named file and returns its key. Names are
    /// truncated to 55 bytes; adding an existing name replaces its contents
    /// and keeps its key. Returns `0xFFFF` (and adds nothing) once
    /// [`MAX_FILES`] files exist.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> u16 {
        let name = truncate(name, FILE_NAME_LEN - 1);
        let key = if let Some(f) = self.files.iter().find(|f| f.name == name) {
            f.key
        } else if self.files.len() < MAX_FILES {
            let key = FILE_FIRST + self.files.len() as u16;
            self.files.push(File {
                name: name.to_string(),
                key,
            });
            key
        } else {
            return 0xFFFF;
        };
        self.items.insert(key, data);
        self.rebuild_dir();
        key
    }

    /// Port read. 0x511 returns the next `len` (clamped to 1-8) bytes of the
    /// selected item; everything else reads 0.
    pub fn read(&mut self, port: u16, len: usize) -> u64 {
        if port != DATA_PORT {
            return 0;
        }
        let item = self.items.get(&self.selected);
        let mut v = 0u64;
        for i in 0..len.clamp(1, 8) {
            let b = item.and_then(|d| d.get(self.offset)).copied().unwrap_or(0);
            v |= u64::from(b) << (8 * i);
            self.offset = self.offset.saturating_add(1);
        }
        v
    }

    /// The selected key and the read offset in its item (the guest-visible state; the items
    /// follow from the VM's configuration).
    pub fn selection(&self) -> (u16, usize) {
        (self.selected, self.offset)
    }

    /// Restore [`FwCfg::selection`].
    pub fn set_selection(&mut self, key: u16, offset: usize) {
        self.selected = key;
        self.offset = offset;
    }

    /// Port write. 0x510 selects an item (low 16 bits, or low 8 bits for a
    /// 1-byte write) and rewinds; data-port and other writes are ignored.
    pub fn write(&mut self, port: u16, v: u64, len: usize) {
        if port == SELECTOR_PORT {
            let mask = if len == 1 { 0xFF } else { 0xFFFF };
            self.selected = (v & mask) as u16;
            self.offset = 0;
        }
    }

    /// Rebuilds item 0x0019 from the file list.
    fn rebuild_dir(&mut self) {
        let mut sorted: Vec<&File> = self.files.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut dir = Vec::with_capacity(4 + sorted.len() * 64);
        dir.extend_from_slice(&(sorted.len() as u32).to_be_bytes());
        for f in sorted {
            let size = self.items.get(&f.key).map_or(0, |d| d.len());
            dir.extend_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_be_bytes());
            dir.extend_from_slice(&f.key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut name = [0u8; FILE_NAME_LEN];
            name[..f.name.len()].copy_from_slice(f.name.as_bytes());
            dir.extend_from_slice(&name);
        }
        self.items.insert(KEY_FILE_DIR, dir);
    }
}

/// Longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(fw: &mut FwCfg, key: u16) {
        fw.write(SELECTOR_PORT, u64::from(key), 2);
    }

    fn read_bytes(fw: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        select(fw, key);
        (0..n).map(|_| fw.read(DATA_PORT, 1) as u8).collect()
    }

    #[test]
    fn signature_and_id() {
        let mut fw = FwCfg::new(1, 0, "");
        assert_eq!(read_bytes(&mut fw, KEY_SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_bytes(&mut fw, KEY_ID, 4), [1, 0, 0, 0]);
    }

    #[test]
    fn cpu_counts() {
        let mut fw = FwCfg::new(4, 0, "");
        assert_eq!(read_bytes(&mut fw, KEY_NB_CPUS, 2), [4, 0]);
        assert_eq!(read_bytes(&mut fw, KEY_MAX_CPUS, 2), [4, 0]);
        let mut fw = FwCfg::new(0x1234, 0, "");
        select(&mut fw, KEY_NB_CPUS);
        assert_eq!(fw.read(DATA_PORT, 2), 0x1234);
    }

    #[test]
    fn ram_size_is_u64_le() {
        let ram = 5u64 << 30;
        let mut fw = FwCfg::new(1, ram, "");
        assert_eq!(read_bytes(&mut fw, KEY_RAM_SIZE, 8), ram.to_le_bytes());
        select(&mut fw, KEY_RAM_SIZE);
        assert_eq!(fw.read(DATA_PORT, 8), ram);
    }

    #[test]
    fn cmdline_size_and_data() {
        let mut fw = FwCfg::new(1, 0, "console=ttyS0 quiet");
        assert_eq!(
            read_bytes(&mut fw, KEY_CMDLINE_SIZE, 4),
            20u32.to_le_bytes()
        );
        assert_eq!(
            read_bytes(&mut fw, KEY_CMDLINE_DATA, 21),
            b"console=ttyS0 quiet\0\0"
        );
        let mut fw = FwCfg::new(1, 0, "");
        assert_eq!(read_bytes(&mut fw, KEY_CMDLINE_SIZE, 4), [1, 0, 0, 0]);
        assert_eq!(read_bytes(&mut fw, KEY_CMDLINE_DATA, 2), [0, 0]);
    }

    #[test]
    fn file_directory() {
        let mut fw = FwCfg::new(1, 0, "");
        assert_eq!(read_bytes(&mut fw, KEY_FILE_DIR, 4), [0, 0, 0, 0]);
        assert_eq!(fw.add_file("etc/zzz", vec![1, 2, 3]), 0x20);
        assert_eq!(fw.add_file("etc/acpi/tables", vec![7; 300]), 0x21);
        let dir = read_bytes(&mut fw, KEY_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        // Sorted by name: etc/acpi/tables first.
        let e0 = &dir[4..68];
        assert_eq!(&e0[..4], &300u32.to_be_bytes());
        assert_eq!(&e0[4..6], &[0x00, 0x21]);
        assert_eq!(&e0[6..8], &[0, 0]);
        assert_eq!(&e0[8..8 + 15], b"etc/acpi/tables");
        assert!(e0[8 + 15..].iter().all(|&b| b == 0));
        let e1 = &dir[68..132];
        assert_eq!(&e1[..8], &[0, 0, 0, 3, 0x00, 0x20, 0, 0]);
        assert_eq!(&e1[8..15], b"etc/zzz");
        assert_eq!(read_bytes(&mut fw, 0x20, 4), [1, 2, 3, 0]);
        // Replacing keeps the key and updates the size.
        assert_eq!(fw.add_file("etc/zzz", vec![9; 5]), 0x20);
        let dir = read_bytes(&mut fw, KEY_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[68..72], &5u32.to_be_bytes());
    }

    #[test]
    fn long_names_truncated_and_file_limit() {
        let mut fw = FwCfg::new(1, 0, "");
        let long = "x".repeat(100);
        let key = fw.add_file(&long, vec![]);
        let dir = read_bytes(&mut fw, KEY_FILE_DIR, 4 + 64);
        assert_eq!(&dir[12..12 + 55], "x".repeat(55).as_bytes());
        assert_eq!(dir[12 + 55], 0);
        assert_eq!(fw.add_file(&"x".repeat(60), vec![1]), key);
        // Multi-byte characters are not split.
        fw.add_file(&"é".repeat(40), vec![]);
        for i in 0..MAX_FILES {
            fw.add_file(&format!("f{i}"), vec![]);
        }
        assert_eq!(fw.add_file("one-too-many", vec![]), 0xFFFF);
    }

    #[test]
    fn offsets_selector_and_unknown_keys() {
        let mut fw = FwCfg::new(2, 0, "");
        select(&mut fw, KEY_SIGNATURE);
        assert_eq!(fw.read(DATA_PORT, 1), u64::from(b'Q'));
        assert_eq!(fw.read(DATA_PORT, 1), u64::from(b'E'));
        // Reselecting rewinds.
        select(&mut fw, KEY_SIGNATURE);
        assert_eq!(
            fw.read(DATA_PORT, 4),
            u64::from(u32::from_le_bytes(*b"QEMU"))
        );
        assert_eq!(fw.read(DATA_PORT, 4), 0);
        assert_eq!(fw.read(SELECTOR_PORT, 2), 0);
        // Data writes are ignored.
        fw.write(DATA_PORT, 0xFF, 1);
        assert_eq!(read_bytes(&mut fw, KEY_NB_CPUS, 2), [2, 0]);
        // Unknown keys read as zero; only the low 16 bits select.
        assert_eq!(read_bytes(&mut fw, 0x1234, 4), [0; 4]);
        fw.write(SELECTOR_PORT, 0xABCD_0005, 4);
        assert_eq!(fw.read(DATA_PORT, 1), 2);
        fw.write(SELECTOR_PORT, 0x1300, 1); // byte write: low 8 bits
        assert_eq!(fw.read(DATA_PORT, 1), u64::from(b'Q'));
    }

    #[test]
    fn keys_table_and_odd_lengths() {
        let keys = FwCfg::keys();
        for k in [
            0x0000, 0x0001, 0x0003, 0x0005, 0x000F, 0x0014, 0x0015, 0x0019,
        ] {
            assert!(keys.iter().any(|&(key, d)| key == k && !d.is_empty()));
        }
        let mut fw = FwCfg::new(1, 0, "");
        select(&mut fw, KEY_SIGNATURE);
        assert_eq!(fw.read(DATA_PORT, 0), u64::from(b'Q')); // clamped to 1
        assert_eq!(
            fw.read(DATA_PORT, 100),
            u64::from_le_bytes(*b"EMU\0\0\0\0\0")
        );
        for _ in 0..1000 {
            fw.read(DATA_PORT, 8);
        }
    }
}
