//! A strict, bounded HTTP/1.1 request parser and response writer: what a client sends is
//! untrusted, so every limit is checked and nothing panics (the parser is fuzzed).

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Most headers a request may have.
pub const MAX_HEADERS: usize = 64;

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query, percent-decoding not applied (paths here are plain).
    pub path: String,
    /// `key=value` pairs of the query string, in order.
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// The path split into its segments (`/vm/cores/0` → `["vm", "cores", "0"]`).
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }
}

/// Why a request was refused; each maps to a 4xx status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("request body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::Malformed(_) => 400,
            HttpError::Unsupported(_) => 501,
        }
    }
}

fn malformed(m: impl Into<String>) -> HttpError {
    HttpError::Malformed(m.into())
}

/// Parse one request from the start of `buf`. `Ok(None)`: incomplete, read more.
/// `Ok(Some((request, bytes used)))`, or an error for a request that can never be valid.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let head_end = match find(buf, b"\r\n\r\n") {
        Some(p) => p,
        None => {
            if buf.len() > MAX_HEAD {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(None);
        }
    };
    if head_end > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| malformed("the head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(malformed(format!("bad request line '{}'", truncate(line)))),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(malformed(format!("bad method '{}'", truncate(method))));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Unsupported(format!(
            "protocol '{}' (HTTP/1.1 only)",
            truncate(version)
        )));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(malformed(format!("bad target '{}'", truncate(target))));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    let mut headers = Vec::new();
    for l in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(malformed(format!("more than {MAX_HEADERS} headers")));
        }
        let (n, v) = l
            .split_once(':')
            .ok_or_else(|| malformed(format!("bad header line '{}'", truncate(l))))?;
        if n.is_empty() || n.bytes().any(|b| !(b.is_ascii_alphanumeric() || b == b'-')) {
            return Err(malformed(format!("bad header name '{}'", truncate(n))));
        }
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    if header("transfer-encoding").is_some() {
        return Err(HttpError::Unsupported(
            "Transfer-Encoding (send a Content-Length)".into(),
        ));
    }
    let len = match header("content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| malformed(format!("bad Content-Length '{}'", truncate(v))))?,
    };
    if len > MAX_BODY {
        return Err(HttpError::BodyTooLarge);
    }
    let start = head_end + 4;
    if buf.len() - start < len {
        return Ok(None);
    }
    Ok(Some((
        Request {
            method: method.to_string(),
            path: path.to_string(),
            query,
            headers,
            body: buf[start..start + len].to_vec(),
        },
        start + len,
    )))
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// A response: status and a JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Response {
    pub fn ok(body: serde_json::Value) -> Self {
        Response { status: 200, body }
    }
    /// An error response: `{"error": message}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Response {
            status,
            body: serde_json::json!({ "error": message.to_string() }),
        }
    }

    /// The bytes on the wire (the connection closes after it).
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            reason(self.status),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Parse a response (for the client): status and JSON body.
pub fn parse_response(buf: &[u8]) -> Result<(u16, serde_json::Value), HttpError> {
    let head_end = find(buf, b"\r\n\r\n").ok_or_else(|| malformed("incomplete response"))?;
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| malformed("response head"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| malformed("response status line"))?;
    let body = &buf[head_end + 4..];
    let v = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| malformed(format!("response body: {e}")))?
    };
    Ok((status, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_with_query_and_body() {
        let raw =
            b"PUT /vm/memory?addr=0x1000&len=16 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        let (r, n) = parse_request(raw).unwrap().unwrap();
        assert_eq!(n, raw.len());
        assert_eq!(r.method, "PUT");
        assert_eq!(r.segments(), vec!["vm", "memory"]);
        assert_eq!(r.query("addr"), Some("0x1000"));
        assert_eq!(r.header("host"), Some("x"));
        assert_eq!(r.body, b"{}");
        assert_eq!(parse_request(&raw[..raw.len() - 1]).unwrap(), None);
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n").unwrap(), None);
    }

    #[test]
    fn refuses_what_is_malformed_or_too_big() {
        let bad: &[&[u8]] = &[
            b"GET\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2\r\n\r\n",
            b"GET nope HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ];
        for b in bad {
            let e = parse_request(b).unwrap_err();
            assert!((400..600).contains(&e.status()), "{e}");
        }
        let big = format!("GET / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(parse_request(big.as_bytes()), Err(HttpError::BodyTooLarge));
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(parse_request(&huge), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn response_round_trips() {
        let r = Response::error(404, "no such thing");
        let (s, v) = parse_response(&r.encode()).unwrap();
        assert_eq!(s, 404);
        assert_eq!(v["error"], "no such thing");
    }
}
