//! ConCORD for Palacios-rs: which memory content exists where, across VMs and hosts.
//!
//! - [`monitor`]: a per-VM update monitor that hashes 4 KiB guest pages with xxh3, driven by
//!   the VM's dirty-page log (a full pass only at start), and publishes what changed;
//! - [`directory`]: the content directory (hash → entities), [`embedded`] on one host or
//!   [`redis_dir`] on Redis Cluster across hosts, chosen by a [`spec`] string;
//! - [`query`]: copies of a content, sharing over a set of entities;
//! - [`service`]: content-aware service commands in ConCORD's two phases, and the collective
//!   checkpoint built on them ([`collective`]).
//!
//! `docs/concord.md` describes it all.

pub mod collective;
pub mod directory;
pub mod embedded;
pub mod ext;
pub mod monitor;
pub mod query;
pub mod redis_dir;
pub mod service;
pub mod spec;
pub mod wire;

pub use directory::{DirError, Directory, EntityInfo};
pub use palacios_checkpoint::shared::page_hash;

/// Register the `concord` extension class.
pub fn register(r: &mut palacios_vmm::Registry) {
    r.register_extension(Box::new(ext::ConcordClass));
}

/// The hash of an all-zero page.
pub fn zero_hash() -> u64 {
    page_hash(&[0u8; 4096])
}

/// A content hash as text (16 hex digits).
pub fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// Parse a content hash (16 hex digits, optional 0x).
pub fn parse_hash(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
