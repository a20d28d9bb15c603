//! Where the content directory is, as a string: `embedded` (the default: this host's
//! embedded directory at [`crate::embedded::default_socket`]), `unix:PATH` (an embedded
//! directory at another socket), or `redis://HOST:PORT[,HOST:PORT...]` (Redis Cluster).

use std::path::PathBuf;

use crate::directory::Directory;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DirSpec {
    Unix(PathBuf),
    Redis(Vec<String>),
}

impl DirSpec {
    pub fn parse(s: &str) -> Result<DirSpec, String> {
        let s = s.trim();
        if s.is_empty() || s == "embedded" {
            return Ok(DirSpec::Unix(crate::embedded::default_socket()));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(DirSpec::Unix(PathBuf::from(p)));
        }
        if s.starts_with("redis://") {
            let nodes: Vec<String> = s
                .split(',')
                .map(|n| {
                    n.trim()
                        .trim_start_matches("redis://")
                        .trim_end_matches('/')
                })
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect();
            for n in &nodes {
                let ok = n
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !ok {
                    return Err(format!("'{n}' is not HOST:PORT"));
                }
            }
            if nodes.is_empty() {
                return Err("redis:// needs at least one HOST:PORT".into());
            }
            return Ok(DirSpec::Redis(nodes));
        }
        Err(format!(
            "unknown ConCORD directory '{s}' (use embedded, unix:PATH or redis://HOST:PORT[,HOST:PORT...])"
        ))
    }

    /// A client; `may_host`: a tracker may serve an embedded directory nobody serves yet.
    pub fn open(&self, may_host: bool) -> Box<dyn Directory> {
        match self {
            DirSpec::Unix(p) => Box::new(crate::embedded::UnixDirectory::new(p.clone(), may_host)),
            DirSpec::Redis(n) => Box::new(crate::redis_dir::RedisDirectory::new(n.clone())),
        }
    }
}

impl std::fmt::Display for DirSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            DirSpec::Redis(n) => write!(f, "redis://{}", n.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            DirSpec::parse("unix:/x/y").unwrap(),
            DirSpec::Unix("/x/y".into())
        );
        assert_eq!(
            DirSpec::parse("redis://10.0.0.1:7000,10.0.0.2:7000").unwrap(),
            DirSpec::Redis(vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()])
        );
        assert!(DirSpec::parse("redis://nohost").is_err());
        assert!(DirSpec::parse("tcp:1").unwrap_err().contains("unknown"));
        assert!(matches!(
            DirSpec::parse("embedded").unwrap(),
            DirSpec::Unix(_)
        ));
    }
}
