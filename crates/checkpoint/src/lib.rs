//! Palacios-rs checkpoints: a versioned, CRC-checked format with one section per core and per
//! device and a sparse guest-memory image ([`format`]), written and read by stores registered
//! by name ([`store`]). This crate knows nothing of VMs: sections carry serde values, memory
//! comes from a [`MemorySource`]. `docs/checkpoint-format.md` describes the format.

pub mod format;
pub mod shared;
pub mod store;

pub use format::{FormatError, Header, MemoryLayout, Meta, Section};
pub use store::{CheckpointStore, Opened, open, store, stores};

/// Guest memory to save: reads by guest-physical address.
pub trait MemorySource {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// `[gpa, gpa+len)` in place, when the memory can be read without a copy.
    fn slice(&self, _gpa: u64, _len: u64) -> Option<&[u8]> {
        None
    }
    /// For each page of `[gpa, gpa+len)`: true if it is known to be zero without reading it
    /// (never touched). `None`: nothing is known, every page is read.
    fn known_zero(&self, _gpa: u64, _len: u64) -> Option<Vec<bool>> {
        None
    }
}

/// Progress of a long operation: (bytes done, bytes in all).
pub type Progress<'a> = dyn FnMut(u64, u64) + 'a;

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

#[cfg(test)]
mod tests {
    use super::format::*;
    use super::*;
    use std::path::PathBuf;

    struct Mem(Vec<u8>);
    impl MemorySource for Mem {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let g = gpa as usize;
            buf.copy_from_slice(&self.0[g..g + buf.len()]);
            Ok(())
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn meta(len: u64) -> Meta {
        Meta {
            created_unix: 7,
            writer: "test".into(),
            backend: "emu".into(),
            config: serde_json::json!({"mem": 1}),
            cpuid: vec![(1, 0, [1, 2, 3, 4])],
            memory: MemoryLayout {
                slots: vec![(0, len)],
                extents: vec![],
            },
            sections: vec![Section {
                kind: "device".into(),
                id: "pit".into(),
                class: "8254_PIT".into(),
                version: 1,
                state: serde_json::json!({"count": 5}),
            }],
        }
    }

    fn guest(len: usize) -> Mem {
        let mut m = vec![0u8; len];
        m[0x1000..0x1004].copy_from_slice(b"boot");
        m[0x5000] = 9;
        m[0x6fff] = 1;
        m[len - 1] = 0xee;
        Mem(m)
    }

    fn no_progress() -> impl FnMut(u64, u64) {
        |_, _| {}
    }

    #[test]
    fn both_stores_round_trip_sparse_memory() {
        let d = tmp("rt");
        let g = guest(64 << 10);
        for s in stores() {
            let path = d.join(s.name());
            let saved = s
                .save(&path, meta(64 << 10), &g, &mut no_progress())
                .unwrap();
            assert_eq!(
                saved.memory.extents,
                vec![(0x1000, 0x1000), (0x5000, 0x2000), (0xf000, 0x1000)],
                "zero pages are not stored"
            );
            let o = open(&path, &mut no_progress()).unwrap();
            assert_eq!(o.meta, saved);
            let mut img = vec![0u8; 64 << 10];
            std::os::unix::fs::FileExt::read_exact_at(&o.memory, &mut img, o.mem_offset).unwrap();
            assert_eq!(img, g.0, "{}", s.name());
            // Saving again over it replaces it atomically.
            let mut g2 = guest(64 << 10);
            g2.0[0x3000] = 3;
            s.save(&path, meta(64 << 10), &g2, &mut no_progress())
                .unwrap();
            let o = open(&path, &mut no_progress()).unwrap();
            assert_eq!(o.meta.memory.extents.len(), 4);
        }
        // The file is sparse: far less on disk than its length.
        let f = d.join("file");
        let m = std::fs::metadata(&f).unwrap();
        assert!(m.len() > 64 << 10);
        // The dir store never replaces a directory that is not a checkpoint.
        let home = d.join("project");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("notes.txt"), "keep me").unwrap();
        let e = store("dir")
            .unwrap()
            .save(&home, meta(64 << 10), &g, &mut no_progress())
            .unwrap_err();
        assert!(e.to_string().contains("not a checkpoint"), "{e}");
        assert_eq!(
            std::fs::read_to_string(home.join("notes.txt")).unwrap(),
            "keep me"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let d = tmp("flip");
        let path = d.join("c");
        let g = guest(32 << 10);
        store("file")
            .unwrap()
            .save(&path, meta(32 << 10), &g, &mut no_progress())
            .unwrap();
        let good = std::fs::read(&path).unwrap();
        let data_pages = [0x1000 + 4096, 0x5000 + 4096];
        // Header fields, the metadata, and data in the memory image.
        let mut spots: Vec<usize> = (0..HEADER_LEN).collect();
        spots.extend((good.len() - 40)..good.len());
        spots.extend(data_pages);
        for i in spots {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let e = open(&path, &mut no_progress());
            assert!(e.is_err(), "flipped byte {i:#x} went unnoticed");
        }
        // Data in a hole (outside every extent, so outside the CRC).
        let mut bad = good.clone();
        bad[4096 + 0x3000] = 1;
        std::fs::write(&path, &bad).unwrap();
        let e = open(&path, &mut no_progress()).err().unwrap().to_string();
        assert!(e.contains("no extent records"), "{e}");
        // A truncated file.
        std::fs::write(&path, &good[..good.len() - 10]).unwrap();
        let e = open(&path, &mut no_progress()).err().unwrap().to_string();
        assert!(e.contains("truncated") || e.contains("corrupt"), "{e}");
        std::fs::write(&path, &good[..30]).unwrap();
        let e = open(&path, &mut no_progress()).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_save_leaves_the_previous_checkpoint() {
        struct Failing;
        impl MemorySource for Failing {
            fn read(&self, gpa: u64, _: &mut [u8]) -> std::io::Result<()> {
                Err(std::io::Error::other(format!("boom at {gpa:#x}")))
            }
        }
        let d = tmp("fail");
        for s in stores() {
            let path = d.join(s.name());
            s.save(&path, meta(32 << 10), &guest(32 << 10), &mut no_progress())
                .unwrap();
            let e = s
                .save(&path, meta(32 << 10), &Failing, &mut no_progress())
                .unwrap_err();
            assert!(e.to_string().contains("boom"), "{e}");
            let o = open(&path, &mut no_progress()).unwrap();
            assert_eq!(o.meta.created_unix, 7);
            let left: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp-"))
                .collect();
            assert!(left.is_empty(), "temporary files left: {left:?}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
