//! The control API of a Palacios-rs VM (the Firecracker / Cloud Hypervisor shape: one VMM
//! process per VM, one API socket): HTTP/1.1 with JSON bodies on a Unix domain socket
//! (mode 0600). `docs/api.md` and `docs/openapi.json` describe the endpoints; this crate has
//! the transport (a bounded request parser, a server loop, a client) and the socket naming.

pub mod client;
pub mod http;
pub mod server;

pub use client::{ClientError, request};
pub use http::{HttpError, Request, Response};
pub use server::Server;

use std::path::PathBuf;

/// The directory named VMs' sockets go in: `$XDG_RUNTIME_DIR/palacios-rs`, or
/// `/tmp/palacios-rs-UID` where that is unset.
pub fn socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("palacios-rs"),
        _ => {
            // SAFETY: getuid cannot fail and has no side effects.
            let uid = unsafe { libc::getuid() };
            std::env::temp_dir().join(format!("palacios-rs-{uid}"))
        }
    }
}

/// Whether `name` is a usable VM name (letters, digits, `-`, `_`, `.`; not starting with `.`,
/// not ending in `.sock`, which [`resolve`] takes for a socket path).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.ends_with(".sock")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The API socket of the VM named `name` (`v3 run --name NAME`).
pub fn socket_for_name(name: &str) -> PathBuf {
    socket_dir().join(format!("{name}.sock"))
}

/// A VM given on the command line as a name or a socket path (anything with a `/` or ending
/// in `.sock` is a path).
pub fn resolve(name_or_socket: &str) -> PathBuf {
    if name_or_socket.contains('/') || name_or_socket.ends_with(".sock") {
        PathBuf::from(name_or_socket)
    } else {
        socket_for_name(name_or_socket)
    }
}
