//! The client side: one request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no VM is listening on {path}: {source} (is it running, with --api-sock or --name?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the connection to {path} failed: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad answer from {path}: {msg}")]
    Protocol { path: String, msg: String },
}

/// Send `method path` with an optional JSON body; the status and JSON answer.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), ClientError> {
    let p = socket.display().to_string();
    let mut c = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: p.clone(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: p.clone(),
        source,
    };
    c.set_read_timeout(Some(timeout)).map_err(io)?;
    let body = body
        .map(|b| serde_json::to_vec(b).unwrap_or_default())
        .unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.write_all(&req).map_err(io)?;
    let mut out = Vec::new();
    c.read_to_end(&mut out).map_err(io)?;
    crate::http::parse_response(&out).map_err(|e| ClientError::Protocol {
        path: p.clone(),
        msg: e.to_string(),
    })
}
